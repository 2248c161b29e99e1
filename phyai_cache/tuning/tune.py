"""Find the fastest cache config that keeps a quality target, and prove it on held-out seeds.

:func:`tune` works on any pipeline: it needs the pipeline, ``call_kwargs(seed) -> dict`` for one
call, and how to read images from the output (diffusers outputs by default). For each strategy and
each structural variant (e.g. with and without the TaylorSeer forecaster, front/back block counts)
it searches the strategy's knob on the calibration seeds:

- thresholds (fbcache, dbcache, magcache, ...) by **bisection**: PSNR falls as the threshold rises
  (monotone in practice, not in theory), so the largest threshold that still meets the target is
  bracketed by doubling from the strategy default and then halving the bracket a few times, instead
  of running a blind grid. About 6-9 evaluations per variant;
- intervals (scheduled taylorseer) by integer bisection over ``1 .. max_interval``;
- strategies with no knob are evaluated at their defaults.

"Fastest" is fewest blocks computed (the ideal speed, independent of machine load), then the
measured latency. The search aims at ``target + margin_db`` on the calibration seeds (the same config
varies by about +-1 dB PSNR from one seed to the next, so a margin keeps the target on unseen seeds).
The winner is checked against the target itself on held-out seeds; if it misses there, the search
is repeated with a stricter calibration target (``retry_margin_db`` more each time).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml

from ..api import enable_dit_cache, get_cache_handle
from ..config import DiTCacheConfig
from ..errors import PhyaiCacheError
from ..lifecycle import resolve_target
from ..registry import list_backends
from ..stats import RunStats
from ..strategies import SEARCH_SCHEDULE, get_strategy
from .measure import interleaved_pairs, quality, timed_call
from .outputs import CallKwargs, Extract, extract_images

logger = logging.getLogger("phyai_cache.tuning")

SAME_BLOCKS_TOLERANCE = 0.005  # compute fractions closer than this count as equal: speed decides


class TuneError(PhyaiCacheError, RuntimeError):
    """No cache config could be tuned (nothing meets the target, or no strategy can be served)."""


@dataclass
class Measurement:
    """A config on some seeds, over every case (e.g. step count). PSNR/SSIM are the worst case."""

    seeds: list[int]
    psnr_db: float
    ssim: float | None
    compute_fraction: float | None
    latency_s: float
    agreement: float | None
    cached_fraction: float = 0.0  # cached steps / steps, over every run
    by_case: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ideal_speedup(self) -> float | None:
        return 1.0 / self.compute_fraction if self.compute_fraction else None

    def meets(self, target_db: float) -> bool:
        return self.psnr_db >= target_db

    @property
    def caches(self) -> bool:
        """Whether any step was cached: a config that caches nothing meets every target uselessly."""
        return self.cached_fraction > 0

    def to_dict(self) -> dict[str, Any]:
        return {"seeds": list(self.seeds), "psnr_db": _round(self.psnr_db, 2), "ssim": _round(self.ssim, 4),
                "agreement": _round(self.agreement, 3), "cached_fraction": _round(self.cached_fraction, 4),
                "compute_fraction": _round(self.compute_fraction, 4),
                "ideal_speedup": _round(self.ideal_speedup, 2),
                "by_case": {name: _round_case(case) for name, case in self.by_case.items()}}


@dataclass
class TuneResult:
    """The tuned config, its figures on calibration and held-out seeds, and every config tried."""

    config: DiTCacheConfig
    backend: str | None  # the backend that served it
    target_psnr: float
    calibration: Measurement
    heldout: Measurement
    speedup: dict[str, float | None]  # per case: median of interleaved uncached/cached pairs
    margin_db: float  # calibration aimed at target + margin_db (the requested margin plus any retries)
    searched: list[dict[str, Any]]
    elapsed_s: float = 0.0

    @property
    def met(self) -> bool:
        """Whether the held-out seeds meet the target."""
        return self.heldout.meets(self.target_psnr)

    def to_dict(self) -> dict[str, Any]:
        return {"config": _preset_config(self.config), "backend": self.backend, "target_psnr_db": self.target_psnr,
                "met_on_heldout": self.met, "calibration": self.calibration.to_dict(),
                "heldout": self.heldout.to_dict(), "speedup": {k: _round(v, 2) for k, v in self.speedup.items()},
                "margin_db": self.margin_db, "searched": self.searched, "elapsed_s": round(self.elapsed_s, 1)}

    def to_preset(self, name: str, trades: str | None = None, details: Mapping[str, Any] | None = None,
                  command: str | None = None) -> dict[str, Any]:
        """A preset mapping (``preset:`` + ``dit_cache:``) carrying the measured figures."""
        preset: dict[str, Any] = {
            "name": name,
            "trades": trades or f"the fastest config found that keeps >= {self.target_psnr:g} dB vs uncached",
            "calibrated": True,
            "target_psnr_db": self.target_psnr,
            "calibration_margin_db": self.margin_db,
            **dict(details or {}),
            "backend": self.backend,
            "calibration": self.calibration.to_dict(),
            "heldout": {**self.heldout.to_dict(), "speedup": {k: _round(v, 2) for k, v in self.speedup.items()}},
        }
        if command:
            preset["command"] = command
        return {"preset": preset, "dit_cache": _preset_config(self.config)}

    def write_preset(self, path: str | Path, name: str | None = None, trades: str | None = None,
                     details: Mapping[str, Any] | None = None, command: str | None = None) -> Path:
        path = Path(path)
        data = self.to_preset(name or path.stem, trades, details, command)
        header = (f"# {data['preset']['name']}: {data['preset']['trades']}.\n"
                  f"# Written by phyai_cache.tune: the fastest config found (fewest blocks computed) with PSNR >= "
                  f"{self.target_psnr:g} dB vs uncached\n# on the calibration seeds, verified on the held-out seeds "
                  f"(figures below; see docs/benchmarks.md).\n")
        path.write_text(header + yaml.dump(data, Dumper=_PresetDumper, sort_keys=False, width=1000), encoding="utf-8")
        return path


def tune(pipe: Any, call_kwargs: CallKwargs | Mapping[str, CallKwargs], *, target_psnr: float,
         strategy: str | Sequence[str] | None = None, backend: str = "auto", extract: Extract = extract_images,
         data_range: float | None = 1.0, calibration_seeds: Sequence[int] = (0, 1),
         heldout_seeds: Sequence[int] = (10, 11, 12), variants: Sequence[Mapping[str, Any]] | None = None,
         base: Mapping[str, Any] | None = None, iterations: int = 6, max_threshold: float = 2.0,
         max_interval: int = 10, timing_pairs: int = 3, agreement: Callable[[torch.Tensor], float] | None = None,
         margin_db: float = 0.0, max_retries: int = 2, retry_margin_db: float = 1.0, blocks: Any = None,
         on_eval: Callable[[str], None] | None = None) -> TuneResult:
    """Search for the fastest config whose PSNR against the uncached output stays >= ``target_psnr``.

    ``call_kwargs(seed)`` returns the keyword arguments of one pipeline call; pass a mapping of
    them (e.g. ``{"20 steps": ..., "50 steps": ...}``) to require the target in every case (the
    worst case counts). ``extract(output)`` returns the images in ``[0, data_range]`` (diffusers
    outputs, PIL/np/pt, by default); ``data_range=None`` uses the uncached output's range.
    ``strategy``: one, several, or None for every threshold/interval strategy ``backend`` serves.
    ``variants`` overrides the declarations' ``Sweep.search`` (applied to each strategy), ``base`` adds
    fixed fields (e.g. ``{"warmup_steps": 4}``). The search is the bisection described in the module
    docstring: thresholds are bracketed by doubling from the strategy default up to
    ``max_threshold``, then the bracket is halved ``iterations`` times. ``margin_db``: calibrate for
    ``target_psnr + margin_db`` (held-out seeds are checked against ``target_psnr``). ``timing_pairs`` interleaved
    uncached/cached pairs per case on the held-out seeds give the measured speedup (0 skips timing).

    Each evaluation enables the cache on ``pipe`` and disables it again, so ``pipe`` is left as it
    was; it must not have a cache enabled when called. Returns a :class:`TuneResult`; raises
    :class:`TuneError` when no config with any caching meets the target.
    """
    evaluator = _evaluator(pipe, call_kwargs, extract, data_range, agreement, blocks, on_eval)
    return _tune(evaluator, target_psnr, strategy=strategy, backend=backend, calibration_seeds=calibration_seeds,
                 heldout_seeds=heldout_seeds, variants=variants, base=base, iterations=iterations,
                 max_threshold=max_threshold, max_interval=max_interval, timing_pairs=timing_pairs,
                 margin_db=margin_db, max_retries=max_retries, retry_margin_db=retry_margin_db)


def tune_tiers(pipe: Any, call_kwargs: CallKwargs | Mapping[str, CallKwargs], targets: Mapping[str, float], *,
               extract: Extract = extract_images, data_range: float | None = 1.0,
               agreement: Callable[[torch.Tensor], float] | None = None, blocks: Any = None,
               on_eval: Callable[[str], None] | None = None, **search: Any) -> dict[str, TuneResult]:
    """:func:`tune` for several targets at once (e.g. ``{"quality": 40, "balanced": 33, "fast": 28}``).

    The targets share one evaluator, so a config measured for one tier is not run again for the
    next (the bisections start from the same bracket). ``search`` takes :func:`tune`'s search and
    verification arguments (``strategy``, ``backend``, ``calibration_seeds``, ``heldout_seeds``, ...).
    """
    evaluator = _evaluator(pipe, call_kwargs, extract, data_range, agreement, blocks, on_eval)
    return {name: _tune(evaluator, target, **search) for name, target in targets.items()}


def _evaluator(pipe: Any, call_kwargs: CallKwargs | Mapping[str, CallKwargs], extract: Extract,
               data_range: float | None, agreement: Callable[[torch.Tensor], float] | None, blocks: Any,
               on_eval: Callable[[str], None] | None) -> Evaluator:
    if get_cache_handle(pipe) is not None or get_cache_handle(getattr(pipe, "transformer", None)) is not None:
        raise TuneError("tune() needs the pipeline without a cache: its uncached outputs are the reference; "
                        "call disable_dit_cache(pipe) first")
    cases = dict(call_kwargs) if isinstance(call_kwargs, Mapping) else {"default": call_kwargs}
    return Evaluator(pipe, cases, extract, data_range, agreement, blocks, on_eval)


def _tune(evaluator: Evaluator, target_psnr: float, *, strategy: str | Sequence[str] | None = None,
          backend: str = "auto", calibration_seeds: Sequence[int] = (0, 1), heldout_seeds: Sequence[int] = (10, 11, 12),
          variants: Sequence[Mapping[str, Any]] | None = None, base: Mapping[str, Any] | None = None,
          iterations: int = 6, max_threshold: float = 2.0, max_interval: int = 10, timing_pairs: int = 3,
          margin_db: float = 0.0, max_retries: int = 2, retry_margin_db: float = 1.0) -> TuneResult:
    started = time.perf_counter()
    trace_start = len(evaluator.trace)
    strategies = _strategies(strategy, backend)
    margin = margin_db
    for attempt in range(max_retries + 1):
        best = _search_all(evaluator, strategies, backend, target_psnr + margin, list(calibration_seeds),
                           variants, dict(base or {}), iterations, max_threshold, max_interval)
        heldout = evaluator.measure(best[0], list(heldout_seeds))
        evaluator.note(f"held-out {list(heldout_seeds)}: {_describe(best[0])} -> {heldout.psnr_db:.2f} dB "
                       f"(target {target_psnr:g})")
        if heldout.meets(target_psnr) or attempt == max_retries:
            break
        margin += retry_margin_db
    config, calibration = best
    speedup = evaluator.speedup(config, list(heldout_seeds), timing_pairs) if timing_pairs else {}
    backend = evaluator.backend_of.get(_key(config))
    config = config.replace(calibrated_on=evaluator.model_class)  # what the figures hold for (warned elsewhere)
    return TuneResult(config, backend, target_psnr, calibration, heldout, speedup,
                      margin, evaluator.trace[trace_start:], time.perf_counter() - started)


# -- search -------------------------------------------------------------------------------------


def _search_all(evaluator: Evaluator, strategies: list[str], backend: str, target: float, seeds: list[int],
                variants: Sequence[Mapping[str, Any]] | None, base: dict[str, Any], iterations: int,
                max_threshold: float, max_interval: int) -> tuple[DiTCacheConfig, Measurement]:
    candidates = []
    for strategy in strategies:
        calibrated = evaluator.calibration(strategy, base, seeds)
        for variant in _variants_for(strategy, variants):
            if backend not in ("auto", "native") and variant.get("options"):
                continue  # native-only forms (skip_call)
            options = {**calibrated, **dict(base.get("options") or {}), **dict(variant.get("options") or {})}
            fields = {k: v for k, v in {**base, **variant}.items() if k != SEARCH_SCHEDULE}
            config = DiTCacheConfig(enabled=True, backend=backend, strategy=strategy, **{**fields, "options": options})
            if variant.get(SEARCH_SCHEDULE):
                found = _search_schedule(evaluator, config, target, seeds)
            else:
                found = _search_variant(evaluator, config, target, seeds, iterations, max_threshold, max_interval)
            if found is not None:
                candidates.append(found)
    if not candidates:
        raise TuneError(f"no config of {', '.join(strategies)} with any caching keeps PSNR >= {target:g} dB "
                        f"on seeds {seeds}; lower the target or use more steps")
    return min(candidates, key=_fastest_first)


def _variants_for(strategy: str, variants: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """The variants to search for ``strategy``; fields it does not use are dropped (so one list can
    serve several strategies), and duplicates after dropping are searched once."""
    used = (*get_strategy(strategy).fields, "options", "separate_cfg", SEARCH_SCHEDULE)
    unique: list[dict[str, Any]] = []
    sweep = get_strategy(strategy).sweep
    for variant in (variants if variants is not None else sweep.search if sweep is not None else [{}]):
        kept = {k: v for k, v in variant.items() if k in used}
        if kept not in unique:
            unique.append(kept)
    return unique


def _search_variant(evaluator: Evaluator, config: DiTCacheConfig, target: float, seeds: list[int],
                    iterations: int, max_threshold: float, max_interval: int
                    ) -> tuple[DiTCacheConfig, Measurement] | None:
    used = get_strategy(config.strategy).fields
    if "threshold" in used:
        return _bisect_threshold(evaluator, config, target, seeds, iterations, max_threshold)
    if "cache_interval" in used and config.compute_mask is None:
        return _bisect_interval(evaluator, config, target, seeds, max_interval)
    measured = evaluator.try_measure(config, seeds, target)
    return (config, measured) if measured is not None and measured.meets(target) and measured.caches else None


def _search_schedule(evaluator: Evaluator, config: DiTCacheConfig, target: float, seeds: list[int],
                     moves: Sequence[int] = (-3, -1, 1, 3), rounds: int = 2
                     ) -> tuple[DiTCacheConfig, Measurement] | None:
    """The fewest computed steps per step count (``options.schedule``) that keep ``target``.

    For each case (step count), from 4 computed steps up: start from steps 0, 2 and evenly spaced
    ones up to 6/7 of the run, then move
    one computed step at a time by ``moves`` and keep a move when the case's PSNR rises (coordinate
    ascent, ``rounds`` passes); the first count whose best schedule meets the target is kept. A
    calibrated schedule puts the computed steps where the forecast would miss most: on the reference
    model 5 of 50 steps keep about 40 dB where every 12th step (6 of 50) keeps 37."""
    steps_of = {name: evaluator.cases[name](seeds[0]).get("num_inference_steps") for name in evaluator.cases}
    if not all(isinstance(n, int) and n > 4 for n in steps_of.values()):
        evaluator.note("schedule search needs num_inference_steps (> 4) in every case's call arguments; skipped")
        return None
    schedule: dict[int, list[int]] = {}
    all_cases = evaluator.cases
    for name, steps in steps_of.items():
        evaluator.cases = {name: all_cases[name]}  # each step count's schedule is searched on its own runs
        try:
            found = _search_case_schedule(evaluator, config, schedule, name, steps, target, seeds, moves, rounds)
        finally:
            evaluator.cases = all_cases
        if found is None:
            return None
        schedule[steps] = found
    tuned = _with_schedule(config, schedule)
    measured = evaluator.try_measure(tuned, seeds, target)
    return (tuned, measured) if measured is not None and measured.meets(target) else None


def _search_case_schedule(evaluator: Evaluator, config: DiTCacheConfig, schedule: dict[int, list[int]], name: str,
                          steps: int, target: float, seeds: list[int], moves: Sequence[int], rounds: int
                          ) -> list[int] | None:
    """One step count's schedule: the fewest computed steps whose best placement meets ``target``."""
    def psnr(points: list[int]) -> float:
        measured = evaluator.try_measure(_with_schedule(config, {**schedule, steps: points}), seeds, target)
        return -math.inf if measured is None else measured.by_case[name]["psnr_db"]

    for computed in range(4, max(5, steps // 2)):
        # Start from steps 0 and 2 (a slope taken early, where the output changes fastest) and the rest
        # evenly spaced up to about 6/7 of the run: where every search on the reference models ended.
        last = steps - 1 - (steps - 1) // 7
        points = sorted({0, 2, *(round(2 + (last - 2) * (i + 1) / (computed - 2)) for i in range(computed - 2))})
        best = psnr(points)
        for _ in range(rounds):  # coordinate ascent: move one computed step at a time
            moved = False
            for index in range(1, len(points)):
                for move in moves:
                    candidate = sorted({*points[:index], points[index] + move, *points[index + 1:]})
                    if len(candidate) == len(points) and candidate[1] > 0 and candidate[-1] < steps:
                        value = psnr(candidate)
                        if value > best:
                            best, points, moved = value, candidate, True
            if not moved:
                break
        if best >= target:
            return points
    return None


def _with_schedule(config: DiTCacheConfig, schedule: Mapping[int, Sequence[int]]) -> DiTCacheConfig:
    return config.replace(options={**config.options, "schedule": {str(n): list(p) for n, p in schedule.items()}})


def _bisect_threshold(evaluator: Evaluator, config: DiTCacheConfig, target: float, seeds: list[int],
                      iterations: int, max_threshold: float) -> tuple[DiTCacheConfig, Measurement] | None:
    """Largest threshold meeting ``target``: double from the default to bracket it, then bisect.

    Invariant: ``lo`` meets the target (threshold 0 never caches, so it does trivially) and ``hi``
    misses it. Every passing config that caches something is a candidate; the fastest one wins.
    """
    passing: list[tuple[DiTCacheConfig, Measurement]] = []
    lo, lo_m = 0.0, None
    hi = min(2 * (get_strategy(config.strategy).defaults.get("threshold") or 0.1), max_threshold)
    while True:  # bracket
        hi_m = evaluator.try_measure(config.replace(threshold=round(hi, 4)), seeds, target)
        if hi_m is None or not hi_m.meets(target):
            break
        _keep(passing, config.replace(threshold=round(hi, 4)), hi_m)
        if hi >= max_threshold:  # even the ceiling meets the target
            return min(passing, key=_fastest_first) if passing else None
        lo, lo_m, hi = hi, hi_m, min(2 * hi, max_threshold)
    for _ in range(iterations):
        mid = round((lo + hi) / 2, 4)
        if _same_work(lo_m, hi_m) or mid in (round(lo, 4), round(hi, 4)):
            break  # both ends cache the same steps: nothing in between is faster
        mid_m = evaluator.try_measure(config.replace(threshold=mid), seeds, target)
        if mid_m is not None and mid_m.meets(target):
            _keep(passing, config.replace(threshold=mid), mid_m)
            lo, lo_m = mid, mid_m
        else:
            hi, hi_m = mid, mid_m
    return min(passing, key=_fastest_first) if passing else None


def _keep(passing: list[tuple[DiTCacheConfig, Measurement]], config: DiTCacheConfig, m: Measurement) -> None:
    if m.caches:
        passing.append((config, m))


def _same_work(a: Measurement | None, b: Measurement | None) -> bool:
    return (a is not None and b is not None and a.compute_fraction is not None
            and a.compute_fraction == b.compute_fraction and a.cached_fraction == b.cached_fraction)


def _bisect_interval(evaluator: Evaluator, config: DiTCacheConfig, target: float, seeds: list[int],
                     max_interval: int) -> tuple[DiTCacheConfig, Measurement] | None:
    """Largest cache_interval meeting ``target`` (interval 1 computes every step, so it passes)."""
    best = None
    lo, hi = 1, max_interval + 1  # invariant: lo passes (or is 1), hi fails (or is past the range)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        candidate = config.replace(cache_interval=mid)
        measured = evaluator.try_measure(candidate, seeds, target)
        if measured is not None and measured.meets(target):
            lo, best = mid, ((candidate, measured) if measured.caches else best)
        else:
            hi = mid
    return best


def _fastest_first(item: tuple[DiTCacheConfig, Measurement]) -> tuple[float, float, float]:
    _, m = item
    fraction = m.compute_fraction if m.compute_fraction is not None else 1.0
    bucket = round(fraction / SAME_BLOCKS_TOLERANCE)  # near-equal block counts: let speed decide
    return (bucket, m.latency_s, -m.psnr_db)


def _strategies(strategy: str | Sequence[str] | None, backend: str) -> list[str]:
    if isinstance(strategy, str):
        return [strategy]
    if strategy is not None:
        return list(strategy)
    served: list[str] = []
    for report in list_backends():
        if backend != "auto" and report.name != backend.replace("-", "_"):
            continue
        served += [s for s in report.available_strategies if s not in served]
    tunable = [s for s in served if get_strategy(s).sweep is not None]
    if not tunable:
        raise TuneError(f"backend {backend!r} serves no strategy with a threshold or interval to tune")
    return tunable


# -- evaluation ---------------------------------------------------------------------------------


class Evaluator:
    """Runs configs on seeds and remembers every output, so no (config, case, seed) runs twice.

    The uncached outputs are computed once per (case, seed) with no cache installed.
    """

    def __init__(self, pipe: Any, cases: dict[str, CallKwargs], extract: Extract, data_range: float | None,
                 agreement: Callable[[torch.Tensor], float] | None, blocks: Any,
                 on_eval: Callable[[str], None] | None) -> None:
        self.pipe, self.cases, self.extract, self.data_range = pipe, cases, extract, data_range
        self.agreement, self.blocks, self.on_eval = agreement, blocks, on_eval
        self._references: dict[tuple[str, int], torch.Tensor] = {}
        self._runs: dict[tuple[str, str, int], tuple[torch.Tensor, RunStats | None, float]] = {}
        self.backend_of: dict[str, str | None] = {}
        self.trace: list[dict[str, Any]] = []
        self.model_class = type(resolve_target(pipe).transformer).__name__
        self._calibrations: dict[tuple[str, tuple[int, ...]], dict[str, Any]] = {}

    def calibration(self, strategy: str, base: Mapping[str, Any], seeds: list[int]) -> dict[str, Any]:
        """The options :func:`phyai_cache.calibrate` measures for ``strategy`` on this pipeline (every
        case, the calibration seeds), unless ``base`` already gives them or there is nothing to calibrate."""
        spec = get_strategy(strategy)
        given = dict(base.get("options") or {})
        if spec.calibration is None or any(name in given for name in spec.calibration.options):
            return {}
        key = (strategy, tuple(seeds))
        if key not in self._calibrations:
            from ..calibration import calibrate

            result = calibrate(self.pipe, list(self.cases.values()), strategy=strategy, seeds=seeds,
                               blocks=self.blocks)
            self._calibrations[key] = result.options
            self.note(f"calibrated {strategy} on seeds {seeds}: {', '.join(result.options)}")
        return dict(self._calibrations[key])

    def note(self, message: str) -> None:
        logger.info("tune: %s", message)
        if self.on_eval is not None:
            self.on_eval(message)

    def try_measure(self, config: DiTCacheConfig, seeds: list[int], target: float) -> Measurement | None:
        """Like :meth:`measure`, but a config that fails to run is recorded and counts as failing."""
        try:
            measured = self.measure(config, seeds)
        except Exception as error:  # noqa: BLE001 - a config that cannot run is a failed candidate
            self.note(f"{_describe(config)}: cannot run ({error})")
            self.trace.append({"config": _describe(config), "error": str(error)})
            return None
        passed = measured.meets(target)
        self.note(f"{_describe(config)}: {measured.psnr_db:.2f} dB, "
                  f"{_pct(measured.compute_fraction)} of blocks -> {'meets' if passed else 'misses'} {target:g} dB")
        self.trace.append({"config": _describe(config), "psnr_db": _round(measured.psnr_db, 2),
                           "compute_fraction": _round(measured.compute_fraction, 4), "meets": passed})
        return measured

    def measure(self, config: DiTCacheConfig, seeds: list[int]) -> Measurement:
        by_case, fractions, latencies, scores = {}, [], [], []
        steps_cached = steps_total = 0
        for name in self.cases:
            cached, references, runs, seconds = self._case_outputs(config, name, seeds)
            steps_cached += sum(r.steps_cached for r in runs if r is not None)
            steps_total += sum(r.steps_total for r in runs if r is not None)
            q = quality(cached, references, self.data_range, self.agreement)
            blocks_total = sum(r.blocks_total for r in runs if r is not None)
            fraction = sum(r.blocks_computed for r in runs if r is not None) / blocks_total if blocks_total else None
            by_case[name] = {"psnr_db": q["psnr_db"], "ssim": q["ssim"], "agreement": q["agreement"],
                             "compute_fraction": fraction, "latency_s": statistics.mean(seconds)}
            fractions.append(fraction)
            latencies.append(statistics.mean(seconds))
            scores.append(q["agreement"])
        known = [f for f in fractions if f is not None]
        ssims = [c["ssim"] for c in by_case.values() if c["ssim"] is not None]
        return Measurement(
            seeds=list(seeds), psnr_db=min(c["psnr_db"] for c in by_case.values()), ssim=min(ssims) if ssims else None,
            compute_fraction=statistics.mean(known) if len(known) == len(fractions) else None,
            latency_s=sum(latencies), agreement=statistics.mean(scores) if None not in scores else None,
            cached_fraction=steps_cached / steps_total if steps_total else 0.0, by_case=by_case,
        )

    def _case_outputs(self, config: DiTCacheConfig, case: str, seeds: list[int]
                      ) -> tuple[torch.Tensor, torch.Tensor, list[RunStats | None], list[float]]:
        references = torch.cat([self.reference(case, s) for s in seeds])
        missing = [s for s in seeds if (_key(config), case, s) not in self._runs]
        if missing:
            self._run_cached(config, case, missing)
        runs = [self._runs[(_key(config), case, s)] for s in seeds]
        return torch.cat([r[0] for r in runs]), references, [r[1] for r in runs], [r[2] for r in runs]

    def reference(self, case: str, seed: int) -> torch.Tensor:
        if (case, seed) not in self._references:
            _, output = timed_call(self.pipe, self.cases[case](seed))
            self._references[(case, seed)] = self.extract(output)
        return self._references[(case, seed)]

    def _run_cached(self, config: DiTCacheConfig, case: str, seeds: list[int]) -> None:
        handle = enable_dit_cache(self.pipe, config, blocks=self.blocks)
        try:
            self.backend_of[_key(config)] = handle.backend
            for seed in seeds:
                seconds, output = timed_call(self.pipe, self.cases[case](seed))
                self._runs[(_key(config), case, seed)] = (self.extract(output), handle.last_run, seconds)
        finally:
            handle.disable()

    def _timed(self, config: DiTCacheConfig | None, make_kwargs: CallKwargs, seed: int) -> tuple[float, None]:
        """Seconds of one call for ``seed``, with ``config``'s cache enabled around it (None: uncached)."""
        kwargs = make_kwargs(seed)
        if config is None:
            return timed_call(self.pipe, kwargs)[0], None
        with enable_dit_cache(self.pipe, config, blocks=self.blocks):
            return timed_call(self.pipe, kwargs)[0], None

    def speedup(self, config: DiTCacheConfig, seeds: list[int], pairs: int) -> dict[str, float | None]:
        """Median of interleaved uncached/cached pair ratios per case (:func:`.measure.interleaved_pairs`,
        seeds cycled). The cache is enabled only around each cached call (the pipeline cannot be
        copied), outside the timing."""
        result = {}
        for case, make_kwargs in self.cases.items():
            order = [seeds[i % len(seeds)] for i in range(pairs)]
            timing = interleaved_pairs(partial(self._timed, None, make_kwargs),
                                       partial(self._timed, config, make_kwargs), order)
            result[case] = timing.speedup
            self.note(f"timing {case}: {_describe(config)} speedup {result[case]:.2f}x over {pairs} pairs")
        return result


# -- helpers ------------------------------------------------------------------------------------


def _key(config: DiTCacheConfig) -> str:
    return repr(sorted(config.to_dict().items()))


def _preset_config(config: DiTCacheConfig) -> dict[str, Any]:
    """The config as a preset writes it: the switch, backend, strategy and the fields it uses."""
    data = config.to_dict()
    used = get_strategy(config.strategy).fields
    kept = {"enabled": True, "backend": data["backend"], "strategy": data["strategy"]}
    for name in used:
        value = data[name]
        if value is None or (name == "active_steps" and value == [0, None]):
            continue
        if name in get_strategy(config.strategy).fixed:
            continue  # defines the strategy (fbcache is F1 B0)
        kept[name] = value
    if data["separate_cfg"] != "auto":
        kept["separate_cfg"] = data["separate_cfg"]
    if data["options"]:
        kept["options"] = data["options"]
    if data["calibrated_on"]:
        kept["calibrated_on"] = data["calibrated_on"]
    return kept


def _round_case(case: Mapping[str, Any]) -> dict[str, Any]:
    digits = {"psnr_db": 2, "ssim": 4, "agreement": 3, "compute_fraction": 4, "latency_s": 3}
    return {k: _round(v, digits.get(k, 4)) for k, v in case.items()}


class _PresetDumper(yaml.SafeDumper):
    """Short lists of numbers (steps, seeds) on one line, the rest in block style."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(isinstance(item, (int, float, str)) or item is None for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_PresetDumper.add_representer(list, _represent_list)


def _describe(config: DiTCacheConfig) -> str:
    parts = [config.strategy]
    spec = get_strategy(config.strategy)
    for name, short in (("threshold", "t"), ("cache_interval", "n"), ("front_blocks", "F"), ("back_blocks", "B"),
                        ("taylorseer_order", "o"), ("max_consecutive_cached", "K")):
        value = getattr(config, name)
        if name == "max_consecutive_cached" and value == spec.defaults.get(name):
            continue
        if value is not None and name in spec.fields and name not in spec.fixed:
            parts.append(f"{short}={value:g}" if isinstance(value, float) else f"{short}={value}")
    if config.options.get("skip_call"):
        parts.append("skip-call")
    if config.options.get("verify") is not None:
        parts.append(f"verify={config.options['verify']:g}")
    for steps, points in (config.options.get("schedule") or {}).items():
        parts.append(f"schedule{steps}={','.join(map(str, points))}")
    return " ".join(parts)


def _round(value: float | None, digits: int) -> float | None:
    if value is None or not isinstance(value, (int, float)):
        return value
    return None if not math.isfinite(value) else round(float(value), digits)


def _pct(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{fraction * 100:.0f}%"
