"""Embedded reference model: a tiny Flux DiT trained on 16x16 digits.

It is the default workload for benchmarks and presets: small enough to run on
one CPU thread in about a second per batch, yet *trained*, so its step-to-step
residuals behave like a real diffusion model's (a random-weight model cannot
tell a good cache from a bad one).  Only torch + diffusers are needed here.

Typical use::

    from phyai_cache.reference import load_pipeline, generate, agreement
    pipe = load_pipeline()
    images = generate(pipe, labels=list(range(10)), num_inference_steps=20, seed=0)
    print(agreement(images, list(range(10))))

See ``docs/reference-model.md`` for how it was trained and what it measures.
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
    "generate",
    "latent_image_ids",
    "latents_to_images",
    "load_classifier",
    "load_metadata",
    "load_pipeline",
    "load_transformer",
    "negative_embeddings",
    "pack_latents",
    "unpack_latents",
]
