"""Native fbcache/dbcache on a real diffusers FluxPipeline: hits, per-run lifecycle, CFG, stats."""

from __future__ import annotations

import pytest
import torch
from counting import count_block_executions

from phyai_cache import CacheStateError, disable_dit_cache, enable_dit_cache
from phyai_cache_lab.testing import build_tiny_pipeline

HIT = {"enabled": True, "threshold": 10.0, "warmup_steps": 1}  # random weights: only a high threshold hits


def test_high_threshold_caches_and_threshold_zero_does_not(flux):
    handle = enable_dit_cache(flux.pipe, **HIT)
    flux.run(num_inference_steps=8)
    stats = handle.last_run
    assert stats.steps_cached > 0
    assert stats.steps_total == 8 and stats.num_inference_steps == 8
    disable_dit_cache(flux.pipe)
    handle = enable_dit_cache(flux.pipe, enabled=True, threshold=0.0)
    flux.run(num_inference_steps=8)
    assert handle.last_run.steps_cached == 0


def test_stats_count_what_really_ran(flux, monkeypatch):
    """blocks_computed must equal the block forwards that actually executed."""
    executed = count_block_executions(monkeypatch, flux.transformer)
    handle = enable_dit_cache(flux.pipe, **HIT)
    flux.run(num_inference_steps=8)
    stats = handle.last_run
    assert stats.blocks_computed == len(executed)
    assert stats.blocks_total == 4 * stats.steps_total
    for record in stats.records:
        assert record.blocks_computed == (1 if record.decision == "cached" else 4)
    assert stats.steps_cached + stats.steps_computed == stats.steps_total
    assert stats.latency_s > 0 and stats.peak_memory_bytes > 0 and stats.cache_bytes > 0
    assert stats.to_dict()["records"][0]["branch"] == "cond"


def test_warmup_active_steps_and_caps(flux):
    handle = enable_dit_cache(flux.pipe, enabled=True, threshold=10.0, warmup_steps=3,
                              active_steps=[0, 7], max_cached_steps=3, max_consecutive_cached=2)
    flux.run(num_inference_steps=10)
    reasons = [r.reason for r in handle.last_run.records]
    decisions = [r.decision for r in handle.last_run.records]
    assert reasons[:3] == ["warmup"] * 3
    assert reasons[7:] == ["inactive"] * 3
    assert decisions.count("cached") == 3
    streak = longest = 0
    for decision in decisions:
        streak = streak + 1 if decision == "cached" else 0
        longest = max(longest, streak)
    assert longest <= 2
    assert "max_consecutive" in reasons or "max_cached" in reasons


RUNS = [  # batch size, resolution, steps, prompt, cfg
    dict(batch_size=1, resolution=64, num_inference_steps=6, prompt_seed=0),
    dict(batch_size=2, resolution=64, num_inference_steps=6, prompt_seed=0),
    dict(batch_size=1, resolution=96, num_inference_steps=8, prompt_seed=1),
    dict(batch_size=1, resolution=64, num_inference_steps=4, prompt_seed=2, cfg=True),
    dict(batch_size=2, resolution=80, num_inference_steps=6, prompt_seed=3, cfg=True),
    dict(batch_size=1, resolution=64, num_inference_steps=6, prompt_seed=0),
]


@pytest.mark.parametrize("strategy", ["fbcache", "dbcache"])
def test_run_after_run_equals_fresh_run(strategy):
    """No pollution: each run on a long-lived cached pipeline equals the same run on a fresh one."""
    settings = dict(HIT, strategy=strategy)
    if strategy == "dbcache":
        settings.update(front_blocks=1, back_blocks=1)
    reused = build_tiny_pipeline("flux")
    handle = enable_dit_cache(reused.pipe, **settings)
    for kwargs in RUNS:
        out = reused.run(**kwargs)
        stats = handle.last_run
        fresh = build_tiny_pipeline("flux")
        fresh_handle = enable_dit_cache(fresh.pipe, **settings)
        expected = fresh.run(**kwargs)
        assert torch.equal(out, expected), kwargs
        assert [(r.step, r.branch, r.decision) for r in stats.records] == \
               [(r.step, r.branch, r.decision) for r in fresh_handle.last_run.records]
        assert stats.steps_total == kwargs["num_inference_steps"] * (2 if kwargs.get("cfg") else 1)
        assert stats.steps_cached > 0


