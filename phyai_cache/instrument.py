"""Counting block forwards that really execute, for backends that do not report it themselves.

Upstream caches skip blocks inside their own hooks; to report ``blocks_computed`` honestly we wrap
each block's forward *before* the backend installs its hooks, so the counter sits innermost and only
runs when the block's real computation runs.
"""

from __future__ import annotations

from typing import Any

import torch

from ._patch import UndoStack
from .runtime import CallSource


class BlockCounter:
    """Instance-level counting wrappers on a list of blocks; ``remove()`` restores them exactly."""

    def __init__(self, blocks: list[torch.nn.Module], lifecycle: CallSource) -> None:
        self.lifecycle = lifecycle
        self._undo = UndoStack()
        try:
            for block in blocks:
                self._undo.patch(block, "forward", self._wrap(block.forward))
        except BaseException:
            self.remove()
            raise
        self.count = len(blocks)

    def __len__(self) -> int:
        return self.count

    def _wrap(self, original: Any) -> Any:
        lifecycle = self.lifecycle

        def forward(*args: Any, **kwargs: Any) -> Any:
            call = lifecycle.current_call()
            if call is not None:
                call.blocks_computed += 1
            return original(*args, **kwargs)

        return forward

    def remove(self) -> None:
        self._undo.undo()
