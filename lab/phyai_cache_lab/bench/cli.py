"""``phyai-cache bench`` and ``phyai-cache tune``: registered by ``phyai_cache.cli`` via :func:`add_commands`.

This module is the only part of :mod:`phyai_cache_lab.bench` that prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from phyai_cache_lab.cli_options import add_cfg_option, add_threads_option, apply_threads

DEFAULT_OUT = "bench_out"


def add_commands(subparsers: Any) -> None:
    _add_bench(subparsers)
    _add_tune(subparsers)
    _add_calibrate(subparsers)


# -- calibrate ----------------------------------------------------------------------------------


def _add_calibrate(subparsers: Any) -> None:
    calibrate = subparsers.add_parser(
        "calibrate", help="measure what magcache/teacache need on the reference model and write a preset",
        description="Runs the reference model uncached with the strategy in calibration mode and writes the "
                    "calibrated options (MagCache's magnitude ratios, TeaCache's polynomial) into a preset. "
                    "On your own pipeline use phyai_cache.calibrate(pipe, call_kwargs, strategy=...).")
    calibrate.add_argument("--strategy", required=True, help="magcache or teacache")
    _add_pipeline_option(calibrate)
    calibrate.add_argument("--steps", type=int, action="append", metavar="N",
                           help="denoising steps; repeat for one calibration per step count (default 20)")
    calibrate.add_argument("--seeds", default="100", help="comma list of seeds, one run each per step count")
    calibrate.add_argument("--batch-size", type=int, default=10)
    add_cfg_option(calibrate)
    calibrate.add_argument("--out", metavar="PATH", help="write the preset YAML here")
    calibrate.add_argument("--name", help="preset name (default: the --out file name)")
    add_threads_option(calibrate)
    calibrate.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from phyai_cache.calibration import calibrate

    apply_threads(args)
    steps = args.steps or [20]
    pipe, cases, model = _pipeline_cases(args, steps)
    print(f"calibrate {args.strategy}: {model['model']}, steps {steps}, seeds {args.seeds}")
    result = calibrate(pipe, list(cases.values()), strategy=args.strategy, seeds=_ints(args.seeds))
    print(yaml_dump({"options": result.options}), end="")
    if args.out:
        details = {"model": model["model"], "steps": steps, **model, "seeds": _ints(args.seeds),
                   "command": _command_line(args)}
        path = result.write_preset(args.out, args.name, details)
        print(f"wrote {path}")
    return 0


def _add_pipeline_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", metavar="MODULE:FUNCTION",
                        help="your own model instead of the reference one: FUNCTION(steps) in MODULE (importable, "
                             "or a .py path) returns (pipeline, call_kwargs), call_kwargs(seed) giving one pipeline "
                             "call's keyword arguments; the preset records the transformer class (calibrated_on)")


def _pipeline_cases(args: argparse.Namespace, steps: list[int]) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The pipeline to tune or calibrate, its call arguments per step count (``"20 steps": seed ->
    kwargs``) and what a preset says about it: the reference model, or ``--pipeline``'s."""
    if not args.pipeline:
        from .. import reference
        from .workload import reference_workload

        workloads = {f"{s} steps": reference_workload(s, args.batch_size, args.cfg) for s in steps}
        first = next(iter(workloads.values()))
        return (reference.load_pipeline(), {name: w.call_kwargs for name, w in workloads.items()},
                {"model": first.details["model"], "batch_size": args.batch_size, "cfg_scale": args.cfg})
    factory = _load_factory(args.pipeline)
    made = {f"{s} steps": factory(s) for s in steps}
    pipe = next(iter(made.values()))[0]
    return pipe, {name: kwargs for name, (_, kwargs) in made.items()}, {"model": args.pipeline}


def _load_factory(spec: str) -> Any:
    import importlib
    import importlib.util

    module_name, sep, function = spec.rpartition(":")
    if not sep or not module_name or not function:
        raise SystemExit(f"error: --pipeline expects MODULE:FUNCTION (or path/to/file.py:FUNCTION), got {spec!r}")
    if module_name.endswith(".py"):
        loader = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
        if loader is None or not Path(module_name).is_file():
            raise SystemExit(f"error: --pipeline: no such file {module_name!r}")
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    found = getattr(module, function, None)
    if not callable(found):
        raise SystemExit(f"error: --pipeline: {module_name} has no function {function!r}")
    return found