def test_a_run_that_raises_leaves_nothing_behind(flux):
    handle = enable_dit_cache(flux.pipe, **HIT)

    def explode(pipe, step, timestep, callback_kwargs):
        if step == 3:
            raise RuntimeError("cancelled by the caller")
        return callback_kwargs

    with pytest.raises(RuntimeError, match="cancelled"):
        flux.pipe(**flux.call_kwargs(num_inference_steps=8), callback_on_step_end=explode)
    assert handle.last_run.completed is False
    assert handle.last_run.steps_total == 4
    after = flux.run(num_inference_steps=8)
    fresh = build_tiny_pipeline("flux")
    enable_dit_cache(fresh.pipe, **HIT)
    assert torch.equal(after, fresh.run(num_inference_steps=8))
    assert handle.last_run.completed is True


def test_cfg_branches_keep_separate_state(flux):
    handle = enable_dit_cache(flux.pipe, **HIT)
    flux.run(num_inference_steps=6, cfg=True)
    records = handle.last_run.records
    for branch in ("cond", "uncond"):
        steps = [r.step for r in records if r.branch == branch]
        assert steps == list(range(6)), "each branch counts its own steps"
        first = next(r for r in records if r.branch == branch)
        assert first.decision == "computed"


def test_shared_cfg_decision_follows_the_first_branch(flux):
    handle = enable_dit_cache(flux.pipe, separate_cfg=False, **HIT)
    flux.run(num_inference_steps=6, cfg=True)
    by_step = {}
    for record in handle.last_run.records:
        by_step.setdefault(record.step, []).append(record)
    for cond, uncond in by_step.values():
        assert uncond.diff is None  # the follower does not measure
        assert cond.decision == uncond.decision


def test_transformer_called_outside_the_pipeline_runs_uncached(flux, caplog):
    enable_dit_cache(flux.pipe, **HIT)
    transformer = flux.pipe.transformer
    inputs = dict(hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 8, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]))
    first = transformer(**inputs).sample
    second = transformer(**inputs).sample
    assert torch.equal(first, second)
    assert "outside a pipeline call" in caplog.text


def test_enabling_twice_is_refused_without_changes(flux):
    enable_dit_cache(flux.pipe, **HIT)
    with pytest.raises(CacheStateError, match="already enabled"):
        enable_dit_cache(flux.pipe, **HIT)
    with pytest.raises(CacheStateError, match="already enabled"):
        enable_dit_cache(flux.pipe.transformer, **HIT)
    assert flux.run(num_inference_steps=4) is not None


def test_disable_via_transformer_and_handle_context_manager(flux):
    reference = flux.run(num_inference_steps=4)
    enable_dit_cache(flux.pipe, **HIT)
    disable_dit_cache(flux.pipe.transformer)
    assert torch.equal(flux.run(num_inference_steps=4), reference)
    with enable_dit_cache(flux.pipe, **HIT) as handle:
        assert handle.enabled
        flux.run(num_inference_steps=4)
    assert not handle.enabled
    assert torch.equal(flux.run(num_inference_steps=4), reference)


def test_dbcache_back_blocks_always_run(flux):
    handle = enable_dit_cache(flux.pipe, strategy="dbcache", front_blocks=2, back_blocks=1,
                              enabled=True, threshold=10.0, warmup_steps=1)
    flux.run(num_inference_steps=6)
    cached = [r for r in handle.last_run.records if r.decision == "cached"]
    assert cached and all(r.blocks_computed == 3 for r in cached)
    assert handle.describe()["plan"]["back"] == ["single_transformer_blocks.1"]
