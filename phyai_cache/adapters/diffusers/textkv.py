"""textkv on diffusers' TextKVCache (diffusers >= 0.38): exact reuse of the text keys and values.

The text tokens' key and value projections (after their norm and RoPE) do not change across the
denoising steps of one prompt, so diffusers computes them once per block and prompt and hands them
to the attention processor afterwards. Nothing is approximated: every step computes every block
(``reason: exact``), and the output equals the uncached one. diffusers implements it for
``NucleusMoEImageTransformerBlock`` only; on any other model it would hook nothing, which is refused
at enable time.

diffusers' ``enable_cache`` accepts one cache at a time, so textkv is not combined with another
cache on this backend (it raises "Caching has already been enabled").
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import DiTCacheConfigError
from ...runtime import CallInfo
from .driver import DiffusersRunState, Driver


class TextKVCacheDriver(Driver):
    strategy = "textkv"
    uses_context = True  # one K/V cache per CFG branch (the prompt's tensor is the key within it)
    per_branch_state = "diffusers' textkv keeps its state per CFG branch"

    def build_config(self) -> Any:
        from diffusers.hooks.text_kv_cache import TextKVCacheConfig

        return TextKVCacheConfig()

    def no_op_error(self, transformer: torch.nn.Module) -> Exception:
        return DiTCacheConfigError(
            "target", f"<{type(transformer).__name__}>",
            "a model with NucleusMoEImageTransformerBlock blocks (NucleusMoEImageTransformer2DModel)",
            hint="diffusers' TextKVCache caches the text keys/values of that block class only; on this model "
                 "nothing would be cached",
        )

    def after_call(self, call: CallInfo, state: DiffusersRunState) -> None:
        call.decision, call.reason = "computed", "exact"
        state.counters(call.branch).record(False, call.scratch.key)

    def describe(self) -> dict[str, Any]:
        return {"diffusers_config": {}, "exact": True}
