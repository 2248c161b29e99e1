"""Run a benchmark sweep: every config against the uncached pipeline, same process, same seeds.

For each step count the uncached pipeline runs once per seed to give the reference outputs. Each
config then gets a fresh pipeline with the cache enabled, one untimed warm-up call, and one timed
(uncached, cached) pair per seed. A config that fails at any point becomes a row with its error;
the sweep goes on.

Strategies that need calibration (MagCache's ratios, TeaCache's polynomial) are calibrated once per
step count with :func:`phyai_cache.calibrate` on the workload at :data:`CALIBRATION_SEEDS` (never the
bench's own seeds); swept configs without those options get them, on every backend that serves the
strategy. Presets are run as shipped.
"""

from __future__ import annotations

import logging
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import torch

from phyai_cache.api import CacheHandle, enable_dit_cache
from phyai_cache.calibration import calibrate
from phyai_cache.config import DiTCacheConfig
from phyai_cache.errors import PhyaiCacheError
from phyai_cache.strategies import get_strategy

from .measure import quality, summarize_runs, time_against_uncached, timed_call
from .sweep import Skipped, SweepEntry, plan_sweep
from .workload import Workload, reference_workload

logger = logging.getLogger("phyai_cache_lab.bench")

SCHEMA = "phyai_cache.bench/1"
CALIBRATION_SEEDS = (1000,)
# The measured fields of a row, in JSON order (documented in docs/benchmarks.md).
MEASURED_FIELDS = (
    "latency_uncached_s", "latency_cached_s", "speedup", "speedup_pairs", "ideal_speedup",
    "steps_total", "steps_cached", "blocks_total", "blocks_computed", "compute_fraction",
    "peak_memory_bytes", "memory_kind", "cache_bytes",
    "psnr_db", "ssim", "max_abs", "agreement", "agreement_uncached", "same_class_as_uncached",
    "workload_metrics",
)
Progress = Callable[[int, int, str], None]  # (runs done, runs total, what is running)
WorkloadFactory = Callable[[int, int, "float | None"], Workload]  # (steps, batch_size, cfg_scale)


@dataclass(frozen=True)
class BenchOptions:
    """What to sweep and how long to measure. ``repeats`` timed pairs, one seed each (0, 1, ...)."""

    steps: tuple[int, ...] = (20,)
    batch_size: int = 10
    cfg_scale: float | None = None
    repeats: int = 2
    backends: tuple[str, ...] | None = None
    strategies: tuple[str, ...] | None = None
    quick: bool = False
    include_presets: bool = True

    @property
    def seeds(self) -> list[int]:
        return list(range(self.repeats))

    @classmethod
    def quick_run(cls, **changes: Any) -> BenchOptions:
        """The CI-sized run: 4 digits, 20 steps, one timed pair, one or two configs per strategy."""
        return cls(**{"steps": (20,), "batch_size": 4, "repeats": 1, "quick": True, **changes})


@dataclass
class BenchRow:
    """One config at one step count.

    ``status``: ``"ok"``; ``"unsupported"`` when the config or backend refused it before anything
    ran (e.g. a field the backend has no counterpart for); ``"error"`` when it failed while running.
    ``error`` then says why and ``measured`` is empty.
    """

    name: str
    backend: str
    strategy: str
    steps: int
    presets: list[str]
    config: dict[str, Any] | None
    status: str = "ok"
    error: str | None = None
    measured: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    on_frontier: bool = False
    sample: torch.Tensor | None = field(default=None, repr=False)  # first seed's images, for figures

    def get(self, key: str) -> Any:
        return self.measured.get(key)

    def to_dict(self) -> dict[str, Any]:
        # every row has every field (null when not measured), so consumers need no special cases
        measured = {k: _json_number(self.measured.get(k)) for k in MEASURED_FIELDS}
        return {"name": self.name, "backend": self.backend, "strategy": self.strategy, "steps": self.steps,
                "presets": self.presets, "status": self.status, "error": self.error, **measured,
                "on_frontier": self.on_frontier, "warnings": self.warnings, "config": self.config}


@dataclass
class Baseline:
    """The uncached pipeline at one step count."""

    steps: int
    workload: dict[str, Any]
    latency_s: float
    agreement: float | None
    sample: torch.Tensor | None = field(default=None, repr=False)
    metrics: dict[str, float] | None = None  # Workload.metrics of the uncached output

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "latency_s": self.latency_s, "agreement": self.agreement,
                "workload_metrics": _json_number(self.metrics), "workload": self.workload}


