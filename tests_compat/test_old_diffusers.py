"""phyai_cache with an older diffusers (0.35.x): what the diffusers backend offers, how it refuses what
does not exist yet, that backend="auto" falls back to native, and that what exists works."""

from __future__ import annotations

import pytest
import torch

from phyai_cache import BackendUnavailableError, DiTCacheConfigError, disable_dit_cache, enable_dit_cache
from phyai_cache.versions import MIN_VERSIONS, backend_version
from phyai_cache_lab.testing import build_tiny_pipeline

INSTALLED = backend_version("diffusers")
TABLE = MIN_VERSIONS["diffusers"]
OLD_STRATEGIES = ("fbcache", "pab", "fastercache")  # present since 0.33 / 0.35
NEW_STRATEGIES = ("taylorseer", "magcache", "textkv", "seacache")  # 0.36 / 0.37 / 0.38 / 0.41
NATIVE_TOO = ("taylorseer", "magcache")  # the native engine serves these whatever diffusers has


def test_list_backends_reports_the_old_diffusers(reports):
    report = reports["diffusers"]
    assert report.installed and report.version == INSTALLED
    assert sorted(report.available_strategies) == sorted(OLD_STRATEGIES)
    for strategy in NEW_STRATEGIES:
        support = report.strategies[strategy]
        assert not support.available
        assert support.min_version == TABLE[strategy]
        assert INSTALLED in support.reason
    assert not report.strategies["dbcache"].available


@pytest.mark.parametrize("strategy", NEW_STRATEGIES)
def test_missing_strategy_names_version_minimum_and_alternatives(flux, strategy):
    reference = flux.run(num_inference_steps=4)
    with pytest.raises(BackendUnavailableError) as info:
        enable_dit_cache(flux.pipe, enabled=True, backend="diffusers", strategy=strategy)
    message = str(info.value)
    assert f"'diffusers' {INSTALLED}" in message  # the installed version
    assert f"needs >= {TABLE[strategy]}" in message  # the minimum
    if strategy in NATIVE_TOO:
        assert f"backends that can serve '{strategy}' here: native" in message
    else:
        assert f"no installed backend can serve '{strategy}'" in message
    assert torch.equal(flux.run(num_inference_steps=4), reference)


def test_auto_falls_back_to_native_where_diffusers_is_too_old(flux, caplog):
    handle = enable_dit_cache(flux.pipe, enabled=True, strategy="taylorseer")
    assert handle.backend == "native"
    flux.run(num_inference_steps=8)
    assert handle.last_run.steps_cached > 0
    disable_dit_cache(flux.pipe)
    # magcache: native too; without diffusers' FLUX ratios (0.37+) it needs calibrated ones
    with pytest.raises(DiTCacheConfigError, match="calibrate") as info:
        enable_dit_cache(flux.pipe, enabled=True, strategy="magcache")
    assert info.value.field == "options.mag_ratios"
    handle = enable_dit_cache(flux.pipe, enabled=True, strategy="magcache", threshold=10.0, warmup_steps=1,
                              options={"mag_ratios": [1.0]})
    assert handle.backend == "native"
    flux.run(num_inference_steps=6)
    assert handle.last_run.steps_cached > 0


@pytest.mark.parametrize("cfg", [False, True])
def test_fbcache_works_and_equals_diffusers_directly(cfg):
    from diffusers.hooks.first_block_cache import FirstBlockCacheConfig

    direct = build_tiny_pipeline("flux")
    direct.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    expected = direct.run(num_inference_steps=10, cfg=cfg)
    ours = build_tiny_pipeline("flux")
    reference = ours.run(num_inference_steps=10, cfg=cfg)
    handle = enable_dit_cache(ours.pipe, enabled=True, backend="diffusers", threshold=0.5, warmup_steps=0)
    assert torch.equal(ours.run(num_inference_steps=10, cfg=cfg), expected)
    assert 0 < handle.last_run.steps_cached < handle.last_run.steps_total
    disable_dit_cache(ours.pipe)
    assert torch.equal(ours.run(num_inference_steps=10, cfg=cfg), reference)


@pytest.mark.parametrize("strategy", OLD_STRATEGIES)
def test_old_strategies_serve_with_separate_branches(flux, strategy):
    extra = dict(threshold=10.0, warmup_steps=1) if strategy == "fbcache" else {}
    handle = enable_dit_cache(flux.pipe, enabled=True, backend="diffusers", strategy=strategy, **extra)
    out = flux.run(num_inference_steps=8, cfg=True)
    stats = handle.last_run
    assert stats.steps_cached > 0 and stats.branches == ["cond", "uncond"]
    fresh = build_tiny_pipeline("flux")
    enable_dit_cache(fresh.pipe, enabled=True, backend="diffusers", strategy=strategy, **extra)
    assert torch.equal(out, fresh.run(num_inference_steps=8, cfg=True))


def test_a_run_that_raises_leaves_no_state(flux):
    """0.35's cache_context has no try/finally and nothing resets after an exception; our runs do."""
    handle = enable_dit_cache(flux.pipe, enabled=True, backend="diffusers", threshold=10.0, warmup_steps=0)

    def explode(pipe, step, timestep, callback_kwargs):
        if step == 2:
            raise RuntimeError("cancelled")
        return callback_kwargs

    with pytest.raises(RuntimeError, match="cancelled"):
        flux.pipe(**flux.call_kwargs(num_inference_steps=6, cfg=True), callback_on_step_end=explode)
    assert handle.last_run.completed is False
    after = flux.run(num_inference_steps=6, cfg=True)
    fresh = build_tiny_pipeline("flux")
    enable_dit_cache(fresh.pipe, enabled=True, backend="diffusers", threshold=10.0, warmup_steps=0)
    assert torch.equal(after, fresh.run(num_inference_steps=6, cfg=True))
