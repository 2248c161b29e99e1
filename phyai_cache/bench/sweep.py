"""Which configs a benchmark runs: every available backend x strategy of the registry, a few knobs each.

Nothing here names a backend: the sweep iterates :func:`phyai_cache.registry.list_backends`, so a
backend or strategy registered later is benchmarked without code changes. What is swept follows
from what a strategy's declaration says to sweep (``StrategySpec.sweep``): thresholds for threshold strategies, intervals
for scheduled ones, the strategy defaults otherwise. Unavailable backends and strategies are listed
with the registry's reason instead of being run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config import DiTCacheConfig, list_presets, load_config
from ..registry import list_backends
from ..strategies import get_strategy

# Threshold grids for the strategies whose threshold scale we know (relative L1 of the decision
# residual: ~0.1 early, ~0.3 late on the reference model). Other threshold strategies get
# multiples of their own default, so new ones are swept sensibly without an entry here.
THRESHOLDS: dict[str, tuple[float, ...]] = {
    "fbcache": (0.1, 0.2, 0.3),
    "dbcache": (0.2, 0.4),
    # accumulated estimates of the output change (relative L1) over a streak
    "easycache": (0.1, 0.2, 0.3),
    "teacache": (0.1, 0.2, 0.4),
    # accumulated |1 - prod gamma| with the ratios calibrated on the workload; the default streak cap 3
    "magcache": (0.1, 0.2, 0.4),
}
# The TaylorSeer forecaster lets a higher threshold keep its quality, so it is swept higher.
FORECAST_THRESHOLDS: dict[str, tuple[float, ...]] = {
    "fbcache": (0.3, 0.4, 0.5),
    "dbcache": (0.4, 0.5),
    "easycache": (0.2, 0.4),
    "teacache": (0.4,),
    "magcache": (0.4, 1.0),
}
# Native-only forms, compared with the rows above in the same table: whole-call skipping
# (options.skip_call: a cached step runs nothing of the model) against the block-level form at equal
# schedules, and the verified forecaster (options.verify) against the unverified one
NATIVE_VARIANTS: dict[str, tuple[dict[str, Any], ...]] = {
    # ... and the forecast over the sampler's time beside the step index's (options.forecast_axis)
    "taylorseer": (*({"cache_interval": n, "options": {"skip_call": True}} for n in (4, 6, 8)),
                   {"cache_interval": 8, "options": {"skip_call": True, "forecast_axis": "time"}}),
    "magcache": ({"threshold": 1.0, "taylorseer_order": 1, "max_consecutive_cached": 4, "options": {"skip_call": True}},
                 {"threshold": 3.0, "taylorseer_order": 2, "max_consecutive_cached": 8, "options": {"skip_call": True}}),
    "easycache": ({"threshold": 0.1, "taylorseer_order": 1, "options": {"skip_call": True}},),
    "fbcache": ({"threshold": 0.5, "taylorseer_order": 1, "options": {"verify": 0.12}},),
}
DEFAULT_MULTIPLIERS = (0.5, 1.0, 2.0)
INTERVALS = (2, 3, 4)
HIGH_ORDER_INTERVALS = (4,)  # taylorseer_order 2: a longer forecast is where a higher order helps

# --quick: one or two points per strategy, enough to exercise every backend in CI.
QUICK_THRESHOLDS: dict[str, tuple[float, ...]] = {"fbcache": (0.2,), "dbcache": (), "easycache": (0.2,),
                                                  "teacache": (0.2,), "magcache": (0.2,)}
QUICK_FORECAST_THRESHOLDS: dict[str, tuple[float, ...]] = {"fbcache": (0.3,), "dbcache": (0.4,)}
QUICK_INTERVALS = (3,)


@dataclass(frozen=True)
class SweepEntry:
    """One config to benchmark, built lazily so a config that cannot be built becomes an error row."""

    name: str
    backend: str
    strategy: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    preset: str | None = None  # a shipped preset: built from its file
    also_presets: tuple[str, ...] = ()  # presets that resolve to exactly this config

    def build(self) -> DiTCacheConfig:
        if self.preset is not None:
            return load_config(self.preset, enabled=True, backend=self.backend)
        return DiTCacheConfig(enabled=True, backend=self.backend, strategy=self.strategy, **self.overrides)

    @property
    def presets(self) -> tuple[str, ...]:
        return ((self.preset,) if self.preset else ()) + self.also_presets


@dataclass(frozen=True)
class Skipped:
    """A backend or strategy that was not benchmarked, and why."""

    backend: str
    strategy: str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "strategy": self.strategy, "reason": self.reason}


@dataclass
class SweepPlan:
    entries: list[SweepEntry]
    skipped: list[Skipped]


def plan_sweep(backends: Sequence[str] | None = None, strategies: Sequence[str] | None = None,
               quick: bool = False, include_presets: bool = True) -> SweepPlan:
    """The configs to run for every available (backend, strategy), plus the shipped presets."""
    entries: list[SweepEntry] = []
    skipped: list[Skipped] = []
    available: set[tuple[str, str]] = set()
    for report in list_backends():
        if backends and report.name not in backends:
            continue
        if not report.installed:
            skipped.append(Skipped(report.name, None, "not installed"))
            continue
        for strategy, support in report.strategies.items():
            if strategies and strategy not in strategies:
                continue
            if not support.available:
                needs = f" (needs >= {support.min_version})" if support.min_version else ""
                skipped.append(Skipped(report.name, strategy, support.reason + needs))
                continue
            available.add((report.name, strategy))
            entries.extend(SweepEntry(_label(strategy, v), report.name, strategy, v)
                           for v in strategy_variants(strategy, quick, report.name))
    if include_presets and not quick:
        entries = _add_presets(entries, available)
    return SweepPlan(_grouped(entries), skipped)


def _grouped(entries: list[SweepEntry]) -> list[SweepEntry]:
    """Rows of one backend/strategy together (registry order), swept points before presets."""
    groups = list(dict.fromkeys((e.backend, e.strategy) for e in entries))
    return sorted(entries, key=lambda e: (groups.index((e.backend, e.strategy)), e.preset is not None))


def strategy_variants(strategy: str, quick: bool = False, backend: str | None = None) -> list[dict[str, Any]]:
    """The knob settings swept for ``strategy``: what its declaration says to sweep (plus, on the
    native engine, its native-only forms)."""
    spec = get_strategy(strategy)
    if spec.sweep == "threshold":
        variants = _threshold_variants(strategy, spec.fields, quick)
    elif spec.sweep == "interval":
        variants = _interval_variants(spec.fields, quick)
    else:
        return [{}]  # nothing to sweep: the strategy's defaults
    if backend == "native" and not quick:
        variants += [dict(v) for v in NATIVE_VARIANTS.get(strategy, ())]
    return variants


def _threshold_variants(strategy: str, used: Iterable[str], quick: bool) -> list[dict[str, Any]]:
    default = get_strategy(strategy).defaults.get("threshold") or 0.1
    fallback = tuple(round(default * m, 4) for m in DEFAULT_MULTIPLIERS)
    plain = (QUICK_THRESHOLDS if quick else THRESHOLDS).get(strategy, fallback[1:2] if quick else fallback)
    variants: list[dict[str, Any]] = [{"threshold": t} for t in plain]
    if "taylorseer_order" in used:
        forecast = (QUICK_FORECAST_THRESHOLDS if quick else FORECAST_THRESHOLDS).get(strategy, ())
        variants += [{"threshold": t, "taylorseer_order": 1} for t in forecast]
    return variants


def _interval_variants(used: Iterable[str], quick: bool) -> list[dict[str, Any]]:
    variants: list[dict[str, Any]] = [{"cache_interval": n} for n in (QUICK_INTERVALS if quick else INTERVALS)]
    if "taylorseer_order" in used and not quick:
        variants += [{"cache_interval": n, "taylorseer_order": 2} for n in HIGH_ORDER_INTERVALS]
    return variants


def _label(strategy: str, overrides: Mapping[str, Any]) -> str:
    short = {"threshold": "t", "taylorseer_order": "o", "cache_interval": "n",
             "front_blocks": "F", "back_blocks": "B", "max_consecutive_cached": "K", "warmup_steps": "w"}
    knobs = " ".join(f"{short.get(k, k)}={v}" for k, v in overrides.items() if k != "options")
    for name, value in dict(overrides.get("options") or {}).items():
        knobs += " skip-call" if name == "skip_call" and value is True else f" {name}={value}"
    return f"{strategy} {knobs}".strip()


def _add_presets(entries: list[SweepEntry], available: set[tuple[str, str]]) -> list[SweepEntry]:
    """Run each shipped preset on the backend it resolves to; a preset equal to a swept config
    labels that row instead of being run twice."""
    by_config = {}
    for index, entry in enumerate(entries):
        try:
            by_config[_key(entry.build())] = index
        except Exception:  # an invalid swept config is reported when it runs, not here
            continue
    for name in list_presets():
        config = load_config(name, enabled=True)
        backend = _resolve_offline(config, available)
        if backend is None:
            continue
        resolved = config.replace(backend=backend)
        index = by_config.get(_key(resolved))
        if index is not None:
            entry = entries[index]
            entries[index] = SweepEntry(entry.name, entry.backend, entry.strategy, entry.overrides,
                                        entry.preset, entry.also_presets + (name,))
            continue
        by_config[_key(resolved)] = len(entries)
        entries.append(SweepEntry(name, backend, config.strategy, preset=name))
    return entries


def _resolve_offline(config: DiTCacheConfig, available: set[tuple[str, str]]) -> str | None:
    """The backend a preset runs on among those being benchmarked (``auto`` in preference order)."""
    if config.backend != "auto":
        return config.backend if (config.backend, config.strategy) in available else None
    for name in get_strategy(config.strategy).backends:
        if (name, config.strategy) in available:
            return name
    return None


def _key(config: DiTCacheConfig) -> str:
    return repr(sorted(config.to_dict().items()))