@dataclass
class BenchReport:
    options: BenchOptions
    baselines: list[Baseline]
    rows: list[BenchRow]
    skipped: list[Skipped]
    environment: dict[str, Any]
    elapsed_s: float = 0.0

    def rows_for(self, steps: int) -> list[BenchRow]:
        return [r for r in self.rows if r.steps == steps]

    def to_dict(self) -> dict[str, Any]:
        o = self.options
        return {
            "schema": SCHEMA,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "elapsed_s": round(self.elapsed_s, 1),
            "environment": self.environment,
            "options": {"steps": list(o.steps), "batch_size": o.batch_size, "cfg_scale": o.cfg_scale,
                        "repeats": o.repeats, "seeds": o.seeds, "warmup_calls": 1, "quick": o.quick,
                        "backends": list(o.backends) if o.backends else None,
                        "strategies": list(o.strategies) if o.strategies else None},
            "baselines": [b.to_dict() for b in self.baselines],
            "skipped": [s.to_dict() for s in self.skipped],
            "rows": [r.to_dict() for r in self.rows],
        }


def run_bench(options: BenchOptions = BenchOptions(), progress: Progress | None = None,
              entries: Sequence[SweepEntry] | None = None,
              workload_factory: WorkloadFactory = reference_workload) -> BenchReport:
    """Benchmark ``entries`` (default: :func:`plan_sweep` from the registry) at every step count."""
    started = time.perf_counter()
    if entries is None:
        plan = plan_sweep(options.backends, options.strategies, quick=options.quick,
                          include_presets=options.include_presets)
        entries, skipped = plan.entries, plan.skipped
    else:
        skipped = []
    runs_per_steps = (1 + len(options.seeds)) + len(entries) * (1 + 2 * len(options.seeds))  # baseline + configs
    counter = RunCounter(progress, total=len(options.steps) * runs_per_steps)
    baselines, rows = [], []
    for steps in options.steps:
        workload = workload_factory(steps, options.batch_size, options.cfg_scale)
        plain = workload.make_pipeline()
        baseline, references = _run_baseline(workload, plain, options.seeds, counter)
        baselines.append(baseline)
        calibrations: dict[str, dict[str, Any]] = {}
        for entry in entries:
            row_end = counter.done + 1 + 2 * len(options.seeds)
            row = measure_entry(workload, plain, references, entry, options.seeds, counter, calibrations)
            counter.advance_to(row_end)
            rows.append(row)
            logger.info("bench %s steps=%d: %s", row.name, steps, row.error or _brief(row))
    mark_frontier(rows)
    return BenchReport(options, baselines, rows, skipped, environment(), time.perf_counter() - started)


def measure_entry(workload: Workload, plain: Any, references: dict[int, torch.Tensor], entry: SweepEntry,
                  seeds: Sequence[int], counter: RunCounter | None = None,
                  calibrations: dict[str, dict[str, Any]] | None = None) -> BenchRow:
    """One config against the uncached ``plain`` pipeline; any failure becomes an error row.
    ``calibrations`` caches the calibrated options per strategy for this workload."""
    counter = counter or RunCounter(None, 0)
    row = BenchRow(entry.name, entry.backend, entry.strategy, workload.steps, list(entry.presets), None)
    counter.label = f"{workload.steps} steps: {entry.backend}/{entry.name}"
    try:
        config = entry.build()
        if entry.preset is None:
            config = calibrated(config, workload, plain, {} if calibrations is None else calibrations)
        row.config = config.to_dict()
        cached = workload.make_pipeline()
        handle = enable_dit_cache(cached, config)
    except PhyaiCacheError as error:  # validation refused it before anything ran
        return _failed(row, "unsupported", error)
    except Exception as error:  # noqa: BLE001 - a failing config is a result, not a crash
        return _failed(row, "error", error)
    try:
        _measure_into(row, workload, plain, references, cached, handle, seeds, counter)
    except Exception as error:  # noqa: BLE001
        return _failed(row, "error", error)
    return row


def calibrated(config: DiTCacheConfig, workload: Workload, plain: Any,
               calibrations: dict[str, dict[str, Any]]) -> DiTCacheConfig:
    """``config`` with its strategy's calibrated options added when it has none of them."""
    spec = get_strategy(config.strategy)
    if spec.calibration is None or any(name in config.options for name in spec.calibration.options):
        return config
    if config.strategy not in calibrations:
        calibrations[config.strategy] = calibrate(plain, workload.call_kwargs, strategy=config.strategy,
                                                  seeds=CALIBRATION_SEEDS).options
    return config.replace(options={**calibrations[config.strategy], **config.options})


