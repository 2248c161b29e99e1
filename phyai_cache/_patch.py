"""Reversible, instance-level changes: the one undo mechanism of phyai_cache.

Everything phyai_cache changes on a user's object is recorded here with its exact prior state, and
undone in reverse order by an :class:`UndoStack`:

* :class:`InstancePatch` sets one instance attribute (present or absent before);
* :class:`ClassSwap` gives one instance its own subclass (for special methods such as ``__call__``);
* :class:`DictSnapshot` remembers objects' instance dicts before an upstream library changes them
  (diffusers' ``enable_cache``, Cache-DiT's ``enable_cache``), to put back exactly the entries that
  library changed.

Nothing is ever patched on a class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

_MISSING = object()


class InstancePatch:
    """Set ``obj.<name> = value`` in the instance dict, restorable exactly."""

    def __init__(self, obj: Any, name: str, value: Any) -> None:
        self.obj = obj
        self.name = name
        self.value = value
        self._previous = obj.__dict__.get(name, _MISSING)
        obj.__dict__[name] = value

    def is_current(self) -> bool:
        """True while nobody else has replaced our value since we set it."""
        return self.obj.__dict__.get(self.name, _MISSING) is self.value

    def restore(self) -> None:
        if self._previous is _MISSING:
            self.obj.__dict__.pop(self.name, None)
        else:
            self.obj.__dict__[self.name] = self._previous


class ClassSwap:
    """Give one instance its own subclass (so a special method such as ``__call__`` can be
    overridden for that instance alone), restorable exactly."""

    def __init__(self, obj: Any, namespace: dict[str, Any]) -> None:
        self.obj = obj
        self.original = type(obj)
        attrs = {"__module__": self.original.__module__, "__qualname__": self.original.__qualname__}
        attrs.update(namespace)
        # Same name as the original so logs, repr() and save_pretrained() still say the real class.
        self.subclass = type(self.original.__name__, (self.original,), attrs)
        obj.__class__ = self.subclass

    def restore(self) -> None:
        if type(self.obj) is self.subclass:
            self.obj.__class__ = self.original


class DictSnapshot:
    """Some objects' instance-dict entries at one moment (all keys, or only ``keys``).

    ``changed(obj)`` lists the entries that differ now (set, replaced or deleted); ``restore(obj,
    names)`` puts those entries back as they were, so attributes somebody else set meanwhile under
    other names are left alone.
    """

    def __init__(self, objects: Iterable[Any], keys: tuple[str, ...] | None = None) -> None:
        self.keys = keys
        self._before = {id(obj): self._entries(obj) for obj in objects}

    def _entries(self, obj: Any) -> dict[str, Any]:
        if self.keys is None:
            return dict(obj.__dict__)
        return {key: obj.__dict__.get(key, _MISSING) for key in self.keys}

    def before(self, obj: Any, name: str) -> Any:
        """The entry's value at snapshot time (``MISSING`` when it was absent)."""
        return self._before[id(obj)].get(name, _MISSING)

    def changed(self, obj: Any) -> set[str]:
        before, now = self._before[id(obj)], obj.__dict__
        names = before if self.keys is not None else {*before, *now}
        return {name for name in names if now.get(name, _MISSING) is not before.get(name, _MISSING)}

    def restore(self, obj: Any, names: Iterable[str]) -> None:
        for name in names:
            previous = self.before(obj, name)
            if previous is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = previous


MISSING = _MISSING


class UndoStack:
    """Undo actions run in reverse order of registration; every action runs even if one fails."""

    def __init__(self) -> None:
        self._actions: list[Callable[[], None]] = []

    def push(self, undo: Callable[[], None]) -> None:
        self._actions.append(undo)

    def patch(self, obj: Any, name: str, value: Any) -> InstancePatch:
        """An :class:`InstancePatch` that :meth:`undo` restores."""
        patch = InstancePatch(obj, name, value)
        self.push(patch.restore)
        return patch

    def undo(self) -> None:
        """Run every action, newest first; re-raise the first failure after all have run."""
        errors = []
        while self._actions:
            action = self._actions.pop()
            try:
                action()
            except Exception as error:  # keep undoing the rest
                errors.append(error)
        if errors:
            raise errors[0]

    def __len__(self) -> int:
        return len(self._actions)
