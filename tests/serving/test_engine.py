"""The reference serving loop on the trained reference model: batched requests of every tier make
their solo run's decisions and match its output; the engine itself matches the stock pipeline."""

from __future__ import annotations

import pytest
import torch

from phyai_cache import enable_dit_cache
from phyai_cache.tuning import psnr
from phyai_cache_lab import reference
from phyai_cache_lab.serving import ServeRequest, StepEngine, make_trace
from phyai_cache_lab.serving.engine import serve_one

TIERS = {**dict.fromkeys(("uncached",), None), "quality": "fbcache-quality", "fast": "fbcache-fast",
         "dbcache": "dbcache-balanced", "taylorseer": "taylorseer-balanced",
         "easycache": "easycache-fast", "magcache": "magcache-fast"}  # whole-call skipping per row


def _images(latents: torch.Tensor) -> torch.Tensor:
    return reference.latents_to_images(latents)


def test_the_engine_alone_reproduces_the_stock_pipeline():
    pipe = reference.load_pipeline()
    alone = serve_one(pipe, ServeRequest("a", label=3, seed=7, num_inference_steps=8))
    assert torch.equal(alone.latents, pipe(**reference.call_kwargs([3], num_inference_steps=8, seed=7)).images)


@pytest.mark.slow
@pytest.mark.parametrize("cfg_scale", [None, 3.0])
def test_batched_requests_of_every_tier_match_their_solo_runs(cfg_scale):
    pipe = reference.load_pipeline()
    handle = enable_dit_cache(pipe, enabled=True, backend="native", strategy="fbcache")
    trace = make_trace(14, rate_per_s=500.0, seed=1, steps=12, cfg_scale=cfg_scale, tiers=tuple(TIERS))
    engine = StepEngine(pipe, handle, max_rows=8, tier_configs=TIERS)
    finished = engine.run(trace)
    assert handle.open_requests == [] and handle.cache_bytes == 0
    assert {c.request.tier for c in finished} == set(TIERS)
    assert min(engine.totals.batch_sizes) < max(engine.totals.batch_sizes) <= 8  # admitted and retired over time
    for done in finished:
        alone = serve_one(pipe, done.request, handle, tier_configs=TIERS)
        assert done.decisions == alone.decisions, done.request
        assert psnr(_images(done.latents), _images(alone.latents), 1.0) >= 50.0, done.request
    cached = [c for c in finished if c.request.tier != "uncached"]
    assert all(c.stats.steps_cached > 0 for c in cached)
    handle.disable()
