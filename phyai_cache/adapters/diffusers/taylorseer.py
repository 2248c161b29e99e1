"""taylorseer on diffusers' TaylorSeerCache, on the native engine's step schedule.

diffusers' schedule (``disable_cache_before_step=D``, ``cache_interval=N``) computes steps ``< D`` and
``D+1, D+1+N, ...`` and so forecasts step ``D`` itself; the unified schedule computes steps
``< warmup`` and then ``first, first+N, ...`` with ``first = max(warmup_steps, active start)``. No
choice of D reproduces that, and diffusers has no compute mask, so each hook's
``_measure_should_compute`` is wrapped on the hook instance: diffusers still advances its own per
context (= branch) step counter and does all the Taylor bookkeeping, and the unified schedule says
whether this step computes or forecasts. Steps of one call all follow one decision.

The Taylor factors are kept in float32 unless ``options.taylor_factors_dtype`` says otherwise
(diffusers' default bfloat16 loses most significant bits of the finite differences).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ...decision import cache_gap
from ...errors import DiTCacheConfigError
from ...runtime import CallInfo
from ...strategies._options import OptionRules, boolean, optional, patterns
from .driver import DiffusersRunState, Driver, hook_internals_error
from .model import attention_module_names

FORECAST = "forecast"
_DTYPES = ("float32", "bfloat16", "float16")


def _dtype(label: str, value: Any) -> Any:
    if value not in _DTYPES:
        raise DiTCacheConfigError(label, value, ", ".join(_DTYPES))
    return getattr(torch, value)


class TaylorSeerDriver(Driver):
    strategy = "taylorseer"
    uses_context = True
    option_rules = OptionRules(
        checks={"taylor_factors_dtype": _dtype, "cache_identifiers": optional(patterns),
                "skip_predict_identifiers": optional(patterns), "use_lite_mode": boolean},
        unified={"max_order": "taylorseer_order", "cache_interval": "cache_interval",
                 "disable_cache_before_step": "warmup_steps (or the start of active_steps)",
                 "disable_cache_after_step": "active_steps (its end)"},
    )

    def build_config(self) -> Any:
        from diffusers.hooks.taylorseer_cache import TaylorSeerCacheConfig

        options = dict(self.options)
        options.setdefault("taylor_factors_dtype", torch.float32)
        start, end = self.config.active_steps or (0, None)
        # Written as the closest diffusers equivalent for the record; the wrapped schedule decides.
        return TaylorSeerCacheConfig(
            cache_interval=self.config.cache_interval or 1,
            disable_cache_before_step=max(self.config.warmup_steps or 0, start),
            disable_cache_after_step=end,
            max_order=self.config.taylorseer_order if self.config.taylorseer_order is not None else 1,
            **options,
        )

    def attach(self, installation: Any) -> None:
        hooks = self.find_hooks("_measure_should_compute")
        if not hooks or len(hooks) != len(installation.hooks):
            raise hook_internals_error(self.strategy, "_measure_should_compute")
        for hook in hooks:
            installation.patch(hook, "_measure_should_compute", self._measure(hook._measure_should_compute))

    def no_op_error(self, transformer: torch.nn.Module) -> Exception:
        names = attention_module_names(transformer)
        suggestion = _pattern_for(names[0]) if names else ""
        return DiTCacheConfigError(
            "options.cache_identifiers", self.options.get("cache_identifiers", "<diffusers default>"),
            "patterns (re.fullmatch) matching modules of this model, or options.use_lite_mode: true",
            hint=f"diffusers' TaylorSeer hooked 0 modules of {type(transformer).__name__} (its default patterns "
                 f"match '...attn' names only); its attention modules: {', '.join(names[:4]) or 'none'}"
                 + (f"; e.g. cache_identifiers: ['{suggestion}']" if suggestion else ""),
        )

    # -- run time -------------------------------------------------------------------------------

    def before_call(self, call: CallInfo, state: DiffusersRunState) -> None:
        counters = state.counters(call.branch)
        reason = self.rules.must_compute(call.step) or cache_gap(call.scratch.key, counters.key)
        call.scratch.reason = reason
        call.decision, call.reason = ("computed", reason) if reason else ("cached", FORECAST)

    def _measure(self, original: Any) -> Any:
        lifecycle = self.lifecycle

        def measure_should_compute() -> tuple[bool, Any]:
            _, state = original()  # advances diffusers' per-context step counter
            call = lifecycle.current_call()
            if call is None or call.scratch.reason is not None:
                return True, state
            if state.last_update_step is None:  # this module has nothing to forecast from yet
                call.decision, call.reason = "computed", "no_cache"
                return True, state
            return False, state

        return measure_should_compute

    def after_call(self, call: CallInfo, state: DiffusersRunState) -> None:
        state.counters(call.branch).record(call.decision == "cached", call.scratch.key)

    def describe(self) -> dict[str, Any]:
        config = self.diffusers_config
        return {"diffusers_config": {"max_order": config.max_order,
                                     "taylor_factors_dtype": str(config.taylor_factors_dtype),
                                     "cache_identifiers": config.cache_identifiers,
                                     "skip_predict_identifiers": config.skip_predict_identifiers,
                                     "use_lite_mode": config.use_lite_mode},
                "schedule": "phyai_cache (warmup_steps, active_steps, cache_interval, compute_mask)"}


def _pattern_for(module_name: str) -> str:
    """``blocks.0.attn1`` -> ``blocks\\.\\d+\\.attn1``: the same module in every block."""
    parts = [r"\d+" if part.isdigit() else re.escape(part) for part in module_name.split(".")]
    return r"\.".join(parts)
