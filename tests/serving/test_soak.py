"""A soak of the serving path on the toy DiT: random tiers, random batch compositions and orders,
random cancellations. CI runs 300 requests; PHYAI_CACHE_SOAK_REQUESTS=1000 (or more) the long run
(figures in docs/reliability.md)."""

from __future__ import annotations

import os
import random

import pytest
import torch
from toy_serving import ToyJob, decisions, solo, step_batch

from phyai_cache import enable_dit_cache
from phyai_cache_lab.testing.toy import build_toy_dit

REQUESTS = int(os.environ.get("PHYAI_CACHE_SOAK_REQUESTS", "300"))
TIERS = [
    {"enabled": False},
    dict(enabled=True, strategy="fbcache", threshold=10.0, warmup_steps=1),
    dict(enabled=True, strategy="fbcache", threshold=0.08, warmup_steps=1, max_consecutive_cached=2),
    dict(enabled=True, strategy="dbcache", threshold=10.0, front_blocks=2, back_blocks=1, warmup_steps=1,
         taylorseer_order=1),
    dict(enabled=True, strategy="taylorseer", cache_interval=2, warmup_steps=1),
    dict(enabled=True, strategy="fbcache", threshold=0.2, warmup_steps=1, separate_cfg=False),
]


@pytest.mark.slow
def test_soak_leaves_nothing_behind_and_every_completed_request_equals_its_solo_run():
    rng = random.Random(1234)
    model = build_toy_dit()
    handle = enable_dit_cache(model, enabled=True, backend="native", blocks="layers")
    waiting = [(i, rng.randrange(len(TIERS)), rng.choice([None, 2.0])) for i in range(REQUESTS)]
    running: list[tuple[int, int, ToyJob]] = []
    completed, cancelled = [], 0
    while waiting or running:
        while waiting and len(running) < 8 and rng.random() < 0.7:
            index, tier, guidance = waiting.pop(0)
            running.append((index, tier, ToyJob(handle.open_request(TIERS[tier]), seed=index, guidance=guidance)))
        if not running:
            continue
        chosen = rng.sample(running, rng.randint(1, len(running)))  # random composition and order
        step_batch(model, handle, [job for _, _, job in chosen])
        for entry in list(running):
            index, tier, job = entry
            if rng.random() < 0.03:
                job.request.cancel()
                running.remove(entry)
                cancelled += 1
            elif job.done:
                job.request.close()
                running.remove(entry)
                completed.append(entry)
    assert handle.open_requests == [] and handle.cache_bytes == 0
    assert cancelled > 0 and len(completed) + cancelled == REQUESTS
    for index, tier, job in completed:
        alone, alone_decisions = solo(model, handle, TIERS[tier], seed=index, guidance=job.guidance)
        assert decisions(job.request) == alone_decisions, (index, TIERS[tier])
        torch.testing.assert_close(job.x, alone, rtol=1e-4, atol=1e-5)
    assert handle.open_requests == [] and handle.cache_bytes == 0
    handle.disable()
