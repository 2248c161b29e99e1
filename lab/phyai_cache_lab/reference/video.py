"""Video reference model: a tiny trained ``WanTransformer3DModel`` drawing moving digits.

Clips are 8 frames of 16x16 pixels, one channel. Each shows one of the shipped digits moving one
pixel per frame to the right or to the left. The digit wraps around the side edges, so every frame
holds the whole digit and the motion can be undone exactly. (Only horizontal motion: the digits
fill the frame's height, so a vertical wrap has no visible seam and the model cannot tell where
the digit starts; a trial with up/down motions drew those clips much worse.) That makes two
quality checks exact on real clips:

- **frame agreement**: undo the requested motion, then ask the image model's digit classifier
  (``classifier.safetensors``) whether each frame shows the requested digit;
- **temporal consistency**: after undoing the motion, consecutive frames of a real clip are equal.
  :func:`temporal_psnr` is the PSNR between them (infinite on real clips), and
  :func:`motion_accuracy` the share of frame pairs whose best-matching shift is the requested one.

The pipeline is a stock ``diffusers.WanPipeline`` with ``text_encoder=None``, ``tokenizer=None``
and ``vae=None``. Without a VAE the pipeline assumes Wan's factors (8x spatial, 4x temporal), so
:func:`video_call_kwargs` asks for a 128x128, 29-frame video: its latents, (B, 1, 8, 16, 16), are
the pixels in [-1, 1]. Always use ``output_type="latent"`` (there is nothing to decode with) and
:func:`latents_to_frames`. The scheduler is Wan 2.1's: ``UniPCMultistepScheduler`` with flow
sigmas and ``flow_shift=3.0``.

Conditioning replaces the text encoder: ``prompt_embeds`` is 2 tokens from a per-digit table and 2
from a per-motion table (32 channels, fixed random, the last row of each is the null class used
for CFG). See ``docs/reference-model.md`` ("The video reference model") for how it was trained and
its measured quality; ``tools/train_video_reference.py`` retrains it.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import assets
from .classifier import NULL_CLASS, NUM_CLASSES, check_indices, check_labels, load_classifier  # noqa: F401  (re-exported)
from .imaging import downsample_images

NUM_FRAMES = 8
FRAME_SIZE = 16
MOTIONS = ("right", "left")
MOTION_STEPS = ((0, 1), (0, -1))  # (dy, dx) pixels per frame
NULL_MOTION = len(MOTIONS)
DIGIT_TOKENS = 2
MOTION_TOKENS = 2
TEXT_DIM = 32
# WanPipeline without a VAE assumes Wan's VAE factors: 8x spatial, 4x temporal.
PIPELINE_SIZE = FRAME_SIZE * 8
PIPELINE_NUM_FRAMES = 4 * (NUM_FRAMES - 1) + 1

# The video files sit next to the image model's; the classifier is shared with it.
VIDEO_WEIGHTS_ENV = "PHYAI_CACHE_VIDEO_WEIGHTS"
VIDEO_METADATA_FILE = "video.json"
VIDEO_TRANSFORMER_FILE = "video_transformer.fp16.safetensors"
VIDEO_EMBEDDINGS_FILE = "video_embeddings.safetensors"


# -- files ------------------------------------------------------------------------------------


def video_weights_dir() -> Path:
    """Where the video files are read from: ``$PHYAI_CACHE_VIDEO_WEIGHTS`` or the shipped folder."""
    return Path(os.environ.get(VIDEO_WEIGHTS_ENV) or assets.WEIGHTS_DIR)


def _path(name: str) -> Path:
    path = video_weights_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"video reference model file {path} is missing; retrain with "
                                "`python tools/train_video_reference.py`")
    return path


@cache
def _metadata(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def load_video_metadata() -> dict[str, Any]:
    """The parsed ``video.json`` (configs, clip geometry, training statistics)."""
    return copy.deepcopy(_metadata(_path(VIDEO_METADATA_FILE)))


@cache
def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _load_tensors(name: str) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in _tensors(_path(name)).items()}


# -- clips: geometry shared by the trainer, the pipeline and the metrics -----------------------


def check_motions(motions: Sequence[int] | torch.Tensor, allow_null: bool = False) -> torch.Tensor:
    return check_indices(motions, NULL_MOTION if allow_null else NULL_MOTION - 1, "motions", MOTIONS)


def default_motions(batch_size: int) -> list[int]:
    """The motions of a default batch: right, left, right, left, ..."""
    return [i % len(MOTIONS) for i in range(batch_size)]


def frame_offsets(motions: Sequence[int] | torch.Tensor, num_frames: int = NUM_FRAMES) -> torch.Tensor:
    """(B, F, 2) integer (dy, dx) offset of every frame: ``step * (f - F // 2)``.

    Frame F // 2 shows the digit where it was drawn; the clip runs from 4 pixels before that
    position to 3 pixels after it (for 8 frames).
    """
    steps = torch.tensor(MOTION_STEPS, dtype=torch.long)[check_motions(motions)]  # (B, 2)
    time = torch.arange(num_frames, dtype=torch.long) - num_frames // 2
    return steps[:, None, :] * time[None, :, None]


def _roll(frames: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Roll frames (B, F, C, H, W) by per-frame (dy, dx) offsets (B, F, 2), wrapping around."""
    out = torch.empty_like(frames)
    for b in range(frames.shape[0]):
        for f in range(frames.shape[1]):
            dy, dx = (int(v) for v in offsets[b, f])
            out[b, f] = torch.roll(frames[b, f], shifts=(dy, dx), dims=(-2, -1))
    return out


def make_clips(images: torch.Tensor, motions: Sequence[int] | torch.Tensor,
               num_frames: int = NUM_FRAMES) -> torch.Tensor:
    """Images (B, C, H, W) -> clips (B, F, C, H, W): each image moving one pixel per frame."""
    clips = images[:, None].expand(-1, num_frames, *images.shape[1:])
    return _roll(clips.contiguous(), frame_offsets(motions, num_frames))


def compensate(frames: torch.Tensor, motions: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Undo the requested motion of clips (B, F, C, H, W): every frame back where the digit was drawn."""
    return _roll(frames, -frame_offsets(motions, frames.shape[1]))


def clips_to_model_space(clips: torch.Tensor) -> torch.Tensor:
    """Clips (B, F, 1, H, W) in [0, 1] -> Wan latents (B, 1, F, H, W) in [-1, 1]."""
    return clips.permute(0, 2, 1, 3, 4) * 2.0 - 1.0


def latents_to_frames(latents: torch.Tensor) -> torch.Tensor:
    """Pipeline output (B, 1, F, H, W) in [-1, 1] -> frames (B, F, 1, H, W) in [0, 1], float32, CPU."""
    return ((latents.detach().float().cpu().permute(0, 2, 1, 3, 4) + 1.0) * 0.5).clamp(0.0, 1.0)


# -- quality ------------------------------------------------------------------------------------


@torch.no_grad()
def frame_classes(frames: torch.Tensor, motions: Sequence[int] | torch.Tensor,
                  classifier: nn.Linear | None = None) -> torch.Tensor:
    """(B, F) digit the shared classifier reads in every motion-compensated frame."""
    classifier = classifier if classifier is not None else load_classifier()
    still = compensate(frames.float().cpu(), motions)
    b, f = still.shape[:2]
    return classifier(downsample_images(still.reshape(b * f, *still.shape[2:]))).argmax(1).reshape(b, f)


def frame_agreement(frames: torch.Tensor, labels: Sequence[int] | torch.Tensor,
                    motions: Sequence[int] | torch.Tensor, classifier: nn.Linear | None = None) -> float:
    """Share of frames (motion undone) that the classifier reads as the requested digit."""
    target = torch.as_tensor(labels, dtype=torch.long).reshape(-1, 1)
    predicted = frame_classes(frames, motions, classifier)
    if predicted.shape[0] != target.shape[0]:
        raise ValueError(f"{predicted.shape[0]} clips but {target.shape[0]} labels")
    return float((predicted == target).float().mean())


def temporal_psnr(frames: torch.Tensor, motions: Sequence[int] | torch.Tensor,
                  compensated: bool = True) -> float:
    """PSNR (dB, data range 1) between consecutive frames, pooled over all pairs.

    With ``compensated=True`` the requested motion is undone first, so a real clip scores
    infinity and a flickering or wrongly moving one scores low. ``compensated=False`` compares the
    raw frames: how much the clip changes from frame to frame (the motion itself).
    """
    x = compensate(frames.float().cpu(), motions) if compensated else frames.float().cpu()
    mse = float((x[:, 1:].double() - x[:, :-1].double()).pow(2).mean())
    return math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)


def motion_accuracy(frames: torch.Tensor, motions: Sequence[int] | torch.Tensor, max_shift: int = 2) -> float:
    """Share of consecutive frame pairs whose best-matching shift (least squared error over all
    shifts up to ``max_shift`` pixels each way, wrapping) is the requested one-pixel step."""
    x = frames.float().cpu()
    steps = torch.tensor(MOTION_STEPS, dtype=torch.long)[check_motions(motions)]
    shifts = [(dy, dx) for dy in range(-max_shift, max_shift + 1) for dx in range(-max_shift, max_shift + 1)]
    a, b = x[:, :-1], x[:, 1:]
    errors = torch.stack([(torch.roll(a, s, dims=(-2, -1)) - b).pow(2).flatten(2).mean(2) for s in shifts], dim=-1)
    best = torch.tensor(shifts, dtype=torch.long)[errors.argmin(-1)]  # (B, F-1, 2)
    return float((best == steps[:, None, :]).all(-1).float().mean())


def clip_quality(frames: torch.Tensor, labels: Sequence[int] | torch.Tensor,
                 motions: Sequence[int] | torch.Tensor, classifier: nn.Linear | None = None) -> dict[str, float]:
    """The video model's quality check on clips (B, F, 1, 16, 16) in [0, 1]."""
    predicted = frame_classes(frames, motions, classifier)
    target = torch.as_tensor(labels, dtype=torch.long).reshape(-1, 1)
    majority = predicted.mode(dim=1).values
    return {
        "frame_agreement": float((predicted == target).float().mean()),
        "clip_agreement": float((majority == target[:, 0]).float().mean()),
        "temporal_psnr_db": temporal_psnr(frames, motions),
        "raw_temporal_psnr_db": temporal_psnr(frames, motions, compensated=False),
        "motion_accuracy": motion_accuracy(frames, motions),
    }


# -- conditioning and pipeline ------------------------------------------------------------------


def conditioning(labels: Sequence[int] | torch.Tensor, motions: Sequence[int] | torch.Tensor,
                 table: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, 4, 32) ``prompt_embeds``: 2 digit tokens then 2 motion tokens (label 10 / motion 2 = null)."""
    digits = table["digit_embeds"][check_labels(labels, allow_null=True)]
    moves = table["motion_embeds"][check_motions(motions, allow_null=True)]
    if digits.shape[0] != moves.shape[0]:
        raise ValueError(f"{digits.shape[0]} labels but {moves.shape[0]} motions")
    return torch.cat([digits, moves], dim=1)


def video_embeddings(labels: Sequence[int], motions: Sequence[int] | None = None, null: bool = False,
                     dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
    """``prompt_embeds`` for clips of ``labels`` moving by ``motions`` (default: :func:`default_motions`).

    With ``null=True`` every row is the null digit and null motion: the unconditional embedding for CFG.
    """
    index = check_labels(labels, allow_null=True)
    motions = default_motions(len(index)) if motions is None else motions
    if null:
        index, motions = torch.full_like(index, NULL_CLASS), [NULL_MOTION] * len(index)
    return conditioning(index, motions, _load_tensors(VIDEO_EMBEDDINGS_FILE)).to(device=device, dtype=dtype)


def build_video_scheduler(config: dict[str, Any] | None = None):
    """Wan 2.1's scheduler (UniPC, flow sigmas, shift 3) from the saved config."""
    from diffusers import UniPCMultistepScheduler

    config = config if config is not None else load_video_metadata()["scheduler_config"]
    return UniPCMultistepScheduler.from_config(config)


def load_video_transformer(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The trained ``WanTransformer3DModel``, rebuilt from its config and the fp16 state dict."""
    from diffusers import WanTransformer3DModel

    config = load_video_metadata()["transformer_config"]
    with torch.random.fork_rng(devices=[]):
        model = WanTransformer3DModel.from_config(config)
    state = _load_tensors(VIDEO_TRANSFORMER_FILE)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    # plain nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast
    return nn.Module.to(model, device=device, dtype=dtype).eval().requires_grad_(False)


def load_video_pipeline(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A stock ``diffusers.WanPipeline`` running the video model (a fresh one per call)."""
    from diffusers import WanPipeline

    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=build_video_scheduler(),
                       transformer=load_video_transformer(dtype=dtype, device=device))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def video_call_kwargs(labels: Sequence[int], motions: Sequence[int] | None = None, num_inference_steps: int = 20,
                      seed: int = 0, cfg_scale: float | None = None, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> dict[str, Any]:
    """Keyword arguments for ``pipe(**kwargs)``: one clip per label, a fresh generator per call.

    ``cfg_scale`` turns on Wan's CFG against the null digit and motion (two transformer calls per
    step); without it ``guidance_scale`` is 1.0 (Wan's default 5.0 would try to encode a negative
    prompt, and there is no text encoder).
    """
    index = check_labels(labels)
    motions = default_motions(len(index)) if motions is None else check_motions(motions).tolist()
    kwargs: dict[str, Any] = {
        "prompt_embeds": video_embeddings(index, motions, dtype=dtype, device=device),
        "height": PIPELINE_SIZE,
        "width": PIPELINE_SIZE,
        "num_frames": PIPELINE_NUM_FRAMES,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": 1.0,
        "generator": torch.Generator().manual_seed(seed),
        "output_type": "latent",
    }
    if cfg_scale is not None:
        kwargs["negative_prompt_embeds"] = video_embeddings(index, motions, null=True, dtype=dtype, device=device)
        kwargs["guidance_scale"] = float(cfg_scale)
    return kwargs


@torch.no_grad()
def generate_video(pipe: Any, labels: Sequence[int], motions: Sequence[int] | None = None,
                   num_inference_steps: int = 20, seed: int = 0, cfg_scale: float | None = None) -> torch.Tensor:
    """Run ``pipe`` and return clips (B, F, 1, 16, 16) in [0, 1] (float32, CPU)."""
    kwargs = video_call_kwargs(labels, motions, num_inference_steps, seed, cfg_scale,
                               dtype=pipe.transformer.dtype, device=pipe.transformer.device)
    return latents_to_frames(pipe(**kwargs).frames)
