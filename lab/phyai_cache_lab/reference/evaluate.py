"""Measure the shipped reference model: sample quality, residual drift, sample grid.

Run as ``python -m phyai_cache_lab.reference.evaluate`` after retraining; the
figures in ``docs/reference-model.md`` come from this module.

Why the residual statistic: first-block caches (TeaCache/FBCache/DBCache)
skip a step when the first block's residual barely changed since the last
computed step.  The relative L1 change measured here is the quantity those
thresholds are compared against, so it tells which thresholds are realistic.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxPipeline

from phyai_cache.decision import relative_l1
from phyai_cache_lab.cli_options import add_threads_option, apply_threads

from .classifier import agreement, load_classifier
from .pipeline import NUM_CLASSES, call_kwargs, generate, load_pipeline

logger = logging.getLogger(__name__)

DIGITS = list(range(NUM_CLASSES))


def measure_agreement(
    pipe: FluxPipeline, num_inference_steps: int = 20, seeds: Sequence[int] = range(10), cfg_scale: float | None = None
) -> float:
    """Classifier agreement over one batch of the 10 digits per seed."""
    classifier = load_classifier()
    scores = [
        agreement(generate(pipe, DIGITS, num_inference_steps, seed, cfg_scale), DIGITS, classifier) for seed in seeds
    ]
    return sum(scores) / len(scores)


class FirstBlockResiduals:
    """Records the residual (output - input) of ``block`` per call: of its output, or of
    ``output[output_index]`` for a block returning several streams (Flux's: the image stream, 1)."""

    def __init__(self, block: torch.nn.Module, output_index: int | None = None) -> None:
        self.residuals: list[torch.Tensor] = []
        self._inputs: list[torch.Tensor] = []
        self.output_index = output_index
        self._handles = [
            block.register_forward_pre_hook(self._pre, with_kwargs=True),
            block.register_forward_hook(self._post, with_kwargs=True),
        ]

    def _pre(self, module, args, kwargs):
        self._inputs.append((kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach())

    def _post(self, module, args, kwargs, output):
        stream = output if self.output_index is None else output[self.output_index]
        self.residuals.append((stream - self._inputs.pop()).detach().float())

    def adjacent_changes(self) -> list[float]:
        """:func:`~phyai_cache.decision.relative_l1` of each residual against the one before."""
        return [relative_l1(current, previous) for previous, current in zip(self.residuals, self.residuals[1:])]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def residual_change(
    pipe: FluxPipeline, num_inference_steps: int = 20, seeds: Sequence[int] = range(4)
) -> dict[str, Any]:
    """Relative L1 change and cosine of the first-block residual between adjacent steps.

    rel-L1 is ``mean|r_i - r_{i-1}| / mean|r_{i-1}|`` over the batch, as in
    cache-dit; entry ``i`` of ``per_step_rel_l1`` compares step ``i+1`` with step ``i``.
    """
    per_step: list[list[float]] = [[] for _ in range(num_inference_steps - 1)]
    cosines: list[float] = []
    for seed in seeds:
        recorder = FirstBlockResiduals(pipe.transformer.transformer_blocks[0], output_index=1)
        try:
            with torch.no_grad():
                pipe(**call_kwargs(DIGITS, num_inference_steps, seed, dtype=pipe.transformer.dtype))
        finally:
            recorder.remove()
        res = recorder.residuals
        for i, change in enumerate(recorder.adjacent_changes()):
            per_step[i].append(change)
        for prev, cur in zip(res, res[1:]):
            cosines.append(torch.nn.functional.cosine_similarity(cur.flatten(1), prev.flatten(1)).mean().item())
    curve = [statistics.fmean(v) for v in per_step]
    flat = [x for v in per_step for x in v]
    return {
        "per_step_rel_l1": [round(x, 4) for x in curve],
        "rel_l1_mean": round(statistics.fmean(flat), 4),
        "rel_l1_median": round(statistics.median(flat), 4),
        "rel_l1_first": round(curve[0], 4),
        "rel_l1_last": round(curve[-1], 4),
        "cosine_mean": round(statistics.fmean(cosines), 4),
        "cosine_min": round(min(cosines), 4),
    }


def save_grid(pipe: FluxPipeline, path: Path, seeds: Sequence[int] = range(6), num_inference_steps: int = 20,
              scale: int = 6, gap: int = 2) -> None:
    """PNG grid: one column per digit, one row per seed, nearest-neighbour upscaled."""
    write_tile_grid([generate(pipe, DIGITS, num_inference_steps, seed) for seed in seeds], path, scale, gap)


def write_tile_grid(rows: Sequence[Sequence[torch.Tensor]], path: Path, scale: int, gap: int) -> None:
    """PNG of ``rows`` of (1, H, W) images in [0, 1] on a grey canvas, nearest-neighbour upscaled."""
    from PIL import Image  # Pillow ships with diffusers; imported lazily as only this needs it

    size = rows[0][0].shape[-1] * scale
    cell = size + gap
    canvas = Image.new("L", (len(rows[0]) * cell + gap, len(rows) * cell + gap), color=128)
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            tile = Image.fromarray((image[0].numpy() * 255).round().astype("uint8"))
            canvas.paste(tile.resize((size, size), Image.NEAREST), (gap + c * cell, gap + r * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description="Evaluate the reference model")
    parser.add_argument("--seeds", type=int, default=10, help="seeds per setting (10 digits each)")
    parser.add_argument("--grid", type=Path, default=None, help="write a sample grid PNG here")
    add_threads_option(parser)
    args = parser.parse_args()
    apply_threads(args)

    pipe = load_pipeline()
    seeds = range(args.seeds)
    report: dict[str, Any] = {"samples_per_setting": 10 * args.seeds}
    for name, steps, cfg in [("agreement_20_steps", 20, None), ("agreement_50_steps", 50, None),
                             ("agreement_20_steps_cfg2", 20, 2.0), ("agreement_10_steps", 10, None)]:
        report[name] = round(measure_agreement(pipe, steps, seeds, cfg), 4)
        print(f"{name}: {report[name]}", flush=True)
    report["residual_20_steps"] = residual_change(pipe, 20, range(min(args.seeds, 4)))
    if args.grid is not None:
        save_grid(pipe, args.grid)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
