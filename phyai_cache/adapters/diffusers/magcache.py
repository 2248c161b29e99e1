"""magcache on diffusers' MagCache, reconfigured for every run.

Mapping: ``threshold`` -> ``threshold`` (MagCache's accumulated-error budget), ``max_consecutive_cached``
-> ``max_skip_steps`` (null = unlimited), ``warmup_steps`` (and the start of ``active_steps``) ->
``retention_ratio = first / num_inference_steps`` so that exactly the first ``first`` steps compute,
``num_inference_steps`` = the run's real step count, ``mag_ratios`` = ``options.mag_ratios`` (what
``phyai-cache calibrate`` writes: one list, or one list per step count, of which each run takes its
own count's), else ``FLUX_MAG_RATIOS`` for ``FluxTransformer2DModel`` (required otherwise). All hooks share one
MagCacheConfig object, so each run rewrites its fields before the first call. Steps at or past the
end of ``active_steps`` compute: for those calls the budget is set to -inf.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any

from ...errors import CacheStateError, DiTCacheConfigError
from ...runtime import CallInfo, RunState
from ...strategies._options import OptionRules, boolean, ratios
from ...strategies.magcache import ratios_for_steps
from .driver import DiffusersRunState, Driver, hook_internals_error
from .model import BlockHooks

# Models whose published magnitude ratios diffusers ships (calibrated on FLUX.1-dev).
_SHIPPED_RATIOS = {"FluxTransformer2DModel": "FLUX_MAG_RATIOS"}


def shipped_ratios(model_class: str) -> Any:
    name = _SHIPPED_RATIOS.get(model_class)
    if name is None:
        return None
    import diffusers.hooks.mag_cache as mag_cache

    return getattr(mag_cache, name)


def require_ratios(model_class: str, options: dict[str, Any]) -> None:
    if "mag_ratios" in options or options.get("calibrate") or model_class in _SHIPPED_RATIOS:
        return
    raise DiTCacheConfigError(
        "options.mag_ratios", None, f"a list of per-step magnitude ratios calibrated for {model_class}",
        hint="MagCache's ratios are checkpoint-specific and diffusers ships them for Flux only; measure them with "
             "`phyai-cache calibrate --strategy magcache` (phyai_cache.calibrate), which writes them into a preset",
    )


class MagCacheDriver(Driver):
    strategy = "magcache"
    uses_context = True
    option_rules = OptionRules(
        # mag_ratios in the form the native engine takes (one list, or one per step count), so one
        # calibrated preset serves both backends; _config_kwargs picks the list of each run's step count
        checks={"mag_ratios": ratios, "calibrate": boolean},
        unified={"threshold": "threshold", "max_skip_steps": "max_consecutive_cached",
                 "retention_ratio": "warmup_steps (or the start of active_steps)"},
        refused={"num_inference_steps": "phyai_cache sets it from each run's real step count"},
    )
    block_hooks = BlockHooks(literal_arguments=("encoder_hidden_states",))
    no_forecaster = ("diffusers' MagCache reuses the residual as is; backend 'native' serves magcache with a "
                     "TaylorSeer forecaster")
    per_branch_state = "MagCache accumulates its error budget per CFG branch"

    def __init__(self, config: Any, options: dict[str, Any], model_class: str) -> None:
        require_ratios(model_class, options)
        super().__init__(config, options, model_class)

    def _config_kwargs(self, num_inference_steps: int) -> dict[str, Any]:
        first = max(self.rules.warmup_steps, self.rules.start)
        ratios = self.options.get("mag_ratios")
        if ratios is not None:
            ratios = ratios_for_steps(ratios, num_inference_steps)
        elif not self.options.get("calibrate"):
            ratios = shipped_ratios(self.model_class)
        max_skip = self.config.max_consecutive_cached
        return dict(
            threshold=self.config.threshold,
            max_skip_steps=sys.maxsize if max_skip is None else max_skip,
            retention_ratio=first / num_inference_steps,  # int(r * n + 0.5) == first
            num_inference_steps=num_inference_steps,
            mag_ratios=ratios,
            calibrate=bool(self.options.get("calibrate", False)),
        )

    def build_config(self) -> Any:
        from diffusers.hooks.mag_cache import MagCacheConfig

        ratios = self.options.get("mag_ratios") or shipped_ratios(self.model_class)
        if isinstance(ratios, dict):
            ratios = max(ratios.values(), key=len)
        placeholder_steps = len(ratios) if ratios is not None else 28  # rewritten by every run
        return MagCacheConfig(**self._config_kwargs(placeholder_steps))

    def attach(self, installation: Any) -> None:
        heads = [h for h in self.find_hooks("config") if hasattr(h, "state_manager") and _is_head(h)]
        if len(heads) != 1 or heads[0].config is not self.diffusers_config:
            raise hook_internals_error(self.strategy, "a head hook sharing the applied MagCacheConfig")
        self.head = heads[0]

    # -- run time -------------------------------------------------------------------------------

    def begin_run(self, run: RunState, state: DiffusersRunState) -> None:
        from diffusers.hooks.mag_cache import MagCacheConfig

        steps = run.stats.num_inference_steps
        if steps is None:
            raise CacheStateError(
                "magcache on backend 'diffusers' needs the run's step count: call the pipeline with "
                "num_inference_steps, or use handle.run(num_inference_steps=N) in a custom loop"
            )
        fresh = MagCacheConfig(**self._config_kwargs(steps))  # diffusers interpolates the ratios
        for field in dataclasses.fields(fresh):
            setattr(self.diffusers_config, field.name, getattr(fresh, field.name))

    def before_call(self, call: CallInfo, state: DiffusersRunState) -> None:
        head_state = self.head.state_manager.get_state()
        reason = self.rules.must_compute(call.step)
        if reason is None and head_state.previous_residual is None:
            reason = "no_cache"
        call.scratch.reason = reason
        if self.rules.end is not None and call.step >= self.rules.end:
            call.scratch.saved = self.diffusers_config.threshold
            self.diffusers_config.threshold = -math.inf  # no error budget: this call computes

    def after_call(self, call: CallInfo, state: DiffusersRunState) -> None:
        if call.scratch.saved is not None:
            self.diffusers_config.threshold = call.scratch.saved
        head_state = self.head.state_manager.get_state()
        cached = not head_state.should_compute
        call.decision = "cached" if cached else "computed"
        if cached:
            call.reason, call.diff = "cached", float(head_state.accumulated_err)
        else:
            call.reason = call.scratch.reason or "error_budget"
        state.counters(call.branch).record(cached, call.scratch.key)

    def describe(self) -> dict[str, Any]:
        config = self.diffusers_config
        return {"diffusers_config": {"threshold": config.threshold, "max_skip_steps": config.max_skip_steps,
                                     "calibrate": config.calibrate,
                                     "mag_ratios": "FLUX_MAG_RATIOS" if "mag_ratios" not in self.options
                                     and self.model_class in _SHIPPED_RATIOS else "options.mag_ratios"},
                "per_run": "num_inference_steps, retention_ratio and the interpolated ratios"}


def _is_head(hook: Any) -> bool:
    # diffusers' head hook is the one that decides; block hooks carry an is_tail flag instead.
    return not hasattr(hook, "is_tail")
