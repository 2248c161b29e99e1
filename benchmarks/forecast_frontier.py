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
tree with ``--variants`` naming them to reproduce their rows in docs/benchmarks.md. The forecast
targets measured and dropped after (the data and noise predictions, ``options.forecast_target``) are
in commit 0b3fb7b of branch ``forecast-data``: its ``targets`` subcommand and
``benchmarks/forecast_target_schedules.py`` give their rows.
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
    parser.add_argument("what", choices=("forecasters", "presets"))
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
