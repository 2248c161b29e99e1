"""What the benchmark and the tuner run: a pipeline, the call for one seed, and how to read its output.

The reference workload is the shipped digits DiT (``phyai_cache_lab.reference``); the tiny workload is
a random-weight FluxPipeline (``phyai_cache_lab.testing``) for when the reference weights are absent.
Any diffusers pipeline works through :func:`extract_images`, the default reader of pipeline outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from phyai_cache.tuning.outputs import CallKwargs, Extract, extract_images

__all__ = ["CallKwargs", "Extract", "Workload", "extract_images", "reference_workload", "tiny_workload"]


@dataclass
class Workload:
    """One benchmark case: a pipeline factory, the call per seed, and how to score its output.

    ``agreement(images, num_seeds)`` and ``classes(images)`` are optional: the reference model
    scores images with its digit classifier; other pipelines may have nothing comparable.
    ``data_range`` None means "the uncached output's peak-to-peak range" (latents of unknown scale).
    ``metrics(images)`` optionally adds named figures of the workload's own (the video model's
    temporal consistency); the bench records them for the uncached and every cached output.
    """

    name: str
    steps: int
    make_pipeline: Callable[[], Any]
    call_kwargs: CallKwargs
    extract: Extract
    data_range: float | None = 1.0
    agreement: Callable[[torch.Tensor], float] | None = None
    classes: Callable[[torch.Tensor], torch.Tensor] | None = None
    metrics: Callable[[torch.Tensor], dict[str, float]] | None = None
    details: dict[str, Any] = field(default_factory=dict)


def reference_workload(steps: int, batch_size: int = 10, cfg_scale: float | None = None) -> Workload:
    """The shipped digits DiT: one image per digit 0..9 (repeated to ``batch_size``) per seed."""
    from phyai_cache_lab import reference

    labels = [i % reference.NUM_CLASSES for i in range(batch_size)]
    classifier = reference.load_classifier()

    def agreement(images: torch.Tensor) -> float:
        # images hold whole batches (one per seed) back to back, so the labels repeat per batch
        repeats = images.shape[0] // len(labels)
        return reference.agreement(images, labels * repeats, classifier)

    cfg = f", true CFG {cfg_scale:g}" if cfg_scale else ""
    return Workload(
        name=f"reference digits DiT, {steps} steps, batch {batch_size}{cfg}",
        steps=steps,
        make_pipeline=reference.load_pipeline,
        call_kwargs=lambda seed: reference.call_kwargs(labels, num_inference_steps=steps, seed=seed,
                                                       cfg_scale=cfg_scale),
        extract=lambda output: reference.latents_to_images(extract_images(output)),
        data_range=1.0,
        agreement=agreement,
        classes=lambda images: reference.classify(images, classifier),
        details={"model": "phyai_cache_lab.reference digits DiT (FluxPipeline, 2.29 M params, 16x16)",
                 "steps": steps, "batch_size": batch_size, "cfg_scale": cfg_scale, "dtype": "float32",
                 "device": "cpu"},
    )


def reference_available() -> bool:
    """Whether the reference model's weights are installed (a stripped install may lack them)."""
    try:
        from ..reference import WEIGHTS_DIR
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return any(WEIGHTS_DIR.glob("*.safetensors"))


def tiny_workload(steps: int) -> Workload:
    """A tiny random-weight FluxPipeline, scored on its latents: shows what a cache does, not its quality."""
    from ..testing import build_tiny_pipeline

    template = build_tiny_pipeline("flux")  # only its call kwargs are used
    return Workload(
        name=f"tiny random-weight FluxPipeline, {steps} steps",
        steps=steps,
        make_pipeline=lambda: build_tiny_pipeline("flux").pipe,
        call_kwargs=lambda seed: template.call_kwargs(num_inference_steps=steps, seed=seed),
        extract=extract_images,
        data_range=None,
        details={"model": "phyai_cache_lab.testing tiny FluxPipeline (random weights)", "steps": steps,
                 "dtype": "float32", "device": "cpu"},
    )
