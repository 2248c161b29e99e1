"""``phyai-cache``: inspect backends and presets, validate configs, and run the demo."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from .cli_options import add_threads_option, apply_threads
from .config import DiTCacheConfig, list_presets, load_config, preset_path
from .errors import PhyaiCacheError


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except PhyaiCacheError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phyai-cache", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    backends = commands.add_parser("backends", help="which backends and strategies are available here")
    backends.add_argument("--json", action="store_true", help="machine-readable output")
    backends.set_defaults(func=cmd_backends)

    presets = commands.add_parser("presets", help="list the shipped presets")
    presets.set_defaults(func=cmd_presets)

    show = commands.add_parser("show", help="print the fully resolved config of a preset or YAML file")
    show.add_argument("source", help="preset name or YAML path")
    show.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override a field (YAML value syntax), e.g. --set threshold=0.2")
    show.set_defaults(func=cmd_show)

    validate = commands.add_parser("validate", help="check a YAML config; exit 1 with the field error if invalid")
    validate.add_argument("source", help="YAML path or preset name")
    validate.set_defaults(func=cmd_validate)

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

    support = commands.add_parser("support", help="measure the DiT family x backend x strategy support table")
    support.add_argument("--write", metavar="PATH", help="write the Markdown table there (docs/support.md)")
    support.add_argument("--check", metavar="PATH", help="exit 1 if the file there differs from a fresh table")
    support.set_defaults(func=cmd_support)
    _add_extension_commands(commands)
    return parser


def _add_extension_commands(commands: Any) -> None:
    """Subcommands that live with their feature (e.g. ``bench``/``tune`` in phyai_cache.bench)."""
    import importlib

    for module_name in ("phyai_cache.bench.cli", "phyai_cache.serving.cli"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name and module_name.startswith(error.name):
                continue  # feature not present in this build
            raise
        module.add_commands(commands)


def cmd_support(args: argparse.Namespace) -> int:
    from .testing.support_table import run

    return run(args)


def cmd_backends(args: argparse.Namespace) -> int:
    from .registry import list_backends

    reports = list_backends()
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
        return 0
    for report in reports:
        state = f"{report.version}" if report.installed else "not installed"
        print(f"{report.name} ({state}): {report.description}")
        for strategy, support in report.strategies.items():
            mark = "yes" if support.available else "no "
            why = "" if support.available else f"  - {support.reason}"
            if support.min_version and not support.available:
                why += f" (needs >= {support.min_version})"
            print(f"  {mark} {strategy}{why}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    for name in list_presets():
        meta = yaml.safe_load(preset_path(name).read_text()).get("preset", {}) or {}
        config = load_config(name)
        calibrated = "calibrated" if meta.get("calibrated") else "uncalibrated"
        print(f"{name:24s} {config.strategy:10s} threshold={config.threshold}  {meta.get('trades', '')} "
              f"[{calibrated}]")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    config = load_config(args.source, **_overrides(args.set))
    print(config.to_yaml(), end="")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    config = load_config(args.source)
    state = "enabled" if config.enabled else "disabled"
    print(f"ok: {args.source} is a valid dit_cache config ({state}, strategy {config.strategy})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .bench.cli import ProgressBar
    from .bench.demo import demo_workload, run_demo

    apply_threads(args)
    config = load_config(args.config, **_overrides(args.set))
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


def _overrides(items: list[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --set expects FIELD=VALUE, got {item!r}")
        overrides[name.strip()] = yaml.safe_load(value)
    return overrides


def _compact(config: DiTCacheConfig) -> dict[str, Any]:
    return {k: v for k, v in config.to_dict().items() if v not in (None, {}, "auto")}


if __name__ == "__main__":
    sys.exit(main())
