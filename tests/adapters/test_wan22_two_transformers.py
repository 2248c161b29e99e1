"""Wan 2.2: a WanPipeline with transformer_2 and boundary_ratio switches denoiser mid-run.

enable_dit_cache(pipe) used to install the cache on pipe.transformer only: after the switch step,
transformer_2 ran uncached and invisible (the run's stats said 8 steps but recorded only the first
transformer's). Until the lifecycle keeps state per transformer, such a pipeline is refused; the
workaround (one handle per transformer) is pinned here at the switch step.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import WanPipeline
from snapshots import module_fingerprint, target_fingerprint

from phyai_cache import DiTCacheConfigError, enable_dit_cache
from phyai_cache_lab.testing import build_tiny_pipeline

STEPS = 8
BOUNDARY = 0.9
SETTINGS = dict(enabled=True, strategy="fbcache", threshold=10.0, warmup_steps=1)


@pytest.fixture
def wan22():
    """A tiny Wan 2.2 pipeline: two tiny Wan transformers (different weights), one shared scheduler."""
    high, low = build_tiny_pipeline("wan", seed=0), build_tiny_pipeline("wan", seed=1)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=high.pipe.scheduler,
                       transformer=high.transformer, transformer_2=low.transformer, boundary_ratio=BOUNDARY)
    pipe.set_progress_bar_config(disable=True)
    high.pipe = pipe  # call_kwargs() of the "wan" family, on the two-transformer pipeline
    return high


def calls_per_transformer(tiny, **kwargs) -> tuple[int, int]:
    counts = [0, 0]
    hooks = [model.register_forward_pre_hook(lambda m, a, i=i: counts.__setitem__(i, counts[i] + 1))
             for i, model in enumerate((tiny.pipe.transformer, tiny.pipe.transformer_2))]
    try:
        tiny.pipe(**tiny.call_kwargs(**kwargs))
    finally:
        for hook in hooks:
            hook.remove()
    return counts[0], counts[1]


def switch_step(tiny) -> int:
    """The first step that runs on transformer_2 (timestep below boundary_ratio * 1000)."""
    scheduler = tiny.pipe.scheduler
    scheduler.set_timesteps(STEPS)
    boundary = BOUNDARY * scheduler.config.num_train_timesteps
    return next(i for i, t in enumerate(scheduler.timesteps) if t < boundary)


@pytest.mark.parametrize("backend", ["native", "diffusers", "cache_dit"])
def test_a_pipeline_with_transformer_2_is_refused_and_left_untouched(wan22, backend):
    reference = wan22.run(num_inference_steps=STEPS, cfg=True)
    before = target_fingerprint(wan22.pipe), module_fingerprint(wan22.pipe.transformer_2)
    settings = dict(SETTINGS, backend=backend, threshold=0.9 if backend == "cache_dit" else 10.0)
    with pytest.raises(DiTCacheConfigError) as info:
        enable_dit_cache(wan22.pipe, **settings)
    message = str(info.value)
    assert info.value.field == "target.transformer_2"
    assert "got '<WanTransformer3DModel>'" in message and "allowed: None" in message
    assert "boundary_ratio=0.9" in message and "enable_dit_cache(pipe.transformer_2" in message
    assert (target_fingerprint(wan22.pipe), module_fingerprint(wan22.pipe.transformer_2)) == before
    assert torch.equal(wan22.run(num_inference_steps=STEPS, cfg=True), reference)


def test_a_disabled_config_still_changes_nothing(wan22):
    """The default (disabled) config never refuses: phyai runners call enable_dit_cache unconditionally."""
    handle = enable_dit_cache(wan22.pipe, enabled=False)
    assert handle.backend is None and not handle.enabled


def test_what_the_refusal_prevents_transformer_2_is_invisible_to_a_cache_on_transformer(wan22):
    """A cache on pipe.transformer alone (what enabling the pipeline did) neither caches nor counts
    transformer_2: the run says STEPS steps, its records cover only the steps before the switch."""
    switch = switch_step(wan22)
    assert 2 <= switch <= STEPS - 2
    handle = enable_dit_cache(wan22.pipe.transformer, **SETTINGS)
    with handle.run(num_inference_steps=STEPS):
        first, second = calls_per_transformer(wan22, num_inference_steps=STEPS, cfg=True)
    assert (first, second) == (2 * switch, 2 * (STEPS - switch))
    stats = handle.last_run
    assert stats.num_inference_steps == STEPS and stats.steps_total == 2 * switch
    assert max(r.step for r in stats.records) == switch - 1


def test_workaround_one_handle_per_transformer_at_the_switch_step(wan22):
    """Each transformer keeps its own state per CFG branch: at the switch step transformer_2 starts
    from nothing (its step 0, computed), never from transformer's cached residuals."""
    switch = switch_step(wan22)
    high = enable_dit_cache(wan22.pipe.transformer, **SETTINGS)
    low = enable_dit_cache(wan22.pipe.transformer_2, **SETTINGS)
    for cfg in (True, False):
        with high.run(num_inference_steps=STEPS), low.run(num_inference_steps=STEPS):
            wan22.run(num_inference_steps=STEPS, cfg=cfg)
        branches = ["cond", "uncond"] if cfg else ["cond"]
        for handle, steps in ((high, switch), (low, STEPS - switch)):
            stats = handle.last_run
            assert stats.branches == branches and stats.steps_total == steps * len(branches)
            assert stats.steps_cached > 0
            for branch in branches:
                records = [r for r in stats.records if r.branch == branch]
                assert [r.step for r in records] == list(range(steps))
                assert records[0].decision == "computed" and records[0].reason in ("warmup", "no_cache")
        at_switch = [r for r in low.last_run.records if r.step == 0]
        assert len(at_switch) == len(branches) and all(r.decision == "computed" for r in at_switch)
    high.disable()
    low.disable()


def test_workaround_runs_are_independent_of_each_other(wan22):
    """Run after run with both handles equals a fresh pipeline's run: no state survives a run."""
    settings = dict(SETTINGS)
    handles = [enable_dit_cache(m, **settings) for m in (wan22.pipe.transformer, wan22.pipe.transformer_2)]

    def run(tiny, hs, **kwargs):
        with hs[0].run(num_inference_steps=kwargs["num_inference_steps"]), \
                hs[1].run(num_inference_steps=kwargs["num_inference_steps"]):
            return tiny.run(**kwargs)

    outputs = [run(wan22, handles, num_inference_steps=STEPS, cfg=cfg, prompt_seed=seed)
               for cfg, seed in ((True, 0), (False, 1), (True, 0))]
    assert torch.equal(outputs[0], outputs[2])
