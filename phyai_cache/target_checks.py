"""Pipelines whose denoising ``enable_dit_cache`` cannot cover yet, refused before anything changes.

Wan 2.2's ``WanPipeline`` (and its image-to-video and VACE siblings) carries a second denoiser,
``transformer_2``, and switches to it at ``boundary_ratio`` of the schedule. The cache is installed on
``pipe.transformer`` only: ``transformer_2`` would run uncached while the run's stats count only the
first transformer's steps, and nothing would say so. Until the lifecycle keeps state per transformer
and per branch, such a pipeline is refused with the workaround in the message.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import DiTCacheConfigError


def refuse_second_transformer(target: Any) -> None:
    """Raise :class:`DiTCacheConfigError` for a pipeline (not a bare module) with a ``transformer_2``."""
    if isinstance(target, torch.nn.Module):
        return
    second = getattr(target, "transformer_2", None)
    if second is None:
        return
    pipeline = type(target).__name__
    boundary = getattr(getattr(target, "config", None), "boundary_ratio", None)
    switch = f"switches to it at boundary_ratio={boundary}" if boundary is not None else "can switch to it"
    raise DiTCacheConfigError(
        "target.transformer_2", f"<{type(second).__name__}>",
        "None: a pipeline that denoises with pipe.transformer alone",
        hint=f"{pipeline} {switch}, and phyai_cache caches pipe.transformer only, so transformer_2 would run "
             "uncached while the stats count only the first transformer's steps. Workaround: enable each "
             "transformer on its own, h1 = enable_dit_cache(pipe.transformer, ...) and h2 = "
             "enable_dit_cache(pipe.transformer_2, ...), and call the pipeline inside `with h1.run(), "
             "h2.run():` (each keeps its own state per CFG branch); or pass the pipeline once two-transformer "
             "support lands",
    )
