"""Test helpers: tiny random-weight, offline diffusers pipelines (see :mod:`phyai_cache.testing.tiny`)."""

from phyai_cache.testing.tiny import (
    DEFAULT_RESOLUTION,
    FAMILIES,
    TinyPipeline,
    available_families,
    build_tiny_pipeline,
    count_transformer_calls,
    family_available,
)

__all__ = [
    "DEFAULT_RESOLUTION",
    "FAMILIES",
    "TinyPipeline",
    "available_families",
    "build_tiny_pipeline",
    "count_transformer_calls",
    "family_available",
]
