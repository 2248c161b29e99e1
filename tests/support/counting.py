"""Counting real block executions, below every instance-level wrapper a cache installs."""

from __future__ import annotations

import functools

import torch

from phyai_cache.blocks import discover_blocks


def count_block_executions(monkeypatch, transformer: torch.nn.Module, blocks=None) -> list[torch.nn.Module]:
    """Wrap each block class's ``forward`` (call before enabling a cache); returns the list that
    receives one entry per block forward that really runs. ``blocks``: the spec for models whose
    blocks diffusers does not describe."""
    executed: list[torch.nn.Module] = []
    classes = {type(block) for block_list in discover_blocks(transformer, blocks) for block in block_list.blocks}
    for cls in classes:
        original = cls.forward

        @functools.wraps(original)
        def counting(self, *args, _original=original, **kwargs):
            executed.append(self)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", counting)
    return executed
