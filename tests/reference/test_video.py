"""Fast checks that the shipped video reference model loads, is a stock WanPipeline, and still draws
moving digits: per-frame classifier agreement and temporal consistency well above chance.

The clip geometry (motion, wrap-around, compensation) is checked on real digits, where the quality
measures are exact: every frame classifies like the still digit and consecutive frames match.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

from phyai_cache_lab.reference import video
from phyai_cache_lab.reference.assets import CLASSIFIER_FILE, load_tensors
from phyai_cache_lab.reference.imaging import upsample_digits

REPO_ROOT = Path(__file__).resolve().parents[2]
DIGITS = list(range(10))


@pytest.fixture(scope="module")
def pipe() -> WanPipeline:
    return video.load_video_pipeline()


@pytest.fixture(scope="module")
def real_clips() -> tuple[torch.Tensor, list[int], list[int]]:
    """The 10 real class-mean digits, each moving in its default direction."""
    means = load_tensors(CLASSIFIER_FILE)["class_means"]
    motions = video.default_motions(10)
    return video.make_clips(upsample_digits(means), motions), DIGITS, motions


def test_pipeline_is_a_stock_wan_pipeline(pipe):
    assert type(pipe) is WanPipeline
    assert type(pipe.transformer) is WanTransformer3DModel
    assert isinstance(pipe.scheduler, UniPCMultistepScheduler)
    assert pipe.scheduler.config.use_flow_sigmas and pipe.scheduler.config.flow_shift == 3.0
    assert pipe.text_encoder is None and pipe.tokenizer is None and pipe.vae is None
    assert (pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal) == (8, 4)
    assert pipe.transformer.dtype == torch.float32 and not pipe.transformer.training


def test_metadata_describes_training():
    meta = video.load_video_metadata()
    assert meta["num_frames"] == video.NUM_FRAMES == 8 and meta["frame_size"] == 16
    assert meta["motions"] == list(video.MOTIONS)
    assert meta["training"]["steps"] > 0 and meta["training"]["params"] < 1_000_000


def test_call_kwargs_and_latent_geometry(pipe):
    kwargs = video.video_call_kwargs([3, 1], num_inference_steps=2, seed=5)
    assert kwargs["prompt_embeds"].shape == (2, 4, video.TEXT_DIM)
    assert kwargs["guidance_scale"] == 1.0 and "negative_prompt_embeds" not in kwargs
    latents = pipe(**kwargs).frames
    assert latents.shape == (2, 1, 8, 16, 16)  # 29 frames at 128x128 -> 8 latent frames of 16x16 = the pixels
    frames = video.latents_to_frames(latents)
    assert frames.shape == (2, 8, 1, 16, 16) and frames.min() >= 0 and frames.max() <= 1


def test_cfg_uses_the_null_digit_and_motion():
    kwargs = video.video_call_kwargs([0, 9], [1, 0], cfg_scale=2.0)
    assert kwargs["guidance_scale"] == 2.0
    null = video.video_embeddings([0, 9], [1, 0], null=True)
    assert torch.equal(kwargs["negative_prompt_embeds"], null)
    assert torch.equal(null[0], null[1]) and not torch.equal(kwargs["prompt_embeds"][0], null[0])
    # digit tokens first, motion tokens second
    same_digit = video.video_embeddings([4, 4], [0, 1])
    assert torch.equal(same_digit[0, :2], same_digit[1, :2]) and not torch.equal(same_digit[0, 2:], same_digit[1, 2:])


def test_invalid_labels_and_motions_are_rejected():
    with pytest.raises(ValueError):
        video.video_call_kwargs([10])
    with pytest.raises(ValueError):
        video.video_call_kwargs([1], [video.NULL_MOTION])
    with pytest.raises(ValueError):
        video.video_embeddings([1, 2], [0])


def test_generation_is_deterministic_per_seed(pipe):
    a = video.generate_video(pipe, [5, 8], num_inference_steps=3, seed=11)
    b = video.generate_video(pipe, [5, 8], num_inference_steps=3, seed=11)
    c = video.generate_video(pipe, [5, 8], num_inference_steps=3, seed=12)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_motion_wraps_and_compensation_undoes_it(real_clips):
    clips, labels, motions = real_clips
    assert clips.shape == (10, 8, 1, 16, 16)
    # right: frame 5 is frame 4 shifted one pixel right, wrapping around the edge; left: the other way
    assert torch.equal(clips[0, 5], torch.roll(clips[0, 4], 1, dims=-1))
    assert torch.equal(clips[1, 5], torch.roll(clips[1, 4], -1, dims=-1))
    assert torch.equal(clips[1, 0], torch.roll(clips[1, 4], 4, dims=-1))
    still = video.compensate(clips, motions)
    assert torch.equal(still, still[:, 4:5].expand_as(still))
    assert video.frame_offsets([0]).tolist()[0][0] == [0, -4]


def test_quality_measures_are_exact_on_real_clips(real_clips):
    clips, labels, motions = real_clips
    quality = video.clip_quality(clips, labels, motions)
    assert quality["frame_agreement"] == 1.0 and quality["clip_agreement"] == 1.0
    assert math.isinf(quality["temporal_psnr_db"]) and quality["motion_accuracy"] == 1.0
    assert quality["raw_temporal_psnr_db"] < 20  # the frames do move
    # the opposite motion is caught: compensating "left" for a clip moving right and vice versa
    wrong = [1 - m for m in motions]
    assert video.temporal_psnr(clips, wrong) < 20 and video.motion_accuracy(clips, wrong) == 0.0
    # a still clip fails the motion check; noise fails everything
    still = clips[:, 4:5].expand_as(clips).contiguous()
    assert video.motion_accuracy(still, motions) == 0.0
    noise = torch.rand(10, 8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert video.frame_agreement(noise, labels, motions) < 0.5 and video.temporal_psnr(noise, motions) < 10


def test_samples_are_recognisable_moving_digits(pipe):
    """The uncached model at 20 steps: well above chance (10 %) on every measure."""
    clips = video.generate_video(pipe, DIGITS, num_inference_steps=20, seed=0)
    quality = video.clip_quality(clips, DIGITS, video.default_motions(10))
    assert quality["frame_agreement"] >= 0.6, quality
    assert quality["motion_accuracy"] >= 0.6, quality
    assert quality["temporal_psnr_db"] > quality["raw_temporal_psnr_db"] + 3, quality


def test_runtime_does_not_import_sklearn():
    code = (
        "import sys, torch\n"
        "from phyai_cache_lab.reference import video\n"
        "video.load_video_pipeline(); video.video_call_kwargs([1]); "
        "video.frame_classes(torch.zeros(1, 8, 1, 16, 16), [0])\n"
        "assert 'sklearn' not in sys.modules, 'sklearn imported at runtime'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, env=env, timeout=120)


def test_video_files_are_small():
    # Loading time is not asserted here (timings on shared cores belong in a benchmark, not a test).
    folder = video.video_weights_dir()
    sizes = [(folder / n).stat().st_size for n in (video.VIDEO_TRANSFORMER_FILE, video.VIDEO_EMBEDDINGS_FILE,
                                                   video.VIDEO_METADATA_FILE)]
    assert sum(sizes) < 3_000_000
