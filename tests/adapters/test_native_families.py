"""Native strategies on every tiny pipeline family: hits, exact block accounting, per-run lifecycle."""

from __future__ import annotations

import pytest
import torch
from counting import count_block_executions

from phyai_cache import enable_dit_cache
from phyai_cache.testing import FAMILIES, build_tiny_pipeline

STRATEGIES = {
    "fbcache": dict(strategy="fbcache", threshold=10.0, warmup_steps=1),
    "fbcache+taylorseer": dict(strategy="fbcache", threshold=10.0, warmup_steps=1, taylorseer_order=1),
    "dbcache": dict(strategy="dbcache", front_blocks=1, back_blocks=1, threshold=10.0, warmup_steps=1),
    "taylorseer": dict(strategy="taylorseer", cache_interval=2, warmup_steps=1, taylorseer_order=2),
    "masked": dict(strategy="fbcache", threshold=10.0, warmup_steps=0, compute_mask="110101"),
    "magcache": dict(strategy="magcache", threshold=10.0, warmup_steps=1, options={"mag_ratios": [1.0, 0.95]}),
    "magcache+skip_call": dict(strategy="magcache", threshold=10.0, warmup_steps=1,
                               options={"mag_ratios": [1.0], "skip_call": True}),
    "easycache": dict(strategy="easycache", threshold=10.0, warmup_steps=1),
    "teacache": dict(strategy="teacache", threshold=10.0, warmup_steps=1),
    "taylorseer+skip_call": dict(strategy="taylorseer", cache_interval=2, warmup_steps=1, options={"skip_call": True}),
    "taylorseer+verify": dict(strategy="taylorseer", cache_interval=2, warmup_steps=1, options={"verify": 100.0}),
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("family", FAMILIES)
def test_strategy_caches_and_counts_exactly(family, strategy, monkeypatch):
    tiny = build_tiny_pipeline(family)
    executed = count_block_executions(monkeypatch, tiny.transformer)
    handle = enable_dit_cache(tiny.pipe, enabled=True, backend="native", **STRATEGIES[strategy])
    tiny.run(num_inference_steps=6, cfg=True)
    stats = handle.last_run
    assert stats.steps_total == 12 and set(stats.branches) == {"cond", "uncond"}
    assert stats.steps_cached > 0
    assert stats.blocks_computed == len(executed)
    assert stats.blocks_total == stats.steps_total * handle.describe()["plan"]["blocks"]
    if strategy == "masked":
        for record in stats.records:
            if record.step in (0, 1, 3, 5):
                assert record.decision == "computed" and record.reason in ("mask", "no_cache")
    handle.disable()


RUNS = [
    dict(batch_size=1, num_inference_steps=5),
    dict(batch_size=2, num_inference_steps=5, cfg=True),
    dict(batch_size=1, num_inference_steps=7, resolution=96, prompt_seed=3),
    dict(batch_size=1, num_inference_steps=5),
]


@pytest.mark.parametrize("strategy", ["fbcache+taylorseer", "dbcache", "taylorseer"])
@pytest.mark.parametrize("family", FAMILIES)
def test_run_after_run_equals_fresh_run(family, strategy):
    settings = dict(enabled=True, backend="native", **STRATEGIES[strategy])
    reused = build_tiny_pipeline(family)
    enable_dit_cache(reused.pipe, **settings)
    for kwargs in RUNS:
        fresh = build_tiny_pipeline(family)
        enable_dit_cache(fresh.pipe, **settings)
        assert torch.equal(reused.run(**kwargs), fresh.run(**kwargs)), kwargs


@pytest.mark.parametrize("family", FAMILIES)
def test_disable_restores_bit_identical_output(family):
    tiny = build_tiny_pipeline(family)
    reference = tiny.run(num_inference_steps=4, cfg=True)
    handle = enable_dit_cache(tiny.pipe, enabled=True, **STRATEGIES["dbcache"])
    assert not torch.equal(tiny.run(num_inference_steps=4, cfg=True), reference)
    handle.disable()
    assert torch.equal(tiny.run(num_inference_steps=4, cfg=True), reference)
