"""Build a stock ``diffusers.FluxPipeline`` around the trained reference transformer.

The pipeline is deliberately unmodified: third-party cache libraries detect
and patch ``FluxPipeline``/``FluxTransformer2DModel`` by class, so the
reference model must look exactly like a (very small) Flux checkpoint.

Two things make a pixel-space model fit Flux's latent pipeline:
- text encoders and tokenizers are ``None``; callers pass the per-class
  ``prompt_embeds``/``pooled_prompt_embeds`` from :func:`class_embeddings`;
- a tiny random ``AutoencoderKL`` with one block is attached only so that
  ``vae_scale_factor == 1`` (16x16 "latents" = 16x16 pixels).  It is never
  run: always use ``output_type="latent"`` and :func:`latents_to_images`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from . import assets
from .classifier import NULL_CLASS, NUM_CLASSES, check_labels  # noqa: F401  (NUM_CLASSES: re-exported)
from .imaging import IMAGE_SIZE, model_space_to_images, unpack_latents

logger = logging.getLogger(__name__)


# One down/up block -> vae_scale_factor = 2 ** (1 - 1) = 1.  Weights are random and unused.
DUMMY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (4,),
    "layers_per_block": 1,
    "latent_channels": 1,
    "norm_num_groups": 4,
    "sample_size": IMAGE_SIZE,
    "scaling_factor": 1.0,
    "shift_factor": 0.0,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": False,
}


def build_dummy_vae() -> AutoencoderKL:
    """The placeholder VAE; built under a forked RNG so loading never perturbs user seeds."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoencoderKL(**DUMMY_VAE_CONFIG)


def build_scheduler(config: dict[str, Any] | None = None) -> FlowMatchEulerDiscreteScheduler:
    """Scheduler from the saved config (static shift, so Flux's ``mu`` is ignored)."""
    config = config if config is not None else assets.load_metadata()["scheduler_config"]
    return FlowMatchEulerDiscreteScheduler.from_config(config)


def _cast(module: torch.nn.Module, dtype: torch.dtype, device: str | torch.device) -> torch.nn.Module:
    """Plain ``nn.Module.to``: diffusers' ``ModelMixin.to`` warns on every dtype cast
    (even with no fp32-pinned modules), which would spam every benchmark run."""
    return torch.nn.Module.to(module, device=device, dtype=dtype)


def load_transformer(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> FluxTransformer2DModel:
    """The trained transformer, rebuilt from its config and the fp16 state dict."""
    config = assets.load_metadata()["transformer_config"]
    with torch.random.fork_rng(devices=[]):
        model = FluxTransformer2DModel.from_config(config)
    state = assets.load_tensors(assets.TRANSFORMER_FILE)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return _cast(model, dtype, device).eval().requires_grad_(False)


def load_pipeline(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> FluxPipeline:
    """A standard ``FluxPipeline`` running the reference model.

    A fresh pipeline is built on every call so callers may patch it (e.g. enable
    a cache) without affecting other users.
    """
    pipe = FluxPipeline(
        scheduler=build_scheduler(),
        vae=build_dummy_vae(),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=load_transformer(dtype=dtype, device=device),
    )
    _cast(pipe.vae, dtype, device)
    pipe.set_progress_bar_config(disable=True)
    logger.debug("reference FluxPipeline loaded (dtype=%s, device=%s)", dtype, device)
    return pipe


def class_embeddings(
    labels: Sequence[int],
    null: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """``prompt_embeds`` (B, 4, 64) and ``pooled_prompt_embeds`` (B, 64) for digits.

    With ``null=True`` every row is the null class (label 10), i.e. the
    unconditional embedding used for classifier-free guidance.
    """
    index = check_labels(labels, allow_null=True)
    if null:
        index = torch.full_like(index, NULL_CLASS)
    table = assets.load_tensors(assets.EMBEDDINGS_FILE)
    return {
        "prompt_embeds": table["prompt_embeds"][index].to(device=device, dtype=dtype),
        "pooled_prompt_embeds": table["pooled_prompt_embeds"][index].to(device=device, dtype=dtype),
    }


def negative_embeddings(
    batch_size: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """``negative_prompt_embeds``/``negative_pooled_prompt_embeds`` from the null class."""
    null = class_embeddings([NULL_CLASS] * batch_size, dtype=dtype, device=device)
    return {
        "negative_prompt_embeds": null["prompt_embeds"],
        "negative_pooled_prompt_embeds": null["pooled_prompt_embeds"],
    }


def call_kwargs(
    labels: Sequence[int],
    num_inference_steps: int = 20,
    seed: int = 0,
    cfg_scale: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Keyword arguments for ``pipe(**kwargs)`` generating one image per label.

    A new CPU generator seeded with ``seed`` is created every call, so two
    calls with equal arguments start from identical noise.  ``cfg_scale``
    enables Flux's *true* CFG (a second, unconditional transformer call per
    step) against the null class.
    """
    check_labels(labels)
    kwargs: dict[str, Any] = {
        **class_embeddings(labels, dtype=dtype, device=device),
        "height": IMAGE_SIZE,
        "width": IMAGE_SIZE,
        "num_inference_steps": num_inference_steps,
        "generator": torch.Generator().manual_seed(seed),
        "output_type": "latent",
    }
    if cfg_scale is not None:
        kwargs.update(negative_embeddings(len(labels), dtype=dtype, device=device))
        kwargs["true_cfg_scale"] = float(cfg_scale)
    return kwargs


def latents_to_images(latents: torch.Tensor) -> torch.Tensor:
    """Packed pipeline output (B, 64, 4) -> images (B, 1, 16, 16) in [0, 1]."""
    return model_space_to_images(unpack_latents(latents))


@torch.no_grad()
def generate(
    pipe: FluxPipeline,
    labels: Sequence[int],
    num_inference_steps: int = 20,
    seed: int = 0,
    cfg_scale: float | None = None,
) -> torch.Tensor:
    """Run ``pipe`` for ``labels`` and return (B, 1, 16, 16) images in [0, 1] (float32, CPU)."""
    kwargs = call_kwargs(
        labels,
        num_inference_steps=num_inference_steps,
        seed=seed,
        cfg_scale=cfg_scale,
        dtype=pipe.transformer.dtype,
        device=pipe.transformer.device,
    )
    latents = pipe(**kwargs).images
    return latents_to_images(latents).cpu()
