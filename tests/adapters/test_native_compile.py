"""Regional torch.compile (each block compiled, CPU inductor): decisions stay outside compiled code."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from phyai_cache import enable_dit_cache
from phyai_cache_lab.testing import build_tiny_pipeline
from phyai_cache_lab.testing.toy import build_toy_dit, denoise

pytestmark = pytest.mark.slow

SETTINGS = dict(enabled=True, threshold=0.5, warmup_steps=2, taylorseer_order=1)


def _eager_reference():
    model = build_toy_dit()
    handle = enable_dit_cache(model, blocks="layers", **SETTINGS)
    output = denoise(model, steps=8, guidance=2.0, handle=handle)
    return output, [(r.branch, r.decision) for r in handle.last_run.records]


def test_blocks_compiled_in_place_match_eager():
    expected, expected_decisions = _eager_reference()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = build_toy_dit()
    for layer in model.layers:
        layer.compile(backend="inductor")
    handle = enable_dit_cache(model, blocks="layers", **SETTINGS)
    for _ in range(2):  # second run: no recompilation needed for the cache's bookkeeping
        output = denoise(model, steps=8, guidance=2.0, handle=handle)
        assert torch.allclose(output, expected, atol=1e-5, rtol=1e-5)
        assert [(r.branch, r.decision) for r in handle.last_run.records] == expected_decisions
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    assert not any("item" in reason for reason in breaks), "the decision's host sync was traced"
    assert handle.last_run.steps_cached > 0


def test_diffusers_compile_repeated_blocks_on_flux():
    tiny = build_tiny_pipeline("flux")
    handle = enable_dit_cache(tiny.pipe, enabled=True, threshold=10.0, warmup_steps=1)
    expected = tiny.run(num_inference_steps=5)
    decisions = [r.decision for r in handle.last_run.records]
    handle.disable()
    torch._dynamo.reset()
    tiny.transformer.compile_repeated_blocks(backend="inductor")
    handle = enable_dit_cache(tiny.pipe, enabled=True, threshold=10.0, warmup_steps=1)
    output = tiny.run(num_inference_steps=5)
    assert torch.allclose(output, expected, atol=1e-4, rtol=1e-4)
    assert [r.decision for r in handle.last_run.records] == decisions
