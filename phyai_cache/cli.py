"""``phyai-cache``: inspect backends and presets and validate configs; the lab adds bench, tune, demo, ..."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any

import yaml

from .config import list_presets, load_config, preset_path
from .errors import PhyaiCacheError

COMMANDS_ENTRY_POINT = "phyai_cache.commands"
LAB_COMMANDS = ("bench", "tune", "calibrate", "demo", "support", "serve", "bench-serving")


def main(argv: Sequence[str] | None = None) -> int:
    parser, commands = _parser()
    hint = _lab_hint(sys.argv[1:] if argv is None else list(argv), set(commands.choices))
    if hint is not None:
        print(f"error: {hint}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except PhyaiCacheError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def _parser() -> tuple[argparse.ArgumentParser, Any]:
    """The parser, and its subcommands (``.choices``: name -> parser)."""
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

    _add_extension_commands(commands)
    return parser, commands


def _add_extension_commands(commands: Any) -> None:
    """Subcommands other installed packages register under the ``phyai_cache.commands`` entry point.

    The lab (``phyai-cache-lab``: bench, tune, calibrate, demo, support, serve, bench-serving) is one;
    the library never imports it.
    """
    for entry in entry_points(group=COMMANDS_ENTRY_POINT):
        entry.load()(commands)


def _lab_hint(words: list[str], known: set[str]) -> str | None:
    """What to install when a lab command is asked for and the lab is not installed."""
    if words and words[0] in LAB_COMMANDS and words[0] not in known:
        return (f"`phyai-cache {words[0]}` comes with the lab package (benchmarks and reference models), which "
                "is not installed: pip install -e ./lab from a phyai-cache checkout (see README)")
    return None


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
    config = load_config(args.source, **parse_overrides(args.set))
    print(config.to_yaml(), end="")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    config = load_config(args.source)
    state = "enabled" if config.enabled else "disabled"
    print(f"ok: {args.source} is a valid dit_cache config ({state}, strategy {config.strategy})")
    return 0


def parse_overrides(items: list[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --set expects FIELD=VALUE, got {item!r}")
        overrides[name.strip()] = yaml.safe_load(value)
    return overrides


if __name__ == "__main__":
    sys.exit(main())
