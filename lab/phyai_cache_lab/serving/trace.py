"""Seeded request traces: Poisson arrivals, each request with a digit, a seed and a cache tier."""

from __future__ import annotations

import random

from .engine import ServeRequest

# Tier -> the cache config a request of that tier opens with (a preset name; None = uncached).
TIERS: dict[str, str | None] = {
    "uncached": None,
    "quality": "fbcache-quality",
    "balanced": "fbcache-balanced",
    "fast": "fbcache-fast",
    # Whole-call skipping (options.skip_call): a skipped step runs nothing of the model for its rows.
    "easycache": "easycache-balanced",
    "magcache": "magcache-balanced",
    "magcache-fast": "magcache-fast",
}
DEFAULT_TIERS = ("uncached", "quality", "balanced", "fast")


def make_trace(num_requests: int, rate_per_s: float, seed: int = 0, steps: int = 20,
               cfg_scale: float | None = None, tiers: tuple[str, ...] = DEFAULT_TIERS) -> list[ServeRequest]:
    """``num_requests`` requests with exponential inter-arrival times at ``rate_per_s``, tiers drawn
    uniformly from ``tiers`` (names the engine's ``tier_configs`` know); the same arguments always
    give the same trace."""
    if num_requests < 1 or rate_per_s <= 0 or not tiers:
        raise ValueError("num_requests must be >= 1, rate_per_s > 0 and tiers non-empty")
    rng = random.Random(seed)
    clock, trace = 0.0, []
    for index in range(num_requests):
        clock += rng.expovariate(rate_per_s)
        trace.append(ServeRequest(request_id=f"r{index:03d}", label=rng.randrange(10), seed=rng.randrange(2**31),
                                  tier=rng.choice(tiers), arrival_s=clock, num_inference_steps=steps,
                                  cfg_scale=cfg_scale))
    return trace
