"""Native strategies on every tiny pipeline family: hits, exact block accounting, per-run lifecycle.

Families include phyai's own Qwen-Image 2.1 (blocks declared with a BlockSpec; its KV cache changes
the sequence between step 0 and step 1) and Cosmos3 (one sample per call)."""

from __future__ import annotations

import pytest
import torch
from counting import count_block_executions

from phyai_cache import DiTCacheConfigError, enable_dit_cache
from phyai_cache_lab.testing import PIPELINE_FAMILIES, build_tiny_pipeline

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


# Whole-call skipping reads the call's latents from the forward's hidden_states argument; Cosmos3's
# forward takes packed lists of tokens instead, so it is refused at enable time (model untouched).
SKIP_CALL_REFUSED = {"cosmos3"}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("family", PIPELINE_FAMILIES)
def test_strategy_caches_and_counts_exactly(family, strategy, monkeypatch):
    tiny = build_tiny_pipeline(family)
    executed = count_block_executions(monkeypatch, tiny.transformer, tiny.blocks)
    settings = dict(enabled=True, backend="native", **STRATEGIES[strategy])
    if family in SKIP_CALL_REFUSED and "+skip_call" in strategy:
        reference = tiny.run(num_inference_steps=3)
        with pytest.raises(DiTCacheConfigError, match="hidden_states") as info:
            enable_dit_cache(tiny.pipe, **settings)
        assert info.value.field == "options.skip_call"
        assert torch.equal(tiny.run(num_inference_steps=3), reference)  # the refusal changed nothing
        return
    handle = enable_dit_cache(tiny.pipe, **settings)
    tiny.run(num_inference_steps=6, cfg=True)
    stats = handle.last_run
    assert stats.steps_total == 12 and set(stats.branches) == {"cond", "uncond"}
    for branch in ("cond", "uncond"):
        assert [r.step for r in stats.records if r.branch == branch] == list(range(6))
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


def runs_for(tiny) -> list[dict]:
    """RUNS, without the batch-of-2 runs for pipelines that take one sample per call (Cosmos3)."""
    limit = tiny.max_batch_size
    return [kwargs for kwargs in RUNS if limit is None or kwargs["batch_size"] <= limit]


@pytest.mark.parametrize("strategy", ["fbcache+taylorseer", "dbcache", "taylorseer"])
@pytest.mark.parametrize("family", PIPELINE_FAMILIES)
def test_run_after_run_equals_fresh_run(family, strategy):
    reused = build_tiny_pipeline(family)
    settings = dict(enabled=True, backend="native", **STRATEGIES[strategy])
    enable_dit_cache(reused.pipe, **settings)
    for kwargs in runs_for(reused):
        fresh = build_tiny_pipeline(family)
        enable_dit_cache(fresh.pipe, **settings)
        assert torch.equal(reused.run(**kwargs), fresh.run(**kwargs)), kwargs


@pytest.mark.parametrize("family", PIPELINE_FAMILIES)
def test_disable_restores_bit_identical_output(family):
    tiny = build_tiny_pipeline(family)
    reference = tiny.run(num_inference_steps=4, cfg=True)
    handle = enable_dit_cache(tiny.pipe, enabled=True, **STRATEGIES["dbcache"])
    assert not torch.equal(tiny.run(num_inference_steps=4, cfg=True), reference)
    handle.disable()
    assert torch.equal(tiny.run(num_inference_steps=4, cfg=True), reference)


KV_CASES = {
    # block-level forms only: whole-call skipping never runs the blocks, and the verified forecaster
    # recomputes step 1 for its own rule first (reason "interval")
    **{name: settings for name, settings in STRATEGIES.items() if "+skip_call" not in name and "+verify" not in name},
    # the schedule allows caching step 1 (mask 0 / a forecast step): the shape change must still compute it
    "mask-allows-step-1": dict(strategy="fbcache", threshold=10.0, warmup_steps=0, compute_mask="100000"),
    "taylorseer-forecasts-step-1": dict(strategy="taylorseer", warmup_steps=0, compute_mask="100000",
                                        taylorseer_order=1),
}


