"""fbcache on diffusers' FirstBlockCache, with the unified decision applied per call.

diffusers' FBCHeadBlockHook runs the first block, then asks ``_should_compute_remaining_blocks`` with
the first block's residual. We replace that one method on the head hook *instance* with
:func:`phyai_cache.decision.decide`: the unified rules (warmup, active_steps, compute_mask, caps,
shared CFG decisions, shape changes) and the same statistic against the same reference that diffusers
uses — the first block's residual at the last computed step of this context (= branch) — caching iff
``diff < threshold``, exactly like the native engine. Everything else (what is stored, how a cached
step is rebuilt) stays diffusers' own.

Remaining differences to native fbcache: diffusers computes iff ``diff > threshold``, we cache iff
``diff < threshold``, so ``diff == threshold`` exactly (and ``threshold=0`` with ``diff == 0``)
computes here like in the native engine; diffusers reuses one residual from the first block's output
to the last block's output, while the native engine keeps one residual per block list.
"""

from __future__ import annotations

from typing import Any

import torch

from ...decision import cache_gap, decide, relative_l1
from ...strategies._options import OptionRules
from .driver import Driver, hook_internals_error
from .model import BlockHooks


class FirstBlockCacheDriver(Driver):
    strategy = "fbcache"
    uses_context = True
    option_rules = OptionRules(unified={"threshold": "threshold"})
    block_hooks = BlockHooks(
        min_blocks=2,  # diffusers' FirstBlockCache pops a head and a tail block
        # its tail subtracts the head output it stored: a TypeError, or silently the wrong thing; a tail
        # without encoder output breaks SD3-style lists
        head_tail_failure="diffusers' FirstBlockCache fails on it (diffusers #14280)",
        literal_arguments=("hidden_states", "encoder_hidden_states"),
    )
    no_forecaster = ("diffusers' FirstBlockCache reuses the residual as is and has no forecaster; backend "
                     "'native' serves fbcache with taylorseer_order, or use strategy 'taylorseer' here")

    def build_config(self) -> Any:
        from diffusers.hooks.first_block_cache import FirstBlockCacheConfig

        # The threshold is applied by _decide below; diffusers' copy only documents it.
        return FirstBlockCacheConfig(threshold=self.config.threshold)

    def attach(self, installation: Any) -> None:
        heads = self.find_hooks("_should_compute_remaining_blocks")
        if len(heads) != 1 or not hasattr(heads[0], "state_manager"):
            raise hook_internals_error(self.strategy, "_should_compute_remaining_blocks")
        self.head = heads[0]
        installation.patch(self.head, "_should_compute_remaining_blocks", self._decide)

    def _decide(self, residual: torch.Tensor) -> bool:
        """diffusers' question "compute the remaining blocks?", answered by the unified decision."""
        call = self.lifecycle.current_call()
        if call is None:  # cannot happen behind the guards; computing is always correct
            return True
        state = self.installation.runs[call.run]
        counters = state.counters(call.branch)
        reference = self.head.state_manager.get_state()
        stored = reference.head_block_residual is not None and reference.tail_block_residuals is not None
        # diffusers would broadcast stale residuals onto new shapes: the key check prevents it.
        decision = decide(call.step, call.branch, self.rules, counters, state.shared, call.scratch.key,
                          gap=cache_gap(call.scratch.key, counters.key, stored),
                          measure=lambda: relative_l1(residual, reference.head_block_residual))
        call.take(decision)
        return not decision.cached

    def describe(self) -> dict[str, Any]:
        return {"diffusers_config": {"threshold": self.config.threshold},
                "decision": "phyai_cache (unified rules, cache iff diff < threshold)"}
