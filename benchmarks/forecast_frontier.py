"""Issue 21's same-run comparisons: forecaster variants, and the taylorseer presets before and after.

    python benchmarks/forecast_frontier.py forecasters --model reference --steps 50 --intervals 8,12
    python benchmarks/forecast_frontier.py presets --model reference --steps 50 --batch-size 10 --repeats 2

``forecasters``: taylorseer with whole-call skipping at each interval, once per forecaster variant
(order, ``options.forecast``, ``options.forecast_axis``), so every row at one interval computes the
same steps and only the forecast differs. ``presets``: the previous taylorseer presets' configs
(every 3rd / 4th / 7th step, order 1) against the shipped ones (calibrated schedules) and two plain
whole-call intervals. One run of :func:`phyai_cache_lab.bench.runner.run_bench` each: every row shares the
uncached reference and the interleaved timing. The forms dropped after measuring (Hermite, FoCa,
frequency split) are in commit 53b4067 of branch ``forecast``; run this script from that commit's
tree with ``--variants`` naming them to reproduce their rows in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json

import torch

from phyai_cache_lab.bench.models import workload_factory
from phyai_cache_lab.bench.runner import BenchOptions, run_bench
from phyai_cache_lab.bench.sweep import SweepEntry

VARIANTS = [["taylor o1 (step)", 1, {}], ["time o1", 1, {"forecast_axis": "time"}], ["taylor o2", 2, {}],
            ["newton o2 (time)", 2, {"forecast": "newton", "forecast_axis": "time"}]]
PREVIOUS = {"taylorseer-quality": 3, "taylorseer-balanced": 4, "taylorseer-fast": 7}  # their cache_interval


def forecaster_entries(intervals: list[int], variants: list) -> list[SweepEntry]:
    return [SweepEntry(f"n={n} {label}", "native", "taylorseer",
                       {"cache_interval": n, "taylorseer_order": order, "warmup_steps": 2,
                        "options": {"skip_call": True, **options}})
            for n in intervals for label, order, options in variants]


# taylorseer-quality's and -balanced's schedules, and the searched 5-of-50 one of docs/benchmarks.md.
TARGET_SCHEDULES = {50: {"6 of 50": [0, 5, 12, 22, 33, 44], "5 of 50": [0, 2, 14, 28, 43], "4 of 50": [0, 8, 20, 38]},
                    20: {"5 of 20": [0, 2, 6, 12, 17], "4 of 20": [0, 4, 10, 17]}}


def target_entries(steps: int, timestep_scale: float, intervals: list[int]) -> list[SweepEntry]:
    """The call's output (velocity) forecast against the data prediction's (options.forecast_target)."""
    plans = [(name, {"schedule": {str(steps): schedule}}) for name, schedule in TARGET_SCHEDULES.get(steps, {}).items()] + [(f"n={n}", {"cache_interval": n}) for n in intervals]
    entries = []
    for name, plan in plans:
        interval = plan.pop("cache_interval", 3)
        for order in (1, 2):
            for target in ("output", "data", "noise"):
                data = {"forecast_target": target, "timestep_scale": timestep_scale} if target != "output" else {}
                entries.append(SweepEntry(f"{name} o{order} {target}", "native", "taylorseer",
                                          {"cache_interval": interval, "taylorseer_order": order, "warmup_steps": 2,
                                           "options": {"skip_call": True, **plan, **data}}))
    return entries


def preset_entries() -> list[SweepEntry]:
    entries = []
    for name, interval in PREVIOUS.items():
        entries.append(SweepEntry(f"before: {name} (n={interval} o=1)", "native", "taylorseer",
                                  {"cache_interval": interval, "taylorseer_order": 1, "warmup_steps": 2}))
        entries.append(SweepEntry(f"after: {name}", "native", "taylorseer", preset=name))
    for interval in (8, 12):
        entries.append(SweepEntry(f"taylorseer n={interval} skip-call", "native", "taylorseer",
                                  {"cache_interval": interval, "taylorseer_order": 1, "warmup_steps": 2,
                                   "options": {"skip_call": True}}))
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("forecasters", "presets", "targets"))
    parser.add_argument("--model", choices=("reference", "video"), default="reference")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--intervals", default="8,12")
    parser.add_argument("--variants", help="JSON list of [label, order, options]; default: the shipped forms")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.what == "forecasters":
        variants = json.loads(args.variants) if args.variants else VARIANTS
        entries = forecaster_entries([int(n) for n in args.intervals.split(",")], variants)
    elif args.what == "targets":
        scale = 1.0 if args.model == "reference" else 1000.0  # FluxPipeline passes sigma; Wan's UniPC 1000 sigma
        entries = target_entries(args.steps, scale, [int(n) for n in args.intervals.split(",") if n])
    else:
        entries = preset_entries()
    model = {} if args.model == "reference" else {"workload_factory": workload_factory(args.model)}
    options = BenchOptions(steps=(args.steps,), batch_size=args.batch_size, repeats=args.repeats,
                           include_presets=False)
    report = run_bench(options, entries=entries, **model)
    print("| config | computed | ideal | speedup | measured / ideal | PSNR |\n|---|---|---|---|---|---|")
    for row in report.rows:
        m = row.measured or {}
        computed = (m.get("steps_total") or 0) - (m.get("steps_cached") or 0)
        ideal, speedup = m.get("ideal_speedup") or float("nan"), m.get("speedup") or float("nan")
        print(f"| {row.name} | {computed:g}/{m.get('steps_total') or 0:g} | {ideal:.2f}x | {speedup:.2f}x | "
              f"{speedup / ideal:.2f} | {m.get('psnr_db', float('nan')):.2f} dB | {row.error or ''}")


if __name__ == "__main__":
    main()