@pytest.mark.parametrize("cfg", [False, True])
@pytest.mark.parametrize("strategy", list(KV_CASES))
def test_qwenimage21_kv_cache_step_is_recomputed_in_each_branch(strategy, cfg):
    """Qwen-Image 2.1's pipeline prefills a KV cache of the text at step 0 and runs the image tokens
    only from step 1: the hidden states change shape, so step 1 must be computed in every branch
    (nothing is reused across the shape change) and the run must match a fresh pipeline's."""
    tiny = build_tiny_pipeline("qwenimage21")
    handle = enable_dit_cache(tiny.pipe, enabled=True, backend="native", **KV_CASES[strategy])
    out = tiny.run(num_inference_steps=6, cfg=cfg)
    branches = ["cond", "uncond"] if cfg else ["cond"]
    stats = handle.last_run
    assert stats.branches == branches and stats.steps_cached > 0
    for record in stats.records:
        if record.step <= 1:
            assert record.decision == "computed", record
    if strategy not in ("masked", "taylorseer"):  # those compute step 1 by their own schedule
        assert [r.reason for r in stats.records if r.step == 1] == ["shape_changed"] * len(branches)
    fresh = build_tiny_pipeline("qwenimage21")
    enable_dit_cache(fresh.pipe, enabled=True, backend="native", **KV_CASES[strategy])
    assert torch.equal(out, fresh.run(num_inference_steps=6, cfg=cfg))


@pytest.mark.parametrize("cfg", [False, True])
def test_qwenimage21_skip_call_computes_across_the_kv_mode_change(cfg):
    """Whole-call skipping on Qwen-Image 2.1: step 0 prefills the KV cache (kv_cache_mode 'extract')
    and returns the whole joint sequence, later steps ('cached') the image tokens only. The mode is
    part of the whole call's cache key, so step 1 computes (shape_changed) even where the rules would
    cache it, and a skipped call returns exactly the branch's last computed output (plain reuse)."""
    tiny = build_tiny_pipeline("qwenimage21")
    returned: list[torch.Tensor] = []
    hook = tiny.transformer.register_forward_hook(lambda module, args, output: returned.append(output[0].clone()))
    handle = enable_dit_cache(tiny.pipe, enabled=True, backend="native", strategy="magcache",
                              threshold=10.0, warmup_steps=0, options={"mag_ratios": [1.0], "skip_call": True})
    try:
        out = tiny.run(num_inference_steps=6, cfg=cfg)
    finally:
        hook.remove()
    stats = handle.last_run
    branches = ["cond", "uncond"] if cfg else ["cond"]
    assert [r.reason for r in stats.records if r.step == 1] == ["shape_changed"] * len(branches)
    assert stats.calls_skipped == stats.steps_cached > 0
    last_computed: dict[str, torch.Tensor] = {}
    for record, output in zip(stats.records, returned, strict=True):
        if record.skipped_call:
            assert torch.equal(output, last_computed[record.branch]), record
        else:
            last_computed[record.branch] = output
        if record.step >= 1:  # a decode step returns the image tokens only, skipped or not
            assert output.shape[1] == returned[-1].shape[1]
    fresh = build_tiny_pipeline("qwenimage21")
    enable_dit_cache(fresh.pipe, enabled=True, backend="native", strategy="magcache",
                     threshold=10.0, warmup_steps=0, options={"mag_ratios": [1.0], "skip_call": True})
    assert torch.equal(out, fresh.run(num_inference_steps=6, cfg=cfg))


def test_qwenimage21_needs_its_block_spec_and_the_refusal_says_so():
    tiny = build_tiny_pipeline("qwenimage21")
    with pytest.raises(DiTCacheConfigError) as info:
        enable_dit_cache(tiny.pipe, enabled=True, backend="native", strategy="fbcache")
    assert info.value.field == "blocks" and "transformer_blocks" in str(info.value)
    assert "QwenImage21Transformer2DModel has no block list that diffusers describes" in str(info.value)


@pytest.mark.parametrize("family", ["qwenimage21", "cosmos3"])
def test_cfg_on_and_off_in_one_pipeline_keep_separate_branch_state(family):
    """Runs alternating true CFG on and off equal fresh runs, and each records its own branches."""
    reused = build_tiny_pipeline(family)
    settings = dict(enabled=True, backend="native", **STRATEGIES["fbcache"])
    handle = enable_dit_cache(reused.pipe, **settings)
    for cfg in (True, False, True):
        out = reused.run(num_inference_steps=5, cfg=cfg)
        assert handle.last_run.branches == (["cond", "uncond"] if cfg else ["cond"])
        fresh = build_tiny_pipeline(family)
        enable_dit_cache(fresh.pipe, **settings)
        assert torch.equal(out, fresh.run(num_inference_steps=5, cfg=cfg))
