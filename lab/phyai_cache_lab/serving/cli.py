"""``phyai-cache serve`` and ``phyai-cache bench-serving`` (registered by ``phyai_cache.cli``)."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from phyai_cache_lab.cli_options import add_cfg_option, add_threads_option, apply_threads

from .trace import DEFAULT_TIERS, TIERS


def add_commands(subparsers: Any) -> None:
    serve = subparsers.add_parser(
        "serve", help="run the reference step-level serving loop on a seeded arrival trace",
        description="Serves a seeded Poisson trace of requests (mixed cache tiers) on the reference model with "
                    "step-level batches and per-row cache decisions, and prints each request's latency and "
                    "cache stats.")
    _trace_arguments(serve)
    serve.add_argument("--rate", type=float, default=20.0, help="arrivals per second (default 20)")
    serve.add_argument("--per-batch", action="store_true", help="per-batch decisions instead of per-row")
    serve.set_defaults(func=cmd_serve)

    bench = subparsers.add_parser(
        "bench-serving", help="no cache vs per-batch vs per-row decisions on one arrival trace",
        description="Runs the same seeded trace in three modes side by side (rounds in alternating order), "
                    "generates every request alone (uncached and with its own config) to compare, and writes "
                    "serving.json, serving.md and serving.png to --out.")
    _trace_arguments(bench)
    bench.add_argument("--load", type=float, default=4.0,
                       help="arrival rate as a multiple of the uncached capacity (default 4: every mode saturated)")
    bench.add_argument("--rounds", type=int, default=2, help="rounds of the three modes (default 2)")
    bench.add_argument("--out", default="bench_out", metavar="DIR", help="output folder (default bench_out/)")
    bench.set_defaults(func=cmd_bench_serving)


def _trace_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=48, help="requests in the trace (default 48)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per request (default 20)")
    add_cfg_option(parser, help="true CFG, cond and uncond rows batched together")
    parser.add_argument("--max-rows", type=int, default=16, help="rows per transformer call (default 16)")
    parser.add_argument("--tiers", default=",".join(DEFAULT_TIERS),
                        help=f"comma list of tiers among {', '.join(TIERS)} (default {','.join(DEFAULT_TIERS)})")
    parser.add_argument("--seed", type=int, default=0, help="trace seed (default 0)")
    add_threads_option(parser)


def cmd_serve(args: argparse.Namespace) -> int:
    from phyai_cache import enable_dit_cache
    from phyai_cache_lab import reference

    from .engine import StepEngine
    from .trace import make_trace

    apply_threads(args)
    pipe = reference.load_pipeline()
    handle = enable_dit_cache(pipe, enabled=True, backend="native", strategy="fbcache")
    trace = make_trace(args.requests, args.rate, args.seed, args.steps, args.cfg, _tiers(args.tiers))
    engine = StepEngine(pipe, handle, args.max_rows, per_row=not args.per_batch)
    print(f"serve: {len(trace)} requests at {args.rate:g}/s, up to {args.max_rows} rows per call, "
          f"{'per-batch' if args.per_batch else 'per-row'} decisions")
    print(f"{'request':8s} {'tier':9s} {'latency s':>9s} {'steps cached':>12s} {'blocks computed':>15s}")

    def report(done: Any) -> None:
        stats = done.stats
        print(f"{done.request.request_id:8s} {done.request.tier:9s} {done.latency_s:9.2f} "
              f"{stats.steps_cached:5d}/{stats.steps_total:<6d} {stats.blocks_computed:7d}/{stats.blocks_total}")

    finished = engine.run(trace, on_finish=report)
    handle.disable()
    totals = engine.totals
    latencies = sorted(c.latency_s for c in finished)
    print(f"{len(finished)} requests in {max(c.finished_s for c in finished):.2f} s; "
          f"p50 latency {statistics.median(latencies):.2f} s; {totals.forwards} transformer calls, "
          f"{statistics.mean(totals.batch_sizes):.1f} rows per call; "
          f"{totals.row_blocks_computed / totals.row_blocks_total:.1%} of row-blocks computed")
    return 0


def cmd_bench_serving(args: argparse.Namespace) -> int:
    from ..bench.cli import ProgressBar
    from .bench import ServingOptions, latency_figure, markdown, run_serving_bench, to_dict

    apply_threads(args)
    options = ServingOptions(num_requests=args.requests, load=args.load, seed=args.seed, steps=args.steps,
                             cfg_scale=args.cfg, max_rows=args.max_rows, rounds=args.rounds,
                             tiers=_tiers(args.tiers))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"bench-serving: {options.num_requests} requests, load {options.load:g}x, {options.rounds} rounds")
    report = run_serving_bench(options, progress=ProgressBar())
    (out / "serving.json").write_text(json.dumps(to_dict(report), indent=2), encoding="utf-8")
    table = markdown(report)
    (out / "serving.md").write_text(table + "\n", encoding="utf-8")
    files = [out / "serving.json", out / "serving.md"]
    try:
        files.append(latency_figure(report, out / "serving.png"))
    except ImportError:
        print("note: matplotlib is not installed (pip install 'phyai-cache[bench]'); figure skipped")
    print()
    print(table)
    print(f"done in {report.elapsed_s:.0f} s; wrote " + ", ".join(str(f) for f in files))
    return 0


def _tiers(text: str) -> tuple[str, ...]:
    tiers = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in tiers if t not in TIERS]
    if not tiers or unknown:
        raise SystemExit(f"--tiers: unknown {unknown or text!r}; known: {', '.join(TIERS)}")
    return tiers
