#!/usr/bin/env python
"""Train the embedded reference model (tiny Flux DiT on 16x16 digits) and its classifier.

Why this exists: no pretrained diffusion weights can be downloaded here, and a
random-weight transformer is useless for judging a cache (its residuals do not
change smoothly between steps).  A 2.3 M-parameter ``FluxTransformer2DModel``
trained for ~10 CPU-minutes on sklearn's digits behaves like a real rectified
flow model and is small enough to ship as package data.

Outputs (in ``--out``):
- ``transformer.fp16.safetensors``  EMA transformer weights in fp16;
- ``class_embeddings.safetensors``  fixed random "text" embeddings, 10 digits + null class;
- ``classifier.safetensors``        64 -> 10 logistic-regression weights;
- ``reference.json``                configs, image size and training statistics.

scikit-learn is needed here (data file + classifier fit) but not at runtime.

Example::

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python tools/train_reference.py --seconds 600
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from flow_training import fit, save_outputs, training_parser, training_record

from phyai_cache_lab.cli_options import apply_threads
from phyai_cache_lab.reference import assets
from phyai_cache_lab.reference.imaging import (
    downsample_images,
    images_to_model_space,
    latent_image_ids,
    pack_latents,
    upsample_digits,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "phyai_cache" / "reference" / "weights"

NUM_CLASSES = 10
NULL_CLASS = 10
TEXT_TOKENS = 4
TEXT_DIM = 64

TRANSFORMER_CONFIG = {
    "patch_size": 1,
    "in_channels": 4,  # 2x2 packed 1-channel pixels
    "out_channels": None,
    "num_layers": 2,
    "num_single_layers": 4,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": TEXT_DIM,
    "pooled_projection_dim": TEXT_DIM,
    "guidance_embeds": False,
    "axes_dims_rope": [8, 12, 12],  # sums to the head dim
}

# Static shift 1.0: sigmas are linspace(1, 1/N), matching the uniform-t training.
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}


def parse_args() -> argparse.Namespace:
    return training_parser(__doc__.split("\n\n")[0], out=DEFAULT_OUT, seconds=600.0, batch_size=32, log_every=50,
                           label_dropout_help="probability of the null class (for CFG)").parse_args()


def digits_file() -> Path:
    """``digits.csv.gz`` inside the installed scikit-learn (read without importing sklearn)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise SystemExit("scikit-learn must be installed to train: pip install scikit-learn")
    return Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(1797, 8, 8) pixel values 0..16 and (1797,) labels."""
    with gzip.open(digits_file(), "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    pixels = torch.from_numpy(table[:, :64]).reshape(-1, 8, 8)
    labels = torch.from_numpy(table[:, 64]).long()
    return pixels, labels


def make_class_embeddings(seed: int) -> dict[str, torch.Tensor]:
    """Fixed random per-class conditioning; row 10 is the null (unconditional) class."""
    gen = torch.Generator().manual_seed(seed + 1)
    return {
        "prompt_embeds": torch.randn(NUM_CLASSES + 1, TEXT_TOKENS, TEXT_DIM, generator=gen),
        "pooled_prompt_embeds": torch.randn(NUM_CLASSES + 1, TEXT_DIM, generator=gen),
    }


def predict(model: FluxTransformer2DModel, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
            emb: dict[str, torch.Tensor], img_ids: torch.Tensor, txt_ids: torch.Tensor) -> torch.Tensor:
    """Velocity prediction with the exact inputs ``FluxPipeline`` uses (timestep in [0, 1])."""
    return model(
        hidden_states=x_t,
        timestep=t,
        encoder_hidden_states=emb["prompt_embeds"][labels],
        pooled_projections=emb["pooled_prompt_embeds"][labels],
        txt_ids=txt_ids,
        img_ids=img_ids,
        return_dict=False,
    )[0]


def flow_loss(model, x0, labels, emb, img_ids, txt_ids, gen) -> torch.Tensor:
    """Rectified flow: x_t = (1-t) x0 + t eps, target eps - x0, t ~ U(0, 1)."""
    t = torch.rand(x0.shape[0], generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
    return F.mse_loss(predict(model, x_t, t, labels, emb, img_ids, txt_ids), eps - x0)


def train(args: argparse.Namespace, data: torch.Tensor, labels: torch.Tensor,
          emb: dict[str, torch.Tensor]) -> tuple[FluxTransformer2DModel, dict]:
    """Train until the time or step budget runs out; returns the EMA model and stats."""
    torch.manual_seed(args.seed)
    model = FluxTransformer2DModel(**TRANSFORMER_CONFIG).train()
    img_ids, txt_ids = latent_image_ids(), torch.zeros(TEXT_TOKENS, 3)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"transformer: {n_params / 1e6:.2f} M params; data {tuple(data.shape)}", flush=True)

    def batch_loss(model: torch.nn.Module, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        y = labels[idx].clone()
        y[torch.rand(len(y), generator=gen) < args.label_dropout] = NULL_CLASS
        return flow_loss(model, data[idx], y, emb, img_ids, txt_ids, gen)

    return fit(args, model, len(data), batch_loss, final_window=100,
               evaluate=lambda ema: eval_loss(ema, data, labels, emb, img_ids, txt_ids))


@torch.no_grad()
def eval_loss(model, data, labels, emb, img_ids, txt_ids, n: int = 1024) -> float:
    """Flow loss of ``model`` on a fixed batch of (x0, t, eps), comparable across runs."""
    gen = torch.Generator().manual_seed(12345)
    idx = torch.randint(len(data), (n,), generator=gen)
    total = 0.0
    for chunk in idx.split(256):
        total += flow_loss(model, data[chunk], labels[chunk], emb, img_ids, txt_ids, gen).item() * len(chunk)
    return total / n


def fit_classifier(pixels: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Logistic regression on ``downsample(upsample(real))`` -- the runtime preprocessing.

    Held-out accuracy comes from an 80/20 split; the shipped weights are refit on all data.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    x = downsample_images(upsample_digits(pixels)).numpy()
    y = labels.numpy()
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    held_out = LogisticRegression(max_iter=5000, C=0.03).fit(xtr, ytr).score(xte, yte)
    clf = LogisticRegression(max_iter=5000, C=0.03).fit(x, y)
    weights = {
        "weight": torch.from_numpy(clf.coef_.astype(np.float32)),
        "bias": torch.from_numpy(clf.intercept_.astype(np.float32)),
        # Mean real 8x8 digit per class (0..16): a torch-only "real image" fixture for tests.
        "class_means": torch.stack([pixels[labels == k].mean(0) for k in range(NUM_CLASSES)]),
    }
    torch_pred = (torch.from_numpy(x) @ weights["weight"].T + weights["bias"]).argmax(1).numpy()
    if (torch_pred != clf.predict(x)).mean() > 0.001:
        raise RuntimeError("torch re-implementation of the classifier disagrees with sklearn")
    stats = {"kind": "logistic_regression", "C": 0.03, "heldout_accuracy": round(float(held_out), 4),
             "train_accuracy": round(float(clf.score(x, y)), 4)}
    return weights, stats


def scheduler_config() -> dict:
    """Full config of the scheduler actually used, minus diffusers bookkeeping keys."""
    config = dict(FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG).config)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if not k.startswith("_")}


def save(out: Path, ema: FluxTransformer2DModel, emb: dict, clf: dict, meta: dict) -> None:
    save_outputs(out, ema, assets.TRANSFORMER_FILE, {assets.EMBEDDINGS_FILE: emb, assets.CLASSIFIER_FILE: clf},
                 assets.METADATA_FILE, meta)


def main() -> None:
    args = parse_args()
    apply_threads(args)
    pixels, labels = load_digits()
    data = pack_latents(images_to_model_space(upsample_digits(pixels)))
    emb = make_class_embeddings(args.seed)

    ema, train_stats = train(args, data, labels, emb)
    clf, clf_stats = fit_classifier(pixels, labels, args.seed)
    print(f"training: {train_stats['steps']} steps in {train_stats['seconds']} s, "
          f"final loss {train_stats['final_loss']}, EMA eval loss {train_stats['ema_eval_loss']}")
    print(f"classifier held-out accuracy {clf_stats['heldout_accuracy']}")

    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in TRANSFORMER_CONFIG.items()}
    meta = {
        "format_version": 1,
        "description": "FluxTransformer2DModel rectified-flow model of sklearn digits, 16x16x1 pixel space",
        "transformer_config": config,
        "scheduler_config": scheduler_config(),
        "image_size": 16,
        "channels": 1,
        "pixel_range": [-1.0, 1.0],
        "num_classes": NUM_CLASSES,
        "null_class": NULL_CLASS,
        "text_tokens": TEXT_TOKENS,
        "text_dim": TEXT_DIM,
        "training": training_record(
            args, "train_reference.py", train_stats,
            objective="rectified flow, x_t=(1-t)x0+t*eps, target eps-x0, t~U(0,1)",
            data="sklearn digits (1797), bilinear 8->16, scaled to [-1,1]"),
        "classifier": clf_stats,
    }
    save(args.out, ema, emb, clf, meta)


if __name__ == "__main__":
    main()
