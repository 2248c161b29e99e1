"""The unified config and ``options`` as Cache-DiT's ``DBCacheConfig`` fields.

``options`` pass through to ``DBCacheConfig`` (checked against its fields at the installed version);
the fields a unified field sets, and the ones that conflict with how this adapter drives Cache-DiT,
are refused with the field to use or the reason (:data:`OPTION_RULES`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ...config import DiTCacheConfig
from ...errors import DiTCacheConfigError
from ...strategies._options import OptionRules, optional, positive_int, positive_number

OPTION_RULES = OptionRules(
    # Checked here; every other DBCacheConfig field passes through as is.
    checks={"warmup_interval": positive_int, "max_accumulated_residual_diff_threshold": optional(positive_number)},
    # DBCacheConfig fields that duplicate a unified field: set the unified field instead.
    unified={
        "Fn_compute_blocks": "front_blocks",
        "Bn_compute_blocks": "back_blocks",
        "residual_diff_threshold": "threshold",
        "max_warmup_steps": "warmup_steps",
        "max_cached_steps": "max_cached_steps",
        "max_continuous_cached_steps": "max_consecutive_cached",
        "enable_separate_cfg": "separate_cfg",
        "cfg_compute_first": "separate_cfg",
        "cfg_diff_compute_separate": "separate_cfg",
        "steps_computation_mask": "active_steps",
    },
    # DBCacheConfig fields that conflict with how this adapter drives Cache-DiT.
    refused={
        "cache_type": "DBPrune does not fit the unified schema (it decides per block, not per step, so "
                      "steps cached, back_blocks and the threshold would mean something else); only DBCache is served",
        "num_inference_steps": "phyai_cache's lifecycle owns runs (fresh cache-dit state per run and branch); "
                               "cache-dit's own step-count refresh is not used (it fires one call late)",
        "force_refresh_step_hint": "phyai_cache's lifecycle owns refreshes: every run and CFG branch starts fresh",
        "force_refresh_step_policy": "phyai_cache's lifecycle owns refreshes: every run and CFG branch starts fresh",
        "steps_computation_policy": "active_steps implies the 'dynamic' policy; 'static' caches masked steps "
                                    "without any check and crashes when the resolution changes",
    },
)


@dataclasses.dataclass(frozen=True)
class CacheSettings:
    """The DBCacheConfig fields and calibrator settings derived from a DiTCacheConfig."""

    cache_fields: dict[str, Any]
    taylorseer_order: int | None
    active_steps: tuple[int, int | None] | None  # None: no steps mask needed
    warmup_steps: int


def cache_settings(config: DiTCacheConfig, backend: str) -> CacheSettings:
    """``config`` as DBCacheConfig fields; imports cache_dit (options are checked against its fields)."""
    from cache_dit import DBCacheConfig

    names = [f.name for f in dataclasses.fields(DBCacheConfig)]
    rules = OPTION_RULES.for_fields(names, source="cache-dit DBCacheConfig", accept_others=True)
    options = rules.validate(config.strategy, backend, config.options)
    fields = {
        "Fn_compute_blocks": config.front_blocks,
        "Bn_compute_blocks": config.back_blocks,
        "residual_diff_threshold": config.threshold,
        "max_warmup_steps": config.warmup_steps,
        "max_cached_steps": -1 if config.max_cached_steps is None else config.max_cached_steps,
        "max_continuous_cached_steps": -1 if config.max_consecutive_cached is None else config.max_consecutive_cached,
        # Each cache-dit context sees exactly one of our branches, so its own parity-based CFG split
        # must stay off: per-branch state comes from having one context per branch.
        "enable_separate_cfg": False,
        "num_inference_steps": None,  # never let cache-dit refresh on its own
        **options,
    }
    active = config.active_steps if config.active_steps not in (None, (0, None)) else None
    if active is not None:
        fields["steps_computation_policy"] = "dynamic"
        if fields.get("warmup_interval", 1) != 1:
            raise DiTCacheConfigError(
                "options.warmup_interval", fields["warmup_interval"], "1 when active_steps is set",
                hint="cache-dit shortens warmup to the mask's leading computed steps, "
                     "so an interval cannot be honoured")
    return CacheSettings(fields, config.taylorseer_order, active, config.warmup_steps or 0)

