"""CUDA graphs: a cached call refuses to run under stream capture.

CUDA stream capture cannot exist on a CPU-only machine, so the guard is tested with the capture
query patched (:class:`FakeCapture`).
"""

from __future__ import annotations

import os

import pytest
import torch
from combos import served_combinations, settings_for
from counting import count_block_executions

from phyai_cache import GraphCaptureError, PhyaiCacheError, enable_dit_cache
from phyai_cache.testing.toy import build_toy_dit, denoise

os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")

GUARDED = [combo for combo in served_combinations() if combo[1] == "fbcache"]  # one strategy per backend


class FakeCapture:
    """Stands in for CUDA stream capture: while ``active``, torch.cuda reports an initialised
    context whose current stream is capturing (both queries patched; the real ones cannot say yes
    on a CPU-only machine)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.active = False
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: self.active)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: self.active)

    def start_at_call(self, module: torch.nn.Module, index: int) -> None:
        """Begin capturing right before the ``index``-th call of ``module`` (0-based), the way an
        engine warms up eagerly and then captures."""
        calls = []

        def hook(*_: object) -> None:
            calls.append(None)
            if len(calls) == index + 1:
                self.active = True

        module.register_forward_pre_hook(hook)


@pytest.fixture
def capture(monkeypatch):
    return FakeCapture(monkeypatch)


@pytest.mark.parametrize("combo", GUARDED, ids=lambda combo: combo[0])
def test_cached_transformer_call_under_capture_raises_on_every_backend(flux, capture, monkeypatch, combo):
    backend, strategy = combo
    executed = count_block_executions(monkeypatch, flux.transformer)
    handle = enable_dit_cache(flux.pipe, **settings_for(backend, strategy))
    capture.start_at_call(flux.transformer, 1)  # step 0 runs eagerly, step 1 is "captured"
    with pytest.raises(GraphCaptureError) as raised:
        flux.run(num_inference_steps=4)
    ran_before_capture = len(executed)
    capture.active = False  # the engine's capture context ends as the error leaves it
    message = str(raised.value)
    assert f"the cached transformer ({backend}/{strategy}) was called while a CUDA graph" in message
    assert "capture only uncached calls" in message and "capturable regions" in message
    assert isinstance(raised.value, PhyaiCacheError)
    stats = handle.last_run
    assert not stats.completed and stats.steps_total == 1  # step 1 was refused before it ran
    assert ran_before_capture == 4  # the 4 blocks of step 0; nothing ran while capturing
    flux.run(num_inference_steps=4)  # no capture: the same pipeline caches normally again
    assert handle.last_run.completed and handle.last_run.steps_total == 4


def test_pipeline_call_under_capture_raises_before_the_run_starts(flux, capture):
    """Capturing a whole cached pipeline call: refused at run entry, before the run's clock
    synchronises the device (which capture would reject with a cryptic CUDA error)."""
    handle = enable_dit_cache(flux.pipe, enabled=True, threshold=0.5)
    capture.active = True
    with pytest.raises(GraphCaptureError, match=r"a cached run \(native/fbcache\) was started"):
        flux.run(num_inference_steps=2)
    capture.active = False
    assert handle.last_run is None  # no run was opened
    flux.run(num_inference_steps=2)
    assert handle.last_run.steps_total == 2


def test_native_block_captured_inside_a_run_is_refused(flux, capture):
    """An engine capturing one block in the middle of a cached call would freeze that block's
    skip/compute choice: the native block wrapper refuses too, naming the block."""
    enable_dit_cache(flux.pipe, enabled=True, threshold=0.5, warmup_steps=1)
    capture.start_at_call(flux.transformer.single_transformer_blocks[0], 1)
    with pytest.raises(GraphCaptureError, match=r"cached block single_transformer_blocks\.0 was called"):
        flux.run(num_inference_steps=4)


def test_uncached_calls_may_be_captured(capture):
    """Outside a run the model is uncached, so capturing it records no decision: no error, and the
    output is the plain model's."""
    model = build_toy_dit()
    expected = denoise(model, steps=3)
    enable_dit_cache(model, blocks="layers", enabled=True, threshold=0.5)
    capture.active = True
    assert torch.equal(denoise(model, steps=3), expected)


def test_the_guard_does_not_query_cuda_when_it_was_never_initialised(flux, monkeypatch):
    """On CPU-only processes the guard is one flag test: the CUDA capture query is never made."""
    if torch.cuda.is_initialized():
        pytest.skip("CUDA is initialised in this process: the query is legitimately made")

    def must_not_be_called() -> bool:
        raise AssertionError("torch.cuda.is_current_stream_capturing called without a CUDA context")

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", must_not_be_called)
    handle = enable_dit_cache(flux.pipe, enabled=True, threshold=0.5, warmup_steps=1)
    flux.run(num_inference_steps=3, cfg=True)
    assert handle.last_run.completed