def yaml_dump(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, width=110)


# -- bench --------------------------------------------------------------------------------------


def _add_bench(subparsers: Any) -> None:
    bench = subparsers.add_parser(
        "bench", help="quality/speed sweep of every available backend x strategy on the reference model",
        description="Runs every available backend x strategy (a few thresholds/intervals each, plus the "
                    "shipped presets) against the uncached pipeline in interleaved pairs, and writes "
                    "bench.json, bench.md and PNG figures to --out.")
    bench.add_argument("--model", choices=("reference", "video"), default="reference",
                       help="reference: the digits image DiT (FluxPipeline); video: the moving-digits video DiT "
                            "(WanPipeline, 8 frames per clip)")
    bench.add_argument("--steps", type=int, action="append", metavar="N",
                       help="denoising steps; repeat for several (default 20)")
    bench.add_argument("--batch-size", type=int, help="images per call (default 10; --quick: 4)")
    add_cfg_option(bench)
    bench.add_argument("--repeats", type=int, help="timed pairs per config, one seed each (default 2; --quick: 1)")
    bench.add_argument("--quick", action="store_true", help="CI-sized run: a point or two per strategy, ~1 minute")
    bench.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default {DEFAULT_OUT}/)")
    bench.add_argument("--backends", action="append", metavar="NAMES", help="only these backends (comma list)")
    bench.add_argument("--strategies", action="append", metavar="NAMES", help="only these strategies (comma list)")
    bench.add_argument("--no-presets", action="store_true", help="do not add the shipped presets to the sweep")
    bench.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    add_threads_option(bench)
    bench.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from .figures import write_figures
    from .models import model_title, workload_factory
    from .report import markdown, write_json
    from .runner import BenchOptions, run_bench

    apply_threads(args)
    options = _bench_options(args, BenchOptions)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"bench: {model_title(args.model)}, steps {list(options.steps)}, batch {options.batch_size}, "
          f"{options.repeats} timed pair(s) per config{f', CFG {options.cfg_scale:g}' if options.cfg_scale else ''}")
    model = {} if args.model == "reference" else {"workload_factory": workload_factory(args.model)}
    report = run_bench(options, progress=ProgressBar(), **model)
    command = _command_line(args)
    write_json(report, out / "bench.json", {"command": command})
    table = markdown(report)
    (out / "bench.md").write_text(f"Command: `{command}`\n\n{table}", encoding="utf-8")
    print()
    print(table)
    files = [out / "bench.json", out / "bench.md"]
    if not args.no_figures:
        figures, skipped = write_figures(report, out)
        files += figures
        if skipped:
            print(f"note: {skipped}")
    print(f"{_outcome(report.rows)} in {report.elapsed_s:.0f} s; wrote " + ", ".join(str(f) for f in files))
    # A config the backend refuses is a documented result; one that fails while running is a bug.
    return 1 if any(r.status == "error" for r in report.rows) else 0


def _outcome(rows: list[Any]) -> str:
    """E.g. "13 configs: 12 measured, 1 unsupported (refused at enable), 0 errors"."""
    count = {status: sum(r.status == status for r in rows) for status in ("ok", "unsupported", "error")}
    return (f"{len(rows)} configs: {count['ok']} measured, "
            f"{count['unsupported']} unsupported (refused at enable), {count['error']} errors")


def _bench_options(args: argparse.Namespace, options_class: Any) -> Any:
    base = options_class.quick_run() if args.quick else options_class()
    changes: dict[str, Any] = {"cfg_scale": args.cfg, "include_presets": not args.no_presets}
    if args.steps:
        changes["steps"] = tuple(args.steps)
    if args.batch_size:
        changes["batch_size"] = args.batch_size
    if args.repeats:
        changes["repeats"] = args.repeats
    changes["backends"] = _names(args.backends, normalize=True)
    changes["strategies"] = _names(args.strategies)
    return dataclasses.replace(base, **changes)


class ProgressBar:
    """A one-line progress bar on stderr."""

    def __init__(self, width: int = 28) -> None:
        self.width, self.started = width, time.perf_counter()

    def __call__(self, done: int, total: int, label: str) -> None:
        filled = int(self.width * done / max(total, 1))
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done * (total - done) if done else 0.0
        line = (f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} runs, eta {eta:4.0f} s  "
                f"{label[:48]:48s}")
        sys.stderr.write(line)
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


