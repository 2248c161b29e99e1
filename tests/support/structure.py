"""The hook structure of a module tree, comparable across two model instances.

Offload libraries leave residue of their own after removal (accelerate writes the bound class forward
back into the instance dict, diffusers keeps emptied hook registries); a cached model's structure
after cache and offload are removed is compared with a never-cached twin's after the same offload
on/off, so only what the cache itself left would differ.
"""

from __future__ import annotations

from typing import Any

import torch


def _callable_shape(module: torch.nn.Module, value: Any) -> str | None:
    if value is None:
        return None
    if getattr(value, "__self__", None) is module and getattr(value, "__func__", None) is type(module).forward:
        return None  # the class's own forward, bound: the same call as no instance forward at all
    func = getattr(value, "func", value)
    return getattr(func, "__qualname__", type(value).__name__)


def module_structure(root: torch.nn.Module) -> list[tuple[Any, ...]]:
    """Per submodule: instance-dict keys (bar emptied registries and a bound class forward), the
    forward and accelerate ``_old_forward`` wrappers, accelerate's hook type, diffusers hook names,
    torch hook counts."""
    rows = []
    for name, sub in root.named_modules():
        own = sub.__dict__
        registry = own.get("_diffusers_hook")
        hooks = tuple(registry._hook_order) if registry is not None else ()
        keys = {k for k in own if not (k == "_diffusers_hook" and not hooks)}
        if _callable_shape(sub, own.get("forward")) is None:
            keys.discard("forward")
        rows.append((name, type(sub).__name__, tuple(sorted(keys)), _callable_shape(sub, own.get("forward")),
                     _callable_shape(sub, own.get("_old_forward")), type(own.get("_hf_hook")).__name__, hooks,
                     len(sub._forward_hooks), len(sub._forward_pre_hooks)))
    return rows
