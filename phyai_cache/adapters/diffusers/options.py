"""``options`` for the diffusers backend, and the unified fields diffusers cannot honour.

``options`` are validated against the diffusers config class's own fields
(:func:`dataclasses.fields`), so a name that the installed diffusers does not have is refused with the
list of names that work. A field that duplicates a unified field (``threshold``, ``max_order`` ...) is
refused with the unified field to use instead; a field phyai_cache sets itself (timestep callbacks,
the run's step count) or cannot support (FasterCache's CFG cache) is refused with the reason. Values
are checked here too, so a bad value fails at enable time, never at the first forward.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Mapping
from typing import Any

from ...config import DiTCacheConfig
from ...errors import DiTCacheConfigError, did_you_mean

Check = Callable[[str, Any], Any]  # (field label, value) -> converted value


# -- value checks -------------------------------------------------------------------------------


def _positive_int(label: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise DiTCacheConfigError(label, value, "an integer >= 1")
    return int(value)


def _optional_positive_int(label: str, value: Any) -> int | None:
    return None if value is None else _positive_int(label, value)


def _number(label: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise DiTCacheConfigError(label, value, "a finite number")
    return float(value)


def _timestep_range(label: str, value: Any) -> tuple[float, float]:
    allowed = "[low, high] in timestep units (0..1000), low < high; skipping happens for low < t < high"
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise DiTCacheConfigError(label, value, allowed)
    low, high = (_number(label, v) for v in value)
    if not low < high:
        raise DiTCacheConfigError(label, value, allowed)
    return (low, high)


def _patterns(label: str, value: Any) -> list[str]:
    allowed = "a non-empty list of regular expressions matched against module names"
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise DiTCacheConfigError(label, value, allowed)
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise DiTCacheConfigError(label, pattern, allowed, hint=f"invalid regular expression: {exc}") from exc
    return list(value)


def _optional_patterns(label: str, value: Any) -> list[str] | None:
    return None if value is None else _patterns(label, value)


def _boolean(label: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise DiTCacheConfigError(label, value, "true or false")
    return value


_DTYPES = ("float32", "bfloat16", "float16")


def _dtype(label: str, value: Any) -> Any:
    import torch

    if value not in _DTYPES:
        raise DiTCacheConfigError(label, value, ", ".join(_DTYPES))
    return getattr(torch, value)


def _ratios(label: str, value: Any) -> list[float]:
    allowed = "a non-empty list of positive per-step magnitude ratios"
    if not isinstance(value, (list, tuple)) or not value:
        raise DiTCacheConfigError(label, value, allowed)
    ratios = [_number(label, v) for v in value]
    if any(r <= 0 for r in ratios):
        raise DiTCacheConfigError(label, value, allowed)
    return ratios


def _mag_ratios(label: str, value: Any) -> Any:
    # The same form the native engine takes (one list, or one per step count), so one calibrated
    # preset serves both backends; the driver picks the list of each run's step count.
    from ...strategies._options import ratios

    return ratios(label, value)


def _positive_number(label: str, value: Any) -> float:
    number = _number(label, value)
    if number <= 0:
        raise DiTCacheConfigError(label, value, "a finite number > 0")
    return number


def _constant_weight(label: str, value: Any) -> Callable[[Any], float]:
    weight = _number(label, value)
    return lambda _module: weight


# -- per strategy -------------------------------------------------------------------------------

# Options passed through to the diffusers config (when the installed class has the field).
PASS_THROUGH: dict[str, dict[str, Check]] = {
    "fbcache": {},
    "pab": {
        **{f"{kind}_attention_block_skip_range": _optional_positive_int for kind in ("spatial", "temporal", "cross")},
        **{f"{kind}_attention_timestep_skip_range": _timestep_range for kind in ("spatial", "temporal", "cross")},
        **{f"{kind}_attention_block_identifiers": _patterns for kind in ("spatial", "temporal", "cross")},
    },
    "fastercache": {
        **{f"{kind}_attention_block_skip_range": _optional_positive_int for kind in ("spatial", "temporal")},
        **{f"{kind}_attention_timestep_skip_range": _timestep_range for kind in ("spatial", "temporal")},
        **{f"{kind}_attention_block_identifiers": _patterns for kind in ("spatial", "temporal")},
        "attention_weight_callback": _constant_weight,  # a number: the constant weight
    },
    "taylorseer": {
        "taylor_factors_dtype": _dtype,
        "cache_identifiers": _optional_patterns,
        "skip_predict_identifiers": _optional_patterns,
        "use_lite_mode": _boolean,
    },
    "magcache": {"mag_ratios": _mag_ratios, "calibrate": _boolean},
    "seacache": {"power_exp": _positive_number},
    "textkv": {},
}

# diffusers fields that a unified field already sets: option name -> unified field to use.
DUPLICATES: dict[str, dict[str, str]] = {
    "fbcache": {"threshold": "threshold"},
    "pab": {},
    "fastercache": {},
    "taylorseer": {
        "max_order": "taylorseer_order",
        "cache_interval": "cache_interval",
        "disable_cache_before_step": "warmup_steps (or the start of active_steps)",
        "disable_cache_after_step": "active_steps (its end)",
    },
    "magcache": {
        "threshold": "threshold",
        "max_skip_steps": "max_consecutive_cached",
        "retention_ratio": "warmup_steps (or the start of active_steps)",
    },
    "seacache": {
        "threshold": "threshold",
        "residual_order": "taylorseer_order",
        "retention_steps": "warmup_steps (or the start of active_steps)",
        "cache_end_steps": "active_steps (its end)",
        "max_consecutive_cached": "max_consecutive_cached",
    },
    "textkv": {},
}

_TIMESTEP_SOURCE = ("phyai_cache supplies it: the pipeline's current timestep (or the transformer call's "
                    "timestep argument), and none outside active_steps")
_CFG_CACHE = ("FasterCache's CFG cache approximates the unconditional half of a batched [uncond, cond] call; "
              "phyai_cache runs FasterCache's attention reuse per CFG branch (is_guidance_distilled=True), "
              "which works with separate and batched CFG calls alike")

# diffusers fields phyai_cache sets itself or cannot support: option name -> why.
MANAGED: dict[str, dict[str, str]] = {
    "fbcache": {},
    "pab": {"current_timestep_callback": _TIMESTEP_SOURCE},
    "fastercache": {
        "current_timestep_callback": _TIMESTEP_SOURCE,
        **{name: _CFG_CACHE for name in (
            "is_guidance_distilled", "tensor_format", "unconditional_batch_skip_range",
            "unconditional_batch_timestep_skip_range", "low_frequency_weight_update_timestep_range",
            "high_frequency_weight_update_timestep_range", "alpha_low_frequency", "alpha_high_frequency",
            "low_frequency_weight_callback", "high_frequency_weight_callback",
            "_unconditional_conditional_input_kwargs_identifiers",
        )},
    },
    "taylorseer": {},
    "magcache": {"num_inference_steps": "phyai_cache sets it from each run's real step count"},
    "seacache": {"raw_vision_callback": "phyai_cache supplies it: the call's latents as (C, T, H, W) per sample "
                                        "(diffusers' own reader for Wan T2V and Cosmos 3)"},
    "textkv": {},
}


def validate_options(strategy: str, config_class: type, options: Mapping[str, Any]) -> dict[str, Any]:
    """Checked and converted options for ``config_class`` (a diffusers config dataclass)."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    allowed = [name for name in PASS_THROUGH[strategy] if name in fields]
    converted: dict[str, Any] = {}
    for name, value in options.items():
        label = f"options.{name}"
        if name in allowed:
            converted[name] = PASS_THROUGH[strategy][name](label, value)
        elif name in DUPLICATES[strategy]:
            unified = DUPLICATES[strategy][name]
            raise DiTCacheConfigError(label, value, f"the unified field {unified} instead",
                                      hint=f"{name} duplicates a field of the unified config")
        elif name in MANAGED[strategy] and name in fields:
            raise DiTCacheConfigError(label, value, "not settable through phyai_cache",
                                      hint=MANAGED[strategy][name])
        else:
            raise DiTCacheConfigError(label, value, _allowed_text(strategy, config_class, allowed),
                                      hint=did_you_mean(name, [*allowed, *DUPLICATES[strategy]]) or
                                      f"not an option of diffusers {config_class.__name__}")
    return converted


