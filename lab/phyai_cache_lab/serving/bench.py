"""``phyai-cache bench-serving``: no cache vs per-batch vs per-row decisions on one arrival trace.

Three modes serve the same seeded trace (mixed tiers) in one process:

* ``uncached``: the untouched model (no cache handle at all);
* ``per_batch``: every request with its tier's cache, but a batch skips its middle blocks only when
  every row would (what serving peers do: one decision per transformer call);
* ``per_row``: every row group decided on its own rows; the middle blocks run only on the rows that
  must compute.

The modes run in rounds, in alternating order (ABC, CBA, ...), so load on shared cores affects them
alike; throughput is the median over rounds. Every request is also generated alone, uncached and
with its own config, and each batched output is compared with both (PSNR on the images), and each
per-row request's decisions with its solo run's.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .engine import Completed, ServeRequest, StepEngine, serve_one
from .trace import DEFAULT_TIERS, make_trace

MODES = ("uncached", "per_batch", "per_row")

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ServingOptions:
    num_requests: int = 48
    load: float = 4.0  # arrival rate as a multiple of the uncached engine's capacity (>1: saturated)
    seed: int = 0
    steps: int = 20
    cfg_scale: float | None = None
    max_rows: int = 16
    rounds: int = 2
    tiers: tuple[str, ...] = DEFAULT_TIERS


@dataclass
class ModeRound:
    mode: str
    makespan_s: float
    busy_s: float
    forwards: int
    mean_rows: float
    compute_fraction: float  # row-blocks that ran / row-blocks an uncached engine runs
    latencies_s: list[float]

    @property
    def throughput(self) -> float:
        return len(self.latencies_s) / self.makespan_s


@dataclass
class RequestRow:
    request_id: str
    tier: str
    steps_cached: int
    psnr_vs_uncached: dict[str, float]  # mode -> PSNR against the request generated alone, uncached
    psnr_vs_solo: float  # per-row mode against the request generated alone with its own config
    same_decisions: bool  # per-row mode's decisions equal the solo run's


@dataclass
class ServingReport:
    options: ServingOptions
    rate_per_s: float
    capacity_per_s: float
    rounds: list[ModeRound]
    requests: list[RequestRow]
    elapsed_s: float
    notes: list[str] = field(default_factory=list)

    def of(self, mode: str) -> list[ModeRound]:
        return [r for r in self.rounds if r.mode == mode]

    def throughput(self, mode: str) -> float:
        return statistics.median(r.throughput for r in self.of(mode))

    def latency(self, mode: str, quantile: float) -> float:
        """The latency quantile of the round with the median throughput."""
        rounds = sorted(self.of(mode), key=lambda r: r.throughput)
        return _quantile(rounds[len(rounds) // 2].latencies_s, quantile)

    def speedup(self, mode: str, over: str) -> float:
        """Median over rounds of ``mode``'s throughput over ``over``'s in the same round (rounds run
        back to back, so a load change on shared cores hits both sides of a ratio alike)."""
        return statistics.median(a.throughput / b.throughput for a, b in zip(self.of(mode), self.of(over)))

    def compute_fraction(self, mode: str) -> float:
        return statistics.median(r.compute_fraction for r in self.of(mode))

    def summary(self) -> dict[str, Any]:
        modes = {m: {"throughput_req_s": self.throughput(m), "p50_latency_s": self.latency(m, 0.5),
                     "p95_latency_s": self.latency(m, 0.95), "compute_fraction": self.compute_fraction(m),
                     "mean_rows_per_call": statistics.mean(r.mean_rows for r in self.of(m))} for m in MODES}
        per_row = [r for r in self.requests]
        cached = [r for r in per_row if r.tier != "uncached"]
        return {
            "modes": modes,
            "per_row_vs_per_batch": self.speedup("per_row", "per_batch"),
            "per_row_vs_uncached": self.speedup("per_row", "uncached"),
            "per_batch_vs_uncached": self.speedup("per_batch", "uncached"),
            "per_row_ideal_vs_uncached": 1.0 / self.compute_fraction("per_row"),
            "per_row_decisions_identical_to_solo": sum(r.same_decisions for r in per_row),
            "requests": len(per_row),
            "min_psnr_per_row_vs_solo": min((r.psnr_vs_solo for r in cached), default=math.inf),
        }


def run_serving_bench(options: ServingOptions = ServingOptions(), progress: Progress | None = None) -> ServingReport:
    from phyai_cache import enable_dit_cache
    from phyai_cache_lab import reference

    started = time.perf_counter()
    plain = reference.load_pipeline()
    cached = reference.load_pipeline()
    handle = enable_dit_cache(cached, enabled=True, backend="native", strategy="fbcache")
    try:
        capacity = _capacity(plain, options)
        rate = options.load * capacity
        trace = make_trace(options.num_requests, rate, options.seed, options.steps, options.cfg_scale, options.tiers)
        total = options.rounds * len(MODES) + 2 * len(trace)
        done = 0

        def tick(label: str) -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total, label)

        rounds, outputs = [], {}
        for index in range(options.rounds):
            for mode in (MODES if index % 2 == 0 else MODES[::-1]):
                engine = _engine(mode, plain, cached, handle, options)
                result, finished = _serve(engine, trace, mode)
                rounds.append(result)
                outputs.setdefault(mode, {r.request.request_id: r for r in finished})
                tick(f"round {index + 1}: {mode}")
        requests = _compare_with_solo(trace, outputs, plain, cached, handle, tick)
    finally:
        assert not handle.open_requests, "the serving bench left requests open"
        handle.disable()
    return ServingReport(options, rate, capacity, rounds, requests, time.perf_counter() - started)


def _engine(mode: str, plain: Any, cached: Any, handle: Any, options: ServingOptions) -> StepEngine:
    if mode == "uncached":
        return StepEngine(plain, None, options.max_rows)
    return StepEngine(cached, handle, options.max_rows, per_row=(mode == "per_row"))


def _serve(engine: StepEngine, trace: list[ServeRequest], mode: str) -> tuple[ModeRound, list[Completed]]:
    began = time.perf_counter()
    finished = engine.run(trace)
    makespan = time.perf_counter() - began
    # The engine skips idle gaps: the makespan on its clock is the last finish time.
    makespan = max(c.finished_s for c in finished)
    totals = engine.totals
    return ModeRound(mode, makespan, totals.busy_s, totals.forwards, statistics.mean(totals.batch_sizes),
                     totals.row_blocks_computed / totals.row_blocks_total,
                     [c.latency_s for c in finished]), finished


def _capacity(plain: Any, options: ServingOptions) -> float:
    """Requests per second the uncached engine completes with every call full: one full batch of
    requests served from start to end (after a warm-up batch), the faster of two."""
    from phyai_cache_lab import reference

    engine = StepEngine(plain, None, options.max_rows)
    requests = [ServeRequest(f"c{i}", label=i % reference.NUM_CLASSES, seed=i, num_inference_steps=options.steps,
                             cfg_scale=options.cfg_scale)
                for i in range(options.max_rows // (2 if options.cfg_scale else 1))]
    timings = []
    for _ in range(3):
        began = time.perf_counter()
        engine.run(requests)
        timings.append(time.perf_counter() - began)
    return len(requests) / min(timings[1:])


def _compare_with_solo(trace: list[ServeRequest], outputs: dict[str, dict[str, Completed]], plain: Any,
                       cached: Any, handle: Any, tick: Callable[[str], None]) -> list[RequestRow]:
    from phyai_cache.tuning import psnr
    from phyai_cache_lab import reference

    def images(latents: torch.Tensor) -> torch.Tensor:
        return reference.latents_to_images(latents)

    rows = []
    for request in trace:
        alone_uncached = serve_one(plain, request)
        tick(f"solo uncached {request.request_id}")
        alone_same = serve_one(cached, request, handle)
        tick(f"solo {request.tier} {request.request_id}")
        per_row = outputs["per_row"][request.request_id]
        rows.append(RequestRow(
            request.request_id, request.tier, per_row.stats.steps_cached,
            {mode: float(psnr(images(outputs[mode][request.request_id].latents), images(alone_uncached.latents), 1.0))
             for mode in MODES},
            float(psnr(images(per_row.latents), images(alone_same.latents), 1.0)),
            per_row.decisions == alone_same.decisions,
        ))
    return rows


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# -- reporting ----------------------------------------------------------------------------------


def markdown(report: ServingReport) -> str:
    o, s = report.options, report.summary()
    lines = [
        f"Trace: {o.num_requests} requests, Poisson arrivals at {report.rate_per_s:.1f}/s "
        f"({o.load:g}x the uncached capacity of {report.capacity_per_s:.1f}/s), tiers {', '.join(o.tiers)}, "
        f"{o.steps} steps{f', true CFG {o.cfg_scale:g}' if o.cfg_scale else ''}, up to {o.max_rows} rows per call, "
        f"seed {o.seed}, {o.rounds} rounds in alternating order.",
        "",
        "| mode | throughput (req/s, median) | vs uncached (median of per-round ratios) | p50 latency (s) | "
        "p95 latency (s) | row-blocks computed | rows per call |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        m = s["modes"][mode]
        lines.append(f"| {mode} | {m['throughput_req_s']:.2f} | {report.speedup(mode, 'uncached'):.2f}x | "
                     f"{m['p50_latency_s']:.2f} | {m['p95_latency_s']:.2f} | {m['compute_fraction']:.1%} | "
                     f"{m['mean_rows_per_call']:.1f} |")
    lines += ["", f"per-row vs per-batch throughput: **{s['per_row_vs_per_batch']:.2f}x**; per-row vs uncached: "
                  f"**{s['per_row_vs_uncached']:.2f}x** (its block-count ideal, 1 / row-blocks computed: "
                  f"{s['per_row_ideal_vs_uncached']:.2f}x). Per-row requests with decisions identical to their "
                  f"solo run: **{s['per_row_decisions_identical_to_solo']}/{s['requests']}**; lowest PSNR of a "
                  f"cached request against its solo run with the same config: "
                  f"**{s['min_psnr_per_row_vs_solo']:.1f} dB**.", ""]
    lines += ["| tier | requests | steps cached (mean) | PSNR vs uncached solo: per_batch | per_row | "
              "per_row vs same-config solo (min) |", "|---|---|---|---|---|---|"]
    for tier in o.tiers:
        rows = [r for r in report.requests if r.tier == tier]
        if not rows:
            continue
        lines.append(f"| {tier} | {len(rows)} | {statistics.mean(r.steps_cached for r in rows):.1f} | "
                     f"{_db(min(r.psnr_vs_uncached['per_batch'] for r in rows))} | "
                     f"{_db(min(r.psnr_vs_uncached['per_row'] for r in rows))} | "
                     f"{_db(min(r.psnr_vs_solo for r in rows))} |")
    lines.append("")
    lines.append("PSNR columns are the minimum over the tier's requests (inf: bit-identical).")
    return "\n".join(lines)


def _db(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.1f}"


def to_dict(report: ServingReport) -> dict[str, Any]:
    import dataclasses

    return {"options": dataclasses.asdict(report.options), "rate_per_s": report.rate_per_s,
            "capacity_per_s": report.capacity_per_s, "summary": report.summary(), "elapsed_s": report.elapsed_s,
            "rounds": [dataclasses.asdict(r) | {"throughput": r.throughput} for r in report.rounds],
            "requests": [dataclasses.asdict(r) for r in report.requests]}


def latency_figure(report: ServingReport, path: Any) -> Any:
    """Latency CDF per mode (median-throughput round) and throughput per mode, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in MODES:
        rounds = sorted(report.of(mode), key=lambda r: r.throughput)
        values = sorted(rounds[len(rounds) // 2].latencies_s)
        left.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=mode)
    left.set_xlabel("request latency (s)")
    left.set_ylabel("fraction of requests")
    left.set_title("latency distribution")
    left.legend()
    right.bar(list(MODES), [report.throughput(m) for m in MODES], color=["#999999", "#6a9fd4", "#2a6fb0"])
    right.set_ylabel("requests / s")
    right.set_title("throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
