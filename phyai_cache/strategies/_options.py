"""Checks for the ``options`` a strategy declares for the native engine (``NativeSpec.options``).

Each check takes the option's label (``"options.mag_ratios"``) and the value, and returns the value
to use or raises :class:`~phyai_cache.errors.DiTCacheConfigError` naming the option, the bad value and
what is allowed. Strategy modules combine them; this module is not a strategy (its name starts with
an underscore, so the strategy loader skips it).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import DiTCacheConfigError

Check = Callable[[str, Any], Any]


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def boolean(label: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise DiTCacheConfigError(label, value, "true or false")
    return value


def positive_number(label: str, value: Any) -> float:
    if not _is_number(value) or value <= 0:
        raise DiTCacheConfigError(label, value, "a finite number > 0")
    return float(value)


def choice(*allowed: str) -> Check:
    def check(label: str, value: Any) -> str:
        if value not in allowed:
            raise DiTCacheConfigError(label, value, ", ".join(repr(a) for a in allowed))
        return value

    return check


# How a measured strategy weighs a model's token streams (known_blocks.KnownModel.tail_streams, e.g.
# the action tokens of phyai's Cosmos3 policy): "worst" measures each stream on its own tokens and
# decides on the largest change (the default); "pooled" measures the whole sequence at once.
STREAMS = choice("worst", "pooled")


def _ratio_list(label: str, value: Any) -> list[float]:
    allowed = "a non-empty list of positive per-step magnitude ratios, or a mapping {step count: list}"
    if not isinstance(value, (list, tuple)) or not value:
        raise DiTCacheConfigError(label, value, allowed)
    for index, item in enumerate(value):
        if not _is_number(item) or item <= 0:
            raise DiTCacheConfigError(label, value, "a list of finite positive numbers",
                                      hint=f"item {index} is {item!r}; magnitude ratios are ||r_t|| / ||r_t-1||")
    return [float(v) for v in value]


def ratios(label: str, value: Any) -> list[float] | dict[int, list[float]]:
    """MagCache's per-step magnitude ratios: one list (interpolated to the run's step count), or one
    list per calibrated step count (``{20: [...], 50: [...]}``; a run uses the list of its own step count
    when there is one, else the longest list interpolated)."""
    if isinstance(value, Mapping):
        if not value:
            raise DiTCacheConfigError(label, value, "a non-empty mapping {step count: list of ratios}")
        converted = {}
        for key, item in value.items():
            try:
                steps = int(key)
            except (TypeError, ValueError):
                steps = -1
            if steps < 1 or str(steps) != str(key).strip():
                raise DiTCacheConfigError(label, key, "step counts (integers >= 1) as keys")
            converted[steps] = _ratio_list(f"{label}.{key}", item)
        return converted
    return _ratio_list(label, value)


def coefficients(label: str, value: Any) -> list[float]:
    allowed = "a non-empty list of polynomial coefficients, highest degree first (numpy.poly1d order)"
    if not isinstance(value, (list, tuple)) or not value:
        raise DiTCacheConfigError(label, value, allowed)
    for index, item in enumerate(value):
        if not _is_number(item):
            raise DiTCacheConfigError(label, value, allowed, hint=f"item {index} is {item!r}, not a finite number")
    return [float(v) for v in value]


def validate(strategy: str, backend: str, checks: Mapping[str, Check], options: Mapping[str, Any],
             hint: str = "") -> dict[str, Any]:
    """``options`` checked against ``checks``; an unknown name is refused with the names allowed."""
    from ..errors import did_you_mean

    converted = {}
    for name, value in options.items():
        label = f"options.{name}"
        check = checks.get(name)
        if check is None:
            allowed = (f"one of {', '.join(checks)}" if checks
                       else f"no options: strategy {strategy!r} on backend {backend!r} has none")
            raise DiTCacheConfigError(label, value, allowed, hint=did_you_mean(name, list(checks)) or hint)
        converted[name] = check(label, value)
    return converted
