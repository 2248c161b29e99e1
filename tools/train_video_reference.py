#!/usr/bin/env python
"""Train the video reference model (tiny Wan DiT on clips of moving 16x16 digits).

Why this exists: caching matters most for video DiTs (long sequences, many steps), and no video
weights can be downloaded here. A ~1 M-parameter ``WanTransformer3DModel`` trained for 25
CPU-minutes on clips made from sklearn's digits behaves like a real rectified-flow video model
(its frames must agree with each other, which only temporal attention can do) and is small
enough to ship next to the image model.

Clips: 8 frames of 16x16; a digit (bilinear 8 -> 16, as for the image model) moves one pixel per
frame to the right or to the left and wraps around the side edges (see ``phyai_cache_lab.reference.video``).
Conditioning: 2 digit tokens + 2 motion tokens of fixed random 32-d embeddings (``prompt_embeds``).

Outputs (in ``--out``; the shipped folder by default):
- ``video_transformer.fp16.safetensors``  EMA transformer weights in fp16;
- ``video_embeddings.safetensors``        digit (11, 2, 32) and motion (3, 2, 32) token tables;
- ``video.json``                          configs, clip geometry, training statistics.
The digit classifier is the image model's (``classifier.safetensors``); it is not refitted.

scikit-learn must be installed to train (it provides the digits file, read without importing
sklearn, exactly as ``tools/train_reference.py`` does); the runtime does not need it.

Example::

    pip install scikit-learn   # training only
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python tools/train_video_reference.py --seconds 1500 --out /tmp/video_ref
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UniPCMultistepScheduler, WanTransformer3DModel
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flow_training import fit, save_outputs, training_parser, training_record  # noqa: E402
from train_reference import load_digits  # noqa: E402  (same data file, same reader)

from phyai_cache_lab.cli_options import apply_threads  # noqa: E402
from phyai_cache_lab.reference import video  # noqa: E402
from phyai_cache_lab.reference.imaging import upsample_digits  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "phyai_cache" / "reference" / "weights"

TRANSFORMER_CONFIG = {
    # 4x4 pixels (2x2 of the 8x8 source digit) per token, one frame per token: 16 tokens a frame,
    # 128 a clip. Wan's own (1, 2, 2) would be 512 tokens a clip and train 8x slower per clip here.
    "patch_size": [1, 4, 4],
    "num_attention_heads": 2,
    "attention_head_dim": 48,  # RoPE split 16 (frame) + 16 (row) + 16 (column)
    "in_channels": 1,
    "out_channels": 1,
    "text_dim": video.TEXT_DIM,
    "freq_dim": 64,
    "ffn_dim": 384,
    "num_layers": 6,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 32,
}

# Wan 2.1's shipped scheduler (Wan-AI/Wan2.1-T2V-1.3B-Diffusers): UniPC, flow sigmas, shift 3.
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
    "solver_order": 2,
    "solver_type": "bh2",
    "predict_x0": True,
    "lower_order_final": True,
    "final_sigmas_type": "zero",
}


def parse_args() -> argparse.Namespace:
    parser = training_parser(__doc__.split("\n\n")[0], out=DEFAULT_OUT, seconds=1500.0, batch_size=16, log_every=25,
                             label_dropout_help="probability of the null digit and motion together (for CFG)")
    return parser.parse_args()


def make_embeddings(seed: int) -> dict[str, torch.Tensor]:
    """Fixed random token tables; the last row of each is the null class."""
    gen = torch.Generator().manual_seed(seed + 1)
    return {
        "digit_embeds": torch.randn(video.NUM_CLASSES + 1, video.DIGIT_TOKENS, video.TEXT_DIM, generator=gen),
        "motion_embeds": torch.randn(len(video.MOTIONS) + 1, video.MOTION_TOKENS, video.TEXT_DIM, generator=gen),
    }


def batch_clips(images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clips of ``images[idx]`` with random motions, in model space (B, 1, F, 16, 16)."""
    motions = torch.randint(len(video.MOTIONS), (len(idx),), generator=gen)
    clips = video.make_clips(images[idx], motions)
    return video.clips_to_model_space(clips), labels[idx].clone(), motions


