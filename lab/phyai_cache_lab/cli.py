"""The lab's ``phyai-cache`` subcommands, registered through the ``phyai_cache.commands`` entry point.

``bench``, ``tune`` and ``calibrate`` (:mod:`.bench.cli`), ``serve`` and ``bench-serving``
(:mod:`.serving.cli`), and here ``demo`` (one config against the uncached run in detail) and
``support`` (the family x backend x strategy table).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from phyai_cache.cli import parse_overrides
from phyai_cache.config import DiTCacheConfig, load_config

from .bench import cli as bench_cli
from .bench.cli import ProgressBar
from .bench.demo import demo_workload, run_demo
from .cli_options import add_threads_option, apply_threads
from .serving import cli as serving_cli


def add_commands(commands: Any) -> None:
    _add_demo(commands)
    _add_support(commands)
    bench_cli.add_commands(commands)
    serving_cli.add_commands(commands)


def _add_demo(commands: Any) -> None:
    demo = commands.add_parser("demo", help="cached vs uncached on an embedded model")
    demo.add_argument("config", nargs="?", default="fbcache-balanced", help="preset name or YAML path")
    demo.add_argument("--model", choices=("auto", "reference", "tiny"), default="auto",
                      help="reference: the shipped trained digits DiT; tiny: a random-weight FluxPipeline")
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--repeats", type=int, default=3, help="timed pairs (median ratio is reported)")
    demo.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    demo.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    add_threads_option(demo)
    demo.set_defaults(func=cmd_demo)


def _add_support(commands: Any) -> None:
    support = commands.add_parser("support", help="measure the DiT family x backend x strategy support table")
    support.add_argument("--write", metavar="PATH", help="write the Markdown table there (docs/support.md)")
    support.add_argument("--check", metavar="PATH", help="exit 1 if the file there differs from a fresh table")
    support.set_defaults(func=cmd_support)


def cmd_support(args: argparse.Namespace) -> int:
    from .testing.support_table import run  # builds every tiny family: imported only when asked for

    return run(args)


def cmd_demo(args: argparse.Namespace) -> int:
    apply_threads(args)
    config = load_config(args.config, **parse_overrides(args.set))
    if not config.enabled:
        config = config.replace(enabled=True)
    workload = demo_workload(args.model, args.steps)
    print(f"workload: {workload.name}")
    print(f"config:   {args.config} -> " + json.dumps(_compact(config)))
    result = run_demo(workload, config, repeats=args.repeats, progress=ProgressBar())
    _print_result(result)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result.to_dict(), handle, indent=2, default=str)
    return 0


def _print_result(result: Any) -> None:
    stats, quality = result.stats, result.quality
    rows = [
        ("backend / strategy", f"{result.backend} / {result.config.strategy}"),
        ("steps cached", f"{stats.steps_cached} / {stats.steps_total}"),
        ("blocks computed", f"{stats.blocks_computed} / {stats.blocks_total} "
                            f"(ideal speedup {1 / max(stats.compute_fraction, 1e-9):.2f}x)"),
        ("latency uncached", f"{result.plain_latency_s * 1e3:.1f} ms (median)"),
        ("latency cached", f"{result.cached_latency_s * 1e3:.1f} ms (median)"),
        ("speedup", f"{result.speedup:.2f}x (median of {len(result.ratios)} interleaved pairs)"),
        ("peak memory", f"{stats.peak_memory_bytes / 2**20:.1f} MiB ({stats.memory_kind}); "
                        f"cache holds {stats.cache_bytes / 2**10:.1f} KiB"),
        ("PSNR vs uncached", f"{quality['psnr_db']:.2f} dB"),
        ("max abs / rel L1", f"{quality['max_abs']:.4f} / {quality['rel_l1']:.4f}"),
    ]
    print()
    for label, value in rows:
        print(f"  {label:20s} {value}")
    steps = " ".join("C" if r.decision == "cached" else "." for r in stats.records)
    print(f"  {'per step':20s} {steps}   (C = cached, . = computed)")


def _compact(config: DiTCacheConfig) -> dict[str, Any]:
    return {k: v for k, v in config.to_dict().items() if v not in (None, {}, "auto")}


