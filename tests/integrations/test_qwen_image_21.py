"""phyai's Qwen-Image 2.1 runner rules, through attach: step 0 of each branch extracts every block's
prefix K/V (never skipped), later steps run the target tokens only (recomputed across the change).

phyai's qwen_image_21 package is newer than the snapshot and cannot run here: the model, runner and
scheduler are a stand-in written from its call pattern (phyai_cache_lab.testing.qwen_image_21).
"""

from __future__ import annotations

import pytest
import torch

from phyai_cache.integrations.phyai import attach
from phyai_cache_lab.testing.qwen_image_21 import QwenImage21Request, build_scheduler

LAYERS = 4
HITS = dict(enabled=True, strategy="fbcache", threshold=10.0, warmup_steps=0)  # caches whatever it may


def _prefix_lengths(runner) -> dict[str, list[int]]:
    return {branch: [key.shape[1] for key, _ in prefix] for branch, prefix in runner.prefixes.items()}


@pytest.mark.parametrize("condition_tokens", [0, 4])  # text to image; an image to edit (a shape change too)
def test_step_0_runs_every_block_and_stores_each_blocks_prefix(condition_tokens):
    request = dict(condition_tokens=condition_tokens, num_inference_steps=6)
    scheduler = build_scheduler(LAYERS)
    with attach(scheduler, **HITS) as cache:
        out = scheduler.step(QwenImage21Request(**request))
        stats = cache.last_run
    assert stats.branches == ["cond", "uncond"] and stats.steps_per_branch == {"cond": 6, "uncond": 6}
    for record in stats.records:
        if record.step == 0:  # the extracting call: every block ran
            assert (record.decision, record.reason, record.blocks_computed) == ("computed", "no_cache", LAYERS)
        if record.step == 1:  # target tokens only from here: nothing of step 0 is reused
            assert (record.decision, record.reason) == ("computed", "shape_changed"), record
    assert stats.steps_cached > 0 and torch.isfinite(out).all()
    prefix = QwenImage21Request().text_tokens + condition_tokens
    assert _prefix_lengths(scheduler.runner) == {"cond": [prefix] * LAYERS, "uncond": [prefix] * LAYERS}


def test_threshold_0_is_bit_identical_and_detach_restores():
    reference = build_scheduler(LAYERS).step(QwenImage21Request(condition_tokens=4))
    scheduler = build_scheduler(LAYERS)
    forward = scheduler.runner.forward
    with attach(scheduler, enabled=True, strategy="fbcache", threshold=0.0) as cache:
        assert torch.equal(scheduler.step(QwenImage21Request(condition_tokens=4)), reference)
        assert cache.last_run.steps_cached == 0
    assert scheduler.runner.forward == forward and "forward" not in vars(scheduler.runner)
    assert torch.equal(scheduler.step(QwenImage21Request(condition_tokens=4)), reference)


def test_a_call_that_extracts_again_is_never_cached():
    """A runner that extracts the prefix on every step (return_prefix_kv=True each call, same shapes):
    the rules would cache, but a skipped block returns no K/V, so each such call runs every block."""
    reference = build_scheduler(LAYERS, reextract=True).step(QwenImage21Request())
    scheduler = build_scheduler(LAYERS, reextract=True)
    with attach(scheduler, **HITS) as cache:
        out = scheduler.step(QwenImage21Request())
        stats = cache.last_run
    assert [r.reason for r in stats.records if r.step > 0] == ["stores_state"] * 10
    assert stats.steps_cached == 0 and stats.blocks_computed == stats.blocks_total
    assert torch.equal(out, reference)
    assert _prefix_lengths(scheduler.runner)["cond"] == [QwenImage21Request().text_tokens] * LAYERS


def test_whole_call_skipping_computes_across_the_mode_change():
    """skip_call decides at the transformer call: step 1's mode (return_prefix_kv False, a stored prefix)
    differs from step 0's, so it computes even where the schedule would forecast it."""
    scheduler = build_scheduler(LAYERS)
    config = dict(enabled=True, strategy="taylorseer", warmup_steps=0, compute_mask="10000000", taylorseer_order=1,
                  options={"skip_call": True})
    with attach(scheduler, **config) as cache:
        request = QwenImage21Request(num_inference_steps=8)
        out = scheduler.step(request)
        stats = cache.last_run
    assert [r.reason for r in stats.records if r.step == 1] == ["shape_changed"] * 2
    assert stats.calls_skipped == stats.steps_cached > 0 and torch.isfinite(out).all()
    assert all(output.shape == request.outputs[0].shape for output in request.outputs)
