"""Same strategy, same meaning: fbcache makes the same per-step decisions on every backend.

Run on the trained reference model (random weights show no step-to-step redundancy, so they cannot
tell whether two backends agree on realistic diffs). Each backend that serves fbcache runs the same
seeds, steps and threshold; the per-step decisions must be identical and the measured diffs must
agree closely (backends differ only in reduction precision).
"""

from __future__ import annotations

import pytest
import torch

from phyai_cache import enable_dit_cache, list_backends
from phyai_cache_lab.reference import call_kwargs, load_pipeline

FBCACHE_BACKENDS = [r.name for r in list_backends() if r.installed and "fbcache" in r.available_strategies]
pytestmark = pytest.mark.skipif(len(FBCACHE_BACKENDS) < 2, reason="needs two backends serving fbcache")


@pytest.fixture(scope="module")
def pipe():
    pipeline = load_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _decisions(pipe, backend: str, threshold: float, cfg_scale: float | None):
    handle = enable_dit_cache(pipe, enabled=True, backend=backend, strategy="fbcache", threshold=threshold,
                              warmup_steps=2)
    try:
        with torch.no_grad():
            pipe(**call_kwargs([0, 3, 7, 9], num_inference_steps=20, seed=1, cfg_scale=cfg_scale))
        stats = handle.last_run
    finally:
        handle.disable()
    return [(r.branch, r.step, r.decision) for r in stats.records], [r.diff for r in stats.records]


@pytest.mark.parametrize("cfg_scale", [None, 2.0])
@pytest.mark.parametrize("threshold", [0.15, 0.3])
def test_fbcache_decisions_agree_across_backends(pipe, threshold, cfg_scale):
    results = {backend: _decisions(pipe, backend, threshold, cfg_scale) for backend in FBCACHE_BACKENDS}
    reference_decisions, reference_diffs = results["native"]
    assert any(d == "cached" for _, _, d in reference_decisions), "the threshold should produce hits"
    for backend, (decisions, diffs) in results.items():
        assert decisions == reference_decisions, backend
        for ours, theirs in zip(reference_diffs, diffs):
            if ours is not None and theirs is not None:
                assert theirs == pytest.approx(ours, rel=1e-3, abs=1e-5), backend


MAGCACHE_BACKENDS = [r.name for r in list_backends() if r.installed and "magcache" in r.available_strategies]


@pytest.mark.skipif(len(MAGCACHE_BACKENDS) < 2, reason="needs native and diffusers serving magcache")
@pytest.mark.parametrize("cfg_scale", [None, 2.0])
@pytest.mark.parametrize("options", [{}, {"mag_ratios": [1.0, 0.97, 0.95, 0.96, 0.94, 0.95, 0.93, 0.9]}])
def test_magcache_decisions_agree_across_backends(pipe, options, cfg_scale):
    """The native MagCache follows diffusers' arithmetic: the same ratios (FLUX.1-dev's by default on
    this FluxTransformer2DModel, or a list interpolated to 20 steps) take the same decisions."""
    results = {}
    for backend in MAGCACHE_BACKENDS:
        handle = enable_dit_cache(pipe, enabled=True, backend=backend, strategy="magcache", threshold=0.15,
                                  warmup_steps=2, max_consecutive_cached=3, options=options)
        try:
            with torch.no_grad():
                pipe(**call_kwargs([0, 3, 7, 9], num_inference_steps=20, seed=1, cfg_scale=cfg_scale))
            results[backend] = [(r.branch, r.step, r.decision) for r in handle.last_run.records]
        finally:
            handle.disable()
    assert any(d == "cached" for _, _, d in results["native"])
    assert any(d == "computed" for _, _, d in results["native"][2:])
    assert results["diffusers"] == results["native"]
