"""Which configs a benchmark runs: every available backend x strategy of the registry, a few knobs each.

Nothing here names a backend: the sweep iterates :func:`phyai_cache.registry.list_backends`, so a
backend or strategy registered later is benchmarked without code changes. What is swept is what a
strategy's declaration says (``StrategySpec.sweep``: thresholds or intervals, with and without the
forecaster, native-only forms), the strategy defaults when it says nothing. Unavailable backends and
strategies are listed with the registry's reason instead of being run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from phyai_cache.config import DiTCacheConfig, list_presets, load_config
from phyai_cache.registry import list_backends
from phyai_cache.strategies import Sweep, get_strategy

# The grids when a strategy's declaration (StrategySpec.sweep) gives none: multiples of its own
# default threshold, or these intervals; --quick takes the middle one.
DEFAULT_MULTIPLIERS = (0.5, 1.0, 2.0)
INTERVALS = (2, 3, 4)
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
    """The knob settings swept for ``strategy``: the grid its declaration gives (plus, on the native
    engine, its native-only forms)."""
    spec = get_strategy(strategy)
    sweep = spec.sweep
    if sweep is None:
        return [{}]  # nothing to sweep: the strategy's defaults
    knob = "threshold" if sweep.knob == "threshold" else "cache_interval"
    variants: list[dict[str, Any]] = [{knob: v} for v in _grid(sweep, spec.defaults.get("threshold"), quick)]
    variants += [{knob: v, "taylorseer_order": sweep.forecast_order}
                 for v in (sweep.quick_forecast if quick else sweep.forecast)]
    if backend == "native" and not quick:
        variants += [dict(v) for v in sweep.native]
    return variants


def _grid(sweep: Sweep, default_threshold: float | None, quick: bool) -> tuple[float, ...]:
    grid = sweep.quick if quick else sweep.grid
    if grid is not None:
        return grid
    if sweep.knob == "interval":
        return QUICK_INTERVALS if quick else INTERVALS
    fallback = tuple(round((default_threshold or 0.1) * m, 4) for m in DEFAULT_MULTIPLIERS)
    return fallback[1:2] if quick else fallback


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