# -- tune ---------------------------------------------------------------------------------------


def _add_tune(subparsers: Any) -> None:
    tune = subparsers.add_parser(
        "tune", help="find the fastest config meeting a PSNR target and write it as a preset",
        description="Bisects thresholds (and tries the forecaster / block-count variants, or intervals for "
                    "scheduled strategies) on calibration seeds of the reference model for the config with "
                    "the fewest blocks computed that keeps PSNR >= --target-psnr vs uncached, verifies it on "
                    "held-out seeds, and writes a preset YAML with the measured figures. For your own pipeline "
                    "use phyai_cache.tune(pipe, call_kwargs, target_psnr=...).")
    target = tune.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-psnr", type=float, metavar="DB", help="minimum PSNR vs uncached, in dB")
    target.add_argument("--tiers", metavar="NAME=DB,...",
                        help="several targets sharing one search, e.g. quality=40,balanced=33,fast=28; writes "
                             "PREFIX-NAME.yaml per tier into --out-dir")
    tune.add_argument("--strategy", action="append", metavar="NAMES",
                      help="strategies to search (comma list; default every threshold/interval strategy available)")
    tune.add_argument("--backend", default="auto", help="backend (default auto)")
    _add_pipeline_option(tune)
    tune.add_argument("--steps", type=int, action="append", metavar="N",
                      help="denoising steps; repeat to require the target at each (default 20)")
    tune.add_argument("--batch-size", type=int, default=10)
    add_cfg_option(tune)
    # Disjoint from the bench's seeds (0, 1), so the bench's rows for a preset are out of sample.
    tune.add_argument("--calibration-seeds", default="100,101,102,103", metavar="LIST",
                      help="seeds the search measures PSNR on (default 100-103)")
    tune.add_argument("--heldout-seeds", default="200,201,202,203", metavar="LIST",
                      help="seeds the result is verified and timed on (default 200-203)")
    tune.add_argument("--margin", type=float, default=0.0, metavar="DB",
                      help="calibrate for target + margin, so unseen seeds keep the target (default 0)")
    tune.add_argument("--iterations", type=int, default=6, help="bisection steps per threshold search")
    tune.add_argument("--max-threshold", type=float, default=2.0,
                      help="the largest threshold the search tries (default 2.0)")
    tune.add_argument("--timing-pairs", type=int, default=3, help="interleaved pairs timing the result (0: none)")
    tune.add_argument("--out", metavar="PATH", help="write the preset YAML here (with --target-psnr)")
    tune.add_argument("--name", help="preset name (default: the --out file name)")
    tune.add_argument("--trades", help="the preset's one-line 'trades' text")
    tune.add_argument("--out-dir", metavar="DIR", help="with --tiers: write the presets here")
    tune.add_argument("--prefix", metavar="NAME", help="with --tiers: preset name prefix (default: the strategy)")
    tune.add_argument("--json", metavar="PATH", help="also write the full result (with every config tried)")
    add_threads_option(tune)
    tune.set_defaults(func=cmd_tune)


TIER_TRADES = {
    "quality": "least speed for least quality change",
    "balanced": "moderate speed for a small quality change",
    "fast": "most speed for a visible quality change",
}


def cmd_tune(args: argparse.Namespace) -> int:
    from phyai_cache.tuning import tune_tiers

    from .workload import reference_workload

    apply_threads(args)
    steps = args.steps or [20]
    pipe, cases, model = _pipeline_cases(args, steps)
    # The reference model's images are in [0, 1] and its digits can be read back; a model of one's own
    # is compared over the uncached output's range.
    first = None if args.pipeline else reference_workload(steps[0], args.batch_size, args.cfg)
    targets = _tiers(args.tiers) if args.tiers else {"target": args.target_psnr}
    print(f"tune: {model['model']}, steps {steps}, targets "
          + ", ".join(f"{name} {db:g} dB" for name, db in targets.items()))
    measure = ({"extract": first.extract, "data_range": 1.0, "agreement": first.agreement} if first
               else {"data_range": None})
    results = tune_tiers(
        pipe, cases, targets, **measure,
        on_eval=lambda message: print(f"  {message}", file=sys.stderr),
        strategy=_names(args.strategy), backend=args.backend, calibration_seeds=_ints(args.calibration_seeds),
        heldout_seeds=_ints(args.heldout_seeds), iterations=args.iterations, timing_pairs=args.timing_pairs,
        max_threshold=args.max_threshold,
        margin_db=args.margin,
    )
    details = {"model": model["model"], "steps": steps, **model}
    for name, result in results.items():
        print(f"\n{name} (>= {result.target_psnr:g} dB):")
        _print_tune(result)
        path = _tune_output(args, name, result)
        if path is not None:
            trades = args.trades or _tier_trades(name, result)
            # A preset records how to reproduce it, not where that run wrote its scratch JSON.
            command = _command_line(args, leave_out=("json",))
            result.write_preset(path, None if args.tiers else args.name, trades, details, command)
            print(f"  wrote {path}")
    if args.json:
        data = {name: result.to_dict() for name, result in results.items()}
        Path(args.json).write_text(json.dumps(data if args.tiers else data["target"], indent=2) + "\n",
                                   encoding="utf-8")
    missed = [name for name, result in results.items() if not result.met]
    if missed:
        print(f"warning: held-out seeds miss the target for: {', '.join(missed)}", file=sys.stderr)
        return 2
    return 0


