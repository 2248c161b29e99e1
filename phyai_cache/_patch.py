"""Reversible, instance-level changes: the one undo mechanism of phyai_cache.

Everything phyai_cache changes on a user's object is recorded here with its exact prior state, and
undone in reverse order by an :class:`UndoStack`:

* :class:`InstancePatch` sets one instance attribute (present or absent before);
* :class:`ClassSwap` gives one instance its own subclass (for special methods such as ``__call__``);
* :class:`DictSnapshot` remembers objects' instance dicts before an upstream library changes them
  (diffusers' ``enable_cache``, Cache-DiT's ``enable_cache``), to put back exactly the entries that
  library changed.

Nothing is ever patched on a class.

A module's ``forward`` may also be wrapped by others after us (accelerate's offload hooks keep the
forward they wrap in ``_old_forward``; diffusers' hook registries in their function references). A
``forward`` patch that is no longer the module's own ``forward`` is therefore looked for in those
places (:func:`forward_slots`) and spliced out where it is found; if it is nowhere, somebody removed
it already and nothing is put back over their value.
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
        if not self.is_current() and self.name == "forward" and _is_module(self.obj):
            # Wrapped by another hook since (or already removed): take ours out of the chain where
            # it is; put back nothing where it is not (the forward there now is somebody else's).
            splice_forward(self.obj, self.value, self._previous)
            return
        if self.name == "forward" and is_stale_hook_forward(self.obj, self._previous):
            self.obj.__dict__.pop(self.name, None)  # that hook was removed meanwhile: do not bring it back
        elif self._previous is _MISSING:
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
            if name == "forward" and is_stale_hook_forward(obj, previous):
                previous = _MISSING  # that hook was removed meanwhile: do not bring its wrapper back
            if previous is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = previous


MISSING = _MISSING


def _is_module(obj: Any) -> bool:
    import torch

    return isinstance(obj, torch.nn.Module)


def is_stale_hook_forward(module: Any, value: Any) -> bool:
    """True for the forward a diffusers hook registry installed on ``module`` once, when that registry
    holds no hook any more (the hook was removed after we took our snapshot)."""
    func = getattr(value, "func", None)
    if not getattr(func, "__qualname__", "").startswith("HookRegistry.register_hook."):
        return False
    registry = getattr(module, "__dict__", {}).get("_diffusers_hook")
    return registry is None or not getattr(registry, "_hook_order", None)


def forward_slots(module: Any) -> list[tuple[Any, str]]:
    """Where a module's forward chain keeps callables, outermost first: its own ``forward``,
    accelerate's ``_old_forward`` (while an accelerate hook is attached), and the function
    references of a diffusers hook registry (each hook's ``forward``/``original_forward``)."""
    slots: list[tuple[Any, str]] = [(module, "forward")]
    own = module.__dict__
    if "_hf_hook" in own and "_old_forward" in own:
        slots.append((module, "_old_forward"))
    registry = own.get("_diffusers_hook")
    for fn_ref in reversed(list(getattr(registry, "_fn_refs", ()) or ())):
        slots.append((fn_ref, "forward"))
        if getattr(fn_ref, "original_forward", None) is not None:
            slots.append((fn_ref, "original_forward"))
    return slots


def in_forward_chain(module: Any, value: Any) -> bool:
    """True while ``value`` is one of the callables of ``module``'s forward chain."""
    return any(holder.__dict__.get(name, _MISSING) is value for holder, name in forward_slots(module))


def splice_forward(module: Any, value: Any, previous: Any) -> bool:
    """Replace ``value`` by ``previous`` wherever ``module``'s forward chain holds it; False if nowhere.

    Where ``previous`` is MISSING (the class's forward), the slot gets the bound class method, as
    accelerate itself leaves it after removing a hook.
    """
    replacement = type(module).forward.__get__(module, type(module)) if previous is _MISSING else previous
    for holder, name in forward_slots(module):
        if holder.__dict__.get(name, _MISSING) is value:
            if holder is module and name == "forward" and previous is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                holder.__dict__[name] = replacement
            return True
    return False


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
