"""``options``: the one rules type and validator for every backend, and the value checks they use.

A strategy's ``options`` are backend-specific. Each backend states what it accepts as
:class:`OptionRules` — the native engine per strategy (``NativeSpec.options``), each diffusers
driver for its diffusers config, the Cache-DiT adapter for ``DBCacheConfig`` — and
:meth:`OptionRules.validate` checks a config's options against them, so every backend refuses a bad
option the same way: naming the option, the bad value and what is allowed, at enable time.

Each check takes the option's label (``"options.mag_ratios"``) and the value, and returns the value
to use or raises :class:`~phyai_cache.errors.DiTCacheConfigError`. This module is not a strategy (its
name starts with an underscore, so the strategy loader skips it).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import DiTCacheConfigError, did_you_mean

Check = Callable[[str, Any], Any]


@dataclass(frozen=True)
class OptionRules:
    """The ``options`` one strategy accepts on one backend, and why it refuses the others.

    checks:
        The accepted names, each with its check (the converted value is what the backend gets).
    unified:
        Upstream names that a unified field already sets -> that field (refused, naming it).
    refused:
        Upstream names phyai_cache sets itself or cannot support -> why (refused with the reason).
    source:
        Where the accepted names come from (``"diffusers MagCacheConfig"``), for messages.
    """

    checks: Mapping[str, Check] = field(default_factory=dict)
    unified: Mapping[str, str] = field(default_factory=dict)
    refused: Mapping[str, str] = field(default_factory=dict)
    source: str = ""

    def for_fields(self, names: Collection[str], source: str, accept_others: bool = False) -> OptionRules:
        """These rules for an upstream config class with fields ``names`` at the installed version:
        accepted and refused names it lacks are unknown there; with ``accept_others`` every other field
        of it passes through unchecked (Cache-DiT's ``DBCacheConfig``)."""
        checks = {name: check for name, check in self.checks.items() if name in names}
        if accept_others:
            checks.update({name: accept for name in names
                           if name not in checks and name not in self.unified and name not in self.refused})
        refused = {name: why for name, why in self.refused.items() if name in names}
        return OptionRules(checks, self.unified, refused, source)

    def validate(self, strategy: str, backend: str, options: Mapping[str, Any], hint: str = "") -> dict[str, Any]:
        """``options`` checked and converted; the first bad one raises, naming what is allowed."""
        converted = {}
        for name, value in options.items():
            label = f"options.{name}"
            if name in self.checks:
                converted[name] = self.checks[name](label, value)
            elif name in self.unified:
                raise DiTCacheConfigError(label, value, f"the unified field {self.unified[name]} instead",
                                          hint=f"{name} duplicates a field of the unified config")
            elif name in self.refused:
                raise DiTCacheConfigError(label, value, "not settable through phyai_cache", hint=self.refused[name])
            else:
                raise DiTCacheConfigError(label, value, self._allowed(strategy, backend),
                                          hint=did_you_mean(name, [*self.checks, *self.unified]) or hint
                                          or (f"not a field of {self.source}" if self.source else ""))
        return converted

    def _allowed(self, strategy: str, backend: str) -> str:
        if not self.checks:
            return f"no options for strategy {strategy!r} on backend {backend!r}"
        return f"one of {', '.join(self.checks)}" + (f" (fields of {self.source})" if self.source else "")


def validate(strategy: str, backend: str, checks: Mapping[str, Check], options: Mapping[str, Any],
             hint: str = "") -> dict[str, Any]:
    """``options`` checked against ``checks`` (a name -> check mapping such as ``NativeSpec.options``)."""
    return OptionRules(checks).validate(strategy, backend, options, hint)


# -- value checks -------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def accept(label: str, value: Any) -> Any:
    """Passed through as is (the upstream config checks it)."""
    return value


def optional(check: Check) -> Check:
    """``check``, or null."""

    def checked(label: str, value: Any) -> Any:
        if value is None:
            return None
        try:
            return check(label, value)
        except DiTCacheConfigError as error:
            raise DiTCacheConfigError(error.field, error.value, f"{error.allowed} or null", error.hint) from None

    return checked


def boolean(label: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise DiTCacheConfigError(label, value, "true or false")
    return value


def number(label: str, value: Any) -> float:
    if not _is_number(value):
        raise DiTCacheConfigError(label, value, "a finite number")
    return float(value)


def positive_number(label: str, value: Any) -> float:
    if not _is_number(value) or value <= 0:
        raise DiTCacheConfigError(label, value, "a finite number > 0")
    return float(value)


def positive_int(label: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise DiTCacheConfigError(label, value, "an integer >= 1")
    return int(value)


def choice(*allowed: str) -> Check:
    def check(label: str, value: Any) -> str:
        if value not in allowed:
            raise DiTCacheConfigError(label, value, ", ".join(repr(a) for a in allowed))
        return value

    return check


def patterns(label: str, value: Any) -> list[str]:
    """Regular expressions matched against module names (one string or a non-empty list)."""
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


# How a measured strategy weighs a model's token streams (known_blocks.KnownModel.tail_streams, e.g.
# the action tokens of phyai's Cosmos3 policy): "worst" measures each stream on its own tokens and
# decides on the largest change (the default); "pooled" measures the whole sequence at once.
STREAMS = choice("worst", "pooled")

# How a strategy's forecaster (``taylorseer_order`` >= 1) extrapolates, and along what
# (adapters/native/history.py): every strategy that forecasts declares both with FORECAST_OPTIONS.
FORECASTS = ("taylor", "newton")
FORECAST_AXES = ("time", "step")
FORECAST_OPTIONS: dict[str, Check] = {"forecast": choice(*FORECASTS), "forecast_axis": choice(*FORECAST_AXES)}


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


def schedules(label: str, value: Any) -> dict[int, tuple[int, ...]]:
    """taylorseer's calibrated schedules: ``{step count: [the steps that compute]}`` (0-based, step 0
    among them; ``phyai-cache tune`` writes them). A run whose step count has none uses
    ``cache_interval``."""
    allowed = "a mapping {step count: list of the steps that compute, 0-based, including 0}"
    if not isinstance(value, Mapping) or not value:
        raise DiTCacheConfigError(label, value, allowed)
    converted = {}
    for key, steps in value.items():
        count = int(key) if isinstance(key, int) or (isinstance(key, str) and key.strip().isdigit()) else 0
        if count < 1 or isinstance(key, bool):
            raise DiTCacheConfigError(label, key, "step counts (integers >= 1) as keys")
        if (not isinstance(steps, (list, tuple)) or not steps
                or any(not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < count for s in steps)
                or 0 not in steps or len(set(steps)) != len(steps)):
            raise DiTCacheConfigError(f"{label}.{key}", steps, f"distinct steps in 0..{count - 1}, including 0")
        converted[count] = tuple(sorted(steps))
    return converted


def coefficients(label: str, value: Any) -> list[float]:
    allowed = "a non-empty list of polynomial coefficients, highest degree first (numpy.poly1d order)"
    if not isinstance(value, (list, tuple)) or not value:
        raise DiTCacheConfigError(label, value, allowed)
    for index, item in enumerate(value):
        if not _is_number(item):
            raise DiTCacheConfigError(label, value, allowed, hint=f"item {index} is {item!r}, not a finite number")
    return [float(v) for v in value]