def _allowed_text(strategy: str, config_class: type, allowed: list[str]) -> str:
    if not allowed:
        return f"no options for strategy {strategy!r} on backend 'diffusers' (every {config_class.__name__} " \
               "field is set from the unified config)"
    return f"one of {', '.join(allowed)} (diffusers {config_class.__name__} fields)"


# -- unified fields diffusers cannot honour ----------------------------------------------------


def check_unified_fields(config: DiTCacheConfig) -> None:
    """Refuse unified settings that backend 'diffusers' cannot honour, naming who can."""
    if config.strategy == "fbcache" and config.taylorseer_order is not None:
        raise DiTCacheConfigError(
            "taylorseer_order", config.taylorseer_order, "null for fbcache on backend 'diffusers'",
            hint="diffusers' FirstBlockCache reuses the residual as is and has no forecaster; backend "
                 "'native' serves fbcache with taylorseer_order, or use strategy 'taylorseer' here",
        )
    if config.strategy == "magcache" and config.taylorseer_order is not None:
        raise DiTCacheConfigError(
            "taylorseer_order", config.taylorseer_order, "null for magcache on backend 'diffusers'",
            hint="diffusers' MagCache reuses the residual as is; backend 'native' serves magcache with a "
                 "TaylorSeer forecaster")
    if config.strategy == "seacache" and config.taylorseer_order not in (None, 0, 1):
        raise DiTCacheConfigError(
            "taylorseer_order", config.taylorseer_order, "0 or 1 for seacache on backend 'diffusers'",
            hint="diffusers' SeaCache reuses (0) or linearly extrapolates (1) the residual")
    if config.strategy in ("seacache", "textkv") and config.separate_cfg is False:
        raise DiTCacheConfigError(
            "separate_cfg", False, f"true or 'auto' for {config.strategy} on backend 'diffusers'",
            hint=f"diffusers' {config.strategy} keeps its state per CFG branch; a decision shared across branches "
                 "cannot be imposed on it")
    if config.strategy == "magcache" and config.separate_cfg is False:
        raise DiTCacheConfigError(
            "separate_cfg", False, "true or 'auto' for magcache on backend 'diffusers'",
            hint="MagCache accumulates its error budget per CFG branch; a decision shared across branches "
                 "cannot be imposed on it",
        )
