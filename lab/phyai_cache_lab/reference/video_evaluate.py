"""Measure the video reference model: clip quality, first-block residual drift, a frame grid.

Run as ``python -m phyai_cache_lab.reference.video_evaluate`` after retraining; the figures in
``docs/reference-model.md`` ("The video reference model") come from this module. Quality is
:func:`phyai_cache_lab.reference.video.clip_quality` over one batch of the 10 digits per seed, each
digit moving in the default direction of its position (right, left, down, up, right, ...).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from phyai_cache_lab.cli_options import add_threads_option, apply_threads

from .classifier import load_classifier
from .evaluate import FirstBlockResiduals, write_tile_grid
from .video import (
    NUM_CLASSES,
    clip_quality,
    default_motions,
    generate_video,
    load_video_pipeline,
    video_call_kwargs,
)

DIGITS = list(range(NUM_CLASSES))


def measure_quality(pipe: Any, num_inference_steps: int = 20, seeds: Sequence[int] = range(10),
                    cfg_scale: float | None = None) -> dict[str, float]:
    """:func:`clip_quality` over one batch of the 10 digits per seed (PSNRs pooled over all clips)."""
    classifier = load_classifier()
    motions = default_motions(len(DIGITS))
    clips = torch.cat([generate_video(pipe, DIGITS, motions, num_inference_steps, seed, cfg_scale) for seed in seeds])
    return {k: round(v, 4) for k, v in clip_quality(clips, DIGITS * len(seeds), motions * len(seeds),
                                                     classifier).items()}


def residual_change(pipe: Any, num_inference_steps: int = 20, seeds: Sequence[int] = range(2)) -> dict[str, Any]:
    """Relative L1 change of ``blocks[0]``'s residual (output - input) between adjacent steps.

    rel-L1 is ``mean|r_i - r_{i-1}| / mean|r_{i-1}|`` over the batch, the statistic FBCache-style
    caches compare with their threshold; entry ``i`` compares step ``i+1`` with step ``i``.
    """
    per_step: list[list[float]] = [[] for _ in range(num_inference_steps - 1)]
    for seed in seeds:
        recorder = FirstBlockResiduals(pipe.transformer.blocks[0])
        try:
            with torch.no_grad():
                pipe(**video_call_kwargs(DIGITS, num_inference_steps=num_inference_steps, seed=seed))
        finally:
            recorder.remove()
        for i, change in enumerate(recorder.adjacent_changes()):
            per_step[i].append(change)
    curve = [statistics.fmean(values) for values in per_step]
    return {
        "per_step_rel_l1": [round(v, 4) for v in curve],
        "rel_l1_mean": round(statistics.fmean(curve), 4),
        "rel_l1_median": round(statistics.median(curve), 4),
        "rel_l1_first": round(curve[0], 4),
        "rel_l1_last": round(curve[-1], 4),
    }


def save_grid(pipe: Any, path: Path, seed: int = 0, num_inference_steps: int = 20, scale: int = 4,
              gap: int = 2) -> None:
    """PNG: one row per digit (0 to 9, default motions), one column per frame, nearest-neighbour upscaled."""
    clips = generate_video(pipe, DIGITS, default_motions(len(DIGITS)), num_inference_steps, seed)
    write_tile_grid(list(clips), path, scale, gap)


def main() -> None:
    parser = argparse.ArgumentParser(description="Evaluate the video reference model")
    parser.add_argument("--seeds", type=int, default=10, help="seeds per setting (10 clips each)")
    parser.add_argument("--grid", type=Path, default=None, help="write a frame grid PNG here")
    add_threads_option(parser)
    parser.add_argument("--quick", action="store_true", help="20 steps only, no CFG / 50-step settings")
    args = parser.parse_args()
    apply_threads(args)

    pipe = load_video_pipeline()
    seeds = range(args.seeds)
    settings = [("20_steps", 20, None)]
    if not args.quick:
        settings += [("50_steps", 50, None), ("10_steps", 10, None), ("20_steps_cfg2", 20, 2.0)]
    report: dict[str, Any] = {"clips_per_setting": len(DIGITS) * args.seeds}
    for name, steps, cfg in settings:
        report[name] = measure_quality(pipe, steps, seeds, cfg)
        print(f"{name}: {report[name]}", flush=True)
    report["residual_20_steps"] = residual_change(pipe, 20, range(min(args.seeds, 2)))
    if args.grid is not None:
        save_grid(pipe, args.grid)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
