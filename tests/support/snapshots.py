"""Fingerprints of everything phyai_cache could change on a target, to prove it changed nothing."""

from __future__ import annotations

from typing import Any

import torch


def module_fingerprint(module: torch.nn.Module) -> list[tuple[Any, ...]]:
    """Per submodule: instance-dict keys, the instance-level forward (if any), hook counts."""
    rows = []
    for name, sub in module.named_modules():
        rows.append((
            name,
            type(sub),
            tuple(sorted(sub.__dict__.keys())),
            sub.__dict__.get("forward"),
            sub.__dict__.get("cache_context"),
            len(sub._forward_hooks),
            len(sub._forward_pre_hooks),
            getattr(sub, "_diffusers_hook", None),
        ))
    return rows


def target_fingerprint(target: Any) -> tuple[Any, ...]:
    if isinstance(target, torch.nn.Module):
        return ("module", module_fingerprint(target))
    return ("pipeline", type(target), tuple(sorted(target.__dict__.keys())),
            module_fingerprint(target.transformer))