def _tune_output(args: argparse.Namespace, name: str, result: Any) -> Path | None:
    if not args.tiers:
        return Path(args.out) if args.out else None
    if not args.out_dir:
        return None
    prefix = args.prefix or result.config.strategy
    return Path(args.out_dir) / f"{prefix}-{name}.yaml"


def _tier_trades(name: str, result: Any) -> str | None:
    what = TIER_TRADES.get(name)
    if what is None:
        return None
    return f"{what} (>= {result.target_psnr:g} dB PSNR vs uncached on the reference model)"


def _tiers(text: str) -> dict[str, float]:
    tiers = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep:
            raise SystemExit(f"error: --tiers expects NAME=DB,..., got {part!r}")
        tiers[name.strip()] = float(value)
    return tiers


def _print_tune(result: Any) -> None:
    print()
    print(f"  config       {json.dumps(result.to_dict()['config'])}  (backend {result.backend})")
    for label, m in (("calibration", result.calibration), ("held-out", result.heldout)):
        agreement = "" if m.agreement is None else f", agreement {m.agreement * 100:.0f}%"
        print(f"  {label:12s} seeds {m.seeds}: PSNR {_db(m.psnr_db)} (worst case), SSIM "
              f"{m.ssim if m.ssim is None else round(m.ssim, 4)}, ideal speedup {m.ideal_speedup or 0:.2f}x{agreement}")
    speed = ", ".join(f"{case} {value:.2f}x" for case, value in result.speedup.items() if value)
    print(f"  speedup      {speed or 'not timed'} (median of interleaved pairs)")
    margin = f" (calibrated for +{result.margin_db:g} dB)" if result.margin_db else ""
    print(f"  target met on held-out seeds: {'yes' if result.met else 'NO'}{margin}; {result.elapsed_s:.0f} s")


# -- helpers ------------------------------------------------------------------------------------


def _names(values: list[str] | None, normalize: bool = False) -> tuple[str, ...] | None:
    if not values:
        return None
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    if normalize:
        names = [n.replace("-", "_") for n in names]
    return tuple(names)


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _db(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "inf dB" if math.isinf(value) else f"{value:.1f} dB"


def _command_line(args: argparse.Namespace, leave_out: tuple[str, ...] = ()) -> str:
    """The command as typed (reconstructed from the parsed options, defaults and ``leave_out`` left out)."""
    words = ["phyai-cache", args.command]
    for key, value in vars(args).items():  # argparse keeps the order the options were defined in
        if key in ("command", "func", *leave_out) or value in (None, False, []):
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            words.append(flag)
        elif isinstance(value, list):
            for item in value:
                words += [flag, str(item)]
        elif not _is_default(args.command, key, value):
            words += [flag, str(value)]
    return shlex.join(words)


def _is_default(command: str, key: str, value: Any) -> bool:
    defaults = {"bench": {"out": DEFAULT_OUT, "threads": 1, "model": "reference"},
                "calibrate": {"seeds": "100", "batch_size": 10, "threads": 1},
                "tune": {"backend": "auto", "batch_size": 10, "calibration_seeds": "0,1",
                         "heldout_seeds": "10,11,12", "iterations": 6, "timing_pairs": 3, "threads": 1, "margin": 0.0,
                         "max_threshold": 2.0}}
    return defaults.get(command, {}).get(key) == value
