"""The models ``phyai-cache bench --model NAME`` can sweep, and the video reference workload.

- ``reference``: the shipped digits image DiT (``FluxPipeline``), :func:`.workload.reference_workload`;
- ``video``: the shipped moving-digits video DiT (``WanPipeline``), :func:`video_workload`.

The video workload scores every frame as an image: PSNR and SSIM against the uncached frames,
classifier agreement per frame with the requested motion undone. Its extra ``metrics`` add the
temporal checks of :func:`phyai_cache_lab.reference.video.clip_quality` (consecutive-frame PSNR after
undoing the motion, motion accuracy), so a cache that makes clips flicker shows up in the rows.
"""

from __future__ import annotations

from typing import Any

import torch

from .workload import Workload, extract_images, reference_workload

MODELS = ("reference", "video")


def workload_factory(model: str) -> Any:
    """``(steps, batch_size, cfg_scale) -> Workload`` for a model name of :data:`MODELS`."""
    factories = {"reference": reference_workload, "video": video_workload}
    if model not in factories:
        raise ValueError(f"unknown bench model {model!r}; choose from {', '.join(MODELS)}")
    return factories[model]


def model_title(model: str) -> str:
    return {"reference": "reference digits DiT", "video": "video reference moving-digits Wan DiT"}[model]


def video_workload(steps: int, batch_size: int = 10, cfg_scale: float | None = None) -> Workload:
    """One clip per digit 0..9 (repeated to ``batch_size``), moving right, left, right, ... per seed.

    Outputs are frames ``(clips * 8, 1, 16, 16)`` in [0, 1], clip after clip.
    """
    from ..reference import load_classifier, video

    labels = [i % video.NUM_CLASSES for i in range(batch_size)]
    motions = video.default_motions(batch_size)
    classifier = load_classifier()
    frames = video.NUM_FRAMES

    def clips(images: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
        # images hold whole batches (one per seed) back to back, so labels and motions repeat per batch
        clip = images.reshape(-1, frames, *images.shape[1:])
        repeats = clip.shape[0] // batch_size
        return clip, labels * repeats, motions * repeats

    def agreement(images: torch.Tensor) -> float:
        clip, y, m = clips(images)
        return video.frame_agreement(clip, y, m, classifier)

    def classes(images: torch.Tensor) -> torch.Tensor:
        clip, _, m = clips(images)
        return video.frame_classes(clip, m, classifier).reshape(-1)

    def metrics(images: torch.Tensor) -> dict[str, float]:
        clip, y, m = clips(images)
        return {"temporal_psnr_db": video.temporal_psnr(clip, m), "motion_accuracy": video.motion_accuracy(clip, m)}

    def extract(output: Any) -> torch.Tensor:
        frames_ = video.latents_to_frames(extract_images(output))
        return frames_.reshape(-1, *frames_.shape[2:])

    cfg = f", CFG {cfg_scale:g}" if cfg_scale else ""
    params = video.load_video_metadata()["training"]["params"]
    return Workload(
        name=f"video reference moving-digits Wan DiT, {steps} steps, batch {batch_size}{cfg}",
        steps=steps,
        make_pipeline=video.load_video_pipeline,
        call_kwargs=lambda seed: video.video_call_kwargs(labels, motions, num_inference_steps=steps, seed=seed,
                                                         cfg_scale=cfg_scale),
        extract=extract,
        data_range=1.0,
        agreement=agreement,
        classes=classes,
        metrics=metrics,
        details={"model": f"phyai_cache_lab.reference.video moving-digits DiT (WanPipeline, "
                          f"{params / 1e6:.2f} M params, {frames}x16x16)",
                 "steps": steps, "batch_size": batch_size, "frames_per_clip": frames, "cfg_scale": cfg_scale,
                 "scheduler": "UniPCMultistepScheduler (flow sigmas, shift 3)", "dtype": "float32", "device": "cpu"},
    )
