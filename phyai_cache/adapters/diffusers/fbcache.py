"""fbcache on diffusers' FirstBlockCache, with the unified step rules applied per call.

diffusers' FBCHeadBlockHook runs the first block, then asks ``_should_compute_remaining_blocks`` with
the first block's residual. We replace that one method on the head hook *instance*: it applies the
unified rules (warmup, active_steps, compute_mask, caps, shared CFG decisions, shape changes) and
measures the same statistic against the same reference that diffusers uses — the first block's
residual at the last computed step of this context (= branch) — and caches iff ``diff < threshold``,
exactly like the native engine. Everything else (what is stored, how a cached step is rebuilt) stays
diffusers' own.

Remaining differences to native fbcache: diffusers computes iff ``diff > threshold``, we cache iff
``diff < threshold``, so ``diff == threshold`` exactly (and ``threshold=0`` with ``diff == 0``)
computes here like in the native engine; diffusers reuses one residual from the first block's output
to the last block's output, while the native engine keeps one residual per block list.
"""

from __future__ import annotations

from typing import Any

import torch

from ...lifecycle import CallInfo
from .driver import Driver, hook_internals_error, relative_l1
from .schedule import CACHED, DiffusersRunState


class FirstBlockCacheDriver(Driver):
    strategy = "fbcache"
    uses_context = True

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
        """diffusers' question "compute the remaining blocks?", answered with the unified rules."""
        call: CallInfo | None = self.lifecycle.current_call()
        if call is None:  # cannot happen behind the guards; computing is always correct
            return True
        run_state: DiffusersRunState = self.lifecycle.run_state.backend_state
        counters = run_state.counters(call.branch)
        reference = self.head.state_manager.get_state()
        reason = self.rules.must_compute(call.step)
        if reason is None and (reference.head_block_residual is None or reference.tail_block_residuals is None):
            reason = "no_cache"
        if reason is None and call.scratch.key != counters.key:
            reason = "shape_changed"  # diffusers would broadcast stale residuals onto the new shape
        leader = self._leader(call, run_state)
        if reason is None and leader is not None:
            reason = CACHED if leader[1] else f"follows_{leader[0]}"
        elif reason is None:
            call.diff = relative_l1(residual, reference.head_block_residual)
            reason = CACHED if call.diff < self.rules.threshold else "above_threshold"
            if reason == CACHED:
                reason = self.rules.limit(counters) or CACHED
        cached = reason == CACHED
        if self.config.separate_cfg is False and leader is None:
            run_state.shared_decisions[call.step] = (call.branch, cached)
        call.decision, call.reason = ("cached" if cached else "computed"), reason
        counters.record(cached, call.scratch.key)
        return not cached

    def _leader(self, call: CallInfo, run_state: DiffusersRunState) -> tuple[str, bool] | None:
        """With separate_cfg=False, the (branch, cached) another branch decided at this step."""
        if self.config.separate_cfg is not False:
            return None
        decision = run_state.shared_decisions.get(call.step)
        return decision if decision is not None and decision[0] != call.branch else None

    def describe(self) -> dict[str, Any]:
        return {"diffusers_config": {"threshold": self.config.threshold},
                "decision": "phyai_cache (unified rules, cache iff diff < threshold)"}
