"""Reversible, instance-level patches.

Everything phyai_cache changes on a user's object goes through :class:`InstancePatch`, which
remembers the exact prior state of the instance ``__dict__`` entry (present or absent) so that
``restore()`` puts the object back as it was. Nothing is ever patched on a class.
"""

from __future__ import annotations

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