def _failed(row: BenchRow, status: str, error: BaseException) -> BenchRow:
    # INFO, not WARNING: the failure is reported as a row, and the CLI's progress bar owns stderr
    logger.info("bench: %s/%s %s: %s: %s", row.backend, row.name, status, type(error).__name__, error)
    row.status, row.error, row.measured = status, f"{type(error).__name__}: {error}", {}
    return row


def _measure_into(row: BenchRow, workload: Workload, plain: Any, references: dict[int, torch.Tensor],
                  cached: Any, handle: CacheHandle, seeds: Sequence[int], counter: RunCounter) -> None:
    timing, runs = time_against_uncached(workload, plain, cached, handle, seeds, counter.tick)
    reference = torch.cat([references[s] for s in seeds])
    row.measured = {
        "latency_uncached_s": timing.latency_plain_s, "latency_cached_s": timing.latency_cached_s,
        "speedup": timing.speedup, "speedup_pairs": timing.ratios,
        **summarize_runs(runs),
        **quality(torch.cat(timing.cached_outputs), reference, workload.data_range,
                  workload.agreement, workload.classes),
        "workload_metrics": workload.metrics(torch.cat(timing.cached_outputs)) if workload.metrics else None,
    }
    row.sample = timing.cached_outputs[0]
    if any(not torch.equal(out, references[s]) for out, s in zip(timing.plain_outputs, seeds)):
        row.warnings.append("the uncached pipeline's output changed while this cache was enabled on another "
                            "pipeline instance: the backend leaks across instances")


def _run_baseline(workload: Workload, plain: Any, seeds: Sequence[int],
                  counter: RunCounter) -> tuple[Baseline, dict[int, torch.Tensor]]:
    counter.label = f"{workload.steps} steps: uncached reference"
    timed_call(plain, workload.call_kwargs(seeds[0]))  # warm-up
    counter.tick()
    references, latencies = {}, []
    for seed in seeds:
        seconds, output = timed_call(plain, workload.call_kwargs(seed))
        references[seed] = workload.extract(output)
        latencies.append(seconds)
        counter.tick()
    images = torch.cat([references[s] for s in seeds])
    agreement = workload.agreement(images) if workload.agreement is not None else None
    metrics = workload.metrics(images) if workload.metrics is not None else None
    return Baseline(workload.steps, workload.details, statistics.median(latencies), agreement,
                    references[seeds[0]], metrics), references


def mark_frontier(rows: Sequence[BenchRow]) -> None:
    """Flag the rows no other row of the same step count beats on both speedup and PSNR."""
    for steps in {r.steps for r in rows}:
        ok = [r for r in rows if r.steps == steps and r.status == "ok" and r.get("speedup") is not None]
        for row in ok:
            row.on_frontier = not any(_dominates(other, row) for other in ok if other is not row)


def _dominates(a: BenchRow, b: BenchRow) -> bool:
    sa, sb, pa, pb = a.get("speedup"), b.get("speedup"), a.get("psnr_db"), b.get("psnr_db")
    return sa >= sb and pa >= pb and (sa > sb or pa > pb)


def environment() -> dict[str, Any]:
    versions = {}
    for package in ("phyai-cache", "torch", "diffusers", "cache-dit"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
            "versions": versions}


class RunCounter:
    """Counts finished pipeline runs for the progress callback (the benchmark's and the demo's)."""

    def __init__(self, progress: Progress | None, total: int, label: str = "") -> None:
        self.progress, self.total, self.done, self.label = progress, total, 0, label

    def tick(self) -> None:
        self.advance_to(self.done + 1)

    def advance_to(self, done: int) -> None:
        """Jump ahead, e.g. past the runs a failed config did not make."""
        if done > self.done:
            self.done = done
            if self.progress is not None:
                self.progress(self.done, self.total, self.label)


def _brief(row: BenchRow) -> str:
    m = row.measured
    return f"speedup {m.get('speedup') or 0:.2f}x, PSNR {m.get('psnr_db'):.1f} dB"


def _json_number(value: Any) -> Any:
    """JSON has no infinity: an infinite PSNR (identical output) is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_json_number(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_number(v) for k, v in value.items()}
    return value