def flow_loss(model, x0, labels, motions, emb, gen) -> torch.Tensor:
    """Rectified flow as WanPipeline samples it: x_t = (1-s) x0 + s eps, target eps - x0, timestep 1000 s."""
    sigma = torch.rand(x0.shape[0], generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    s = sigma.view(-1, 1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * eps
    # The math kernel computes the same function as the default one; it trained faster at 512 tokens a
    # clip (patch (1, 2, 2)), and at 128 tokens both take the same time. Kept: the shipped model used it.
    with sdpa_kernel([SDPBackend.MATH]):
        pred = model(hidden_states=x_t, timestep=sigma * 1000.0,
                     encoder_hidden_states=video.conditioning(labels, motions, emb), return_dict=False)[0]
    return F.mse_loss(pred, eps - x0)


@torch.no_grad()
def eval_loss(model, images, labels, emb, n: int = 256) -> float:
    """Flow loss on a fixed set of (clip, sigma, eps), comparable across runs."""
    gen = torch.Generator().manual_seed(12345)
    idx = torch.randint(len(images), (n,), generator=gen)
    total = 0.0
    for chunk in idx.split(64):
        x0, y, m = batch_clips(images, labels, chunk, gen)
        total += flow_loss(model, x0, y, m, emb, gen).item() * len(chunk)
    return total / n


def train(args: argparse.Namespace, images: torch.Tensor, labels: torch.Tensor,
          emb: dict[str, torch.Tensor]) -> tuple[WanTransformer3DModel, dict]:
    torch.manual_seed(args.seed)
    model = WanTransformer3DModel(**TRANSFORMER_CONFIG).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"transformer: {n_params / 1e6:.3f} M params; {len(images)} digits x {len(video.MOTIONS)} motions, "
          f"clips {video.NUM_FRAMES}x{video.FRAME_SIZE}x{video.FRAME_SIZE}", flush=True)

    def batch_loss(model: torch.nn.Module, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x0, y, motions = batch_clips(images, labels, idx, gen)
        drop = torch.rand(len(y), generator=gen) < args.label_dropout
        y[drop], motions[drop] = video.NULL_CLASS, video.NULL_MOTION
        return flow_loss(model, x0, y, motions, emb, gen)

    return fit(args, model, len(images), batch_loss, final_window=50,
               evaluate=lambda ema: eval_loss(ema, images, labels, emb))


def scheduler_config() -> dict:
    """Full config of the scheduler actually used, minus diffusers bookkeeping keys."""
    config = dict(UniPCMultistepScheduler(**SCHEDULER_CONFIG).config)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if not k.startswith("_")}


def save(out: Path, ema: WanTransformer3DModel, emb: dict, meta: dict) -> None:
    save_outputs(out, ema, video.VIDEO_TRANSFORMER_FILE, {video.VIDEO_EMBEDDINGS_FILE: emb},
                 video.VIDEO_METADATA_FILE, meta)


def main() -> None:
    args = parse_args()
    apply_threads(args)
    pixels, labels = load_digits()
    images = upsample_digits(pixels)  # (1797, 1, 16, 16) in [0, 1]
    emb = make_embeddings(args.seed)

    ema, stats = train(args, images, labels, emb)
    print(f"training: {stats['steps']} steps in {stats['seconds']} s, final loss {stats['final_loss']}, "
          f"EMA eval loss {stats['ema_eval_loss']}")
    meta = {
        "format_version": 1,
        "description": "WanTransformer3DModel rectified-flow model of moving sklearn digits, 8x16x16x1 pixel space",
        "transformer_config": TRANSFORMER_CONFIG,
        "scheduler_config": scheduler_config(),
        "num_frames": video.NUM_FRAMES,
        "frame_size": video.FRAME_SIZE,
        "channels": 1,
        "pixel_range": [-1.0, 1.0],
        "num_classes": video.NUM_CLASSES,
        "null_class": video.NULL_CLASS,
        "motions": list(video.MOTIONS),
        "motion_steps": [list(s) for s in video.MOTION_STEPS],
        "null_motion": video.NULL_MOTION,
        "text_tokens": video.DIGIT_TOKENS + video.MOTION_TOKENS,
        "text_dim": video.TEXT_DIM,
        "pipeline_call": {"height": video.PIPELINE_SIZE, "width": video.PIPELINE_SIZE,
                          "num_frames": video.PIPELINE_NUM_FRAMES, "output_type": "latent"},
        "training": training_record(
            args, "train_video_reference.py", stats,
            objective="rectified flow, x_t=(1-s)x0+s*eps, target eps-x0, s~U(0,1), timestep=1000*s",
            data="sklearn digits (1797), bilinear 8->16, each clip one digit rolled 1 px/frame right or left "
                 "at random (wrapping), frames -4..+3 around the drawn position, scaled to [-1,1]"),
    }
    save(args.out, ema, emb, meta)


if __name__ == "__main__":
    main()
