"""Test helpers: tiny random-weight, offline diffusers pipelines (see :mod:`phyai_cache_lab.testing.tiny`)."""

from phyai_cache_lab.testing.tiny import (
    DEFAULT_RESOLUTION,
    PIPELINE_FAMILIES,
    TinyPipeline,
    available_families,
    build_tiny_pipeline,
    count_transformer_calls,
    family_available,
)

__all__ = [
    "DEFAULT_RESOLUTION",
    "PIPELINE_FAMILIES",
    "TinyPipeline",
    "available_families",
    "build_tiny_pipeline",
    "count_transformer_calls",
    "family_available",
]
