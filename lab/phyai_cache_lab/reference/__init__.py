"""Embedded reference model: a tiny Flux DiT trained on 16x16 digits.

It is the default workload for benchmarks and presets: small enough to run on
one CPU thread in about a second per batch, yet *trained*, so its step-to-step
residuals behave like a real diffusion model's (a random-weight model cannot
tell a good cache from a bad one).  Only torch + diffusers are needed here.

Typical use::

    from phyai_cache_lab.reference import load_pipeline, generate, agreement
    pipe = load_pipeline()
    images = generate(pipe, labels=list(range(10)), num_inference_steps=20, seed=0)
    print(agreement(images, list(range(10))))

The video reference model (a tiny trained Wan DiT drawing moving digits, a stock
``WanPipeline``) lives in :mod:`phyai_cache_lab.reference.video`: ``load_video_pipeline``,
``generate_video``, ``clip_quality``.

See ``docs/reference-model.md`` for how both were trained and what they measure.
"""

from .assets import WEIGHTS_DIR, load_metadata
from .classifier import agreement, classify, load_classifier
from .imaging import IMAGE_SIZE, latent_image_ids, pack_latents, unpack_latents
from .pipeline import (
    NULL_CLASS,
    NUM_CLASSES,
    build_scheduler,
    call_kwargs,
    class_embeddings,
    generate,
    latents_to_images,
    load_pipeline,
    load_transformer,
    negative_embeddings,
)
from .video import clip_quality, generate_video, load_video_pipeline, video_call_kwargs

__all__ = [
    "IMAGE_SIZE",
    "NULL_CLASS",
    "NUM_CLASSES",
    "WEIGHTS_DIR",
    "agreement",
    "build_scheduler",
    "call_kwargs",
    "class_embeddings",
    "classify",
    "clip_quality",
    "generate",
    "generate_video",
    "latent_image_ids",
    "latents_to_images",
    "load_classifier",
    "load_metadata",
    "load_pipeline",
    "load_transformer",
    "load_video_pipeline",
    "negative_embeddings",
    "pack_latents",
    "unpack_latents",
    "video_call_kwargs",
]
