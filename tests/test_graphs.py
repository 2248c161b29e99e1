"""CUDA graphs: a cached call refuses to run under stream capture; what a capturing engine relies on.

CUDA stream capture cannot exist on a CPU-only machine, so the guard is tested with the capture
query patched (:class:`FakeCapture`); the real capture is exercised by benchmarks/gpu_validate.py on
a GPU. Host syncs are counted by the aten ops torch executes (phyai_cache_lab.testing.syncs), not by
the names of our functions, so the counts survive refactors of the decision code.
"""

from __future__ import annotations

import os

os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")  # read once, when cache_dit is first imported

import pytest  # noqa: E402
import torch  # noqa: E402
from combos import served_combinations, settings_for  # noqa: E402
from counting import count_block_executions  # noqa: E402

from phyai_cache import GraphCaptureError, PhyaiCacheError, enable_dit_cache  # noqa: E402
from phyai_cache.graphs import cached_tensors  # noqa: E402
from phyai_cache_lab.testing.syncs import HostSyncCounter  # noqa: E402
from phyai_cache_lab.testing.toy import build_toy_dit, denoise  # noqa: E402

GUARDED = [combo for combo in served_combinations() if combo[1] == "fbcache"]  # one strategy per backend
MEASURED = {
    "fbcache": dict(strategy="fbcache", threshold=0.5, warmup_steps=1),
    "dbcache": dict(strategy="dbcache", threshold=0.5, warmup_steps=1, front_blocks=1, back_blocks=1),
}
SCHEDULED = {"taylorseer": dict(strategy="taylorseer", warmup_steps=1, cache_interval=2, taylorseer_order=1)}


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


# -- what a capturing engine relies on ----------------------------------------------------------


def _per_call_syncs(flux, settings: dict | None) -> tuple[list[int], list]:
    handle = enable_dit_cache(flux.pipe, enabled=True, **settings) if settings else None
    with HostSyncCounter(flux.transformer) as syncs:
        flux.run(num_inference_steps=6, cfg=True)
    records = handle.last_run.records if handle else []
    if handle:
        handle.disable()
    return syncs.per_call, records


@pytest.mark.parametrize("name", [*MEASURED, *SCHEDULED])
def test_host_syncs_per_transformer_call(flux, name):
    """A measured decision costs at most one host sync per transformer call, and only when it is
    measured; a scheduled strategy decides on the host without reading the device at all."""
    baseline, _ = _per_call_syncs(flux, None)  # the model's own syncs, if any
    counts, records = _per_call_syncs(flux, {**MEASURED, **SCHEDULED}[name])
    assert len(counts) == len(baseline) == len(records) == 12  # 6 steps x cond/uncond
    extra = [cached - plain for cached, plain in zip(counts, baseline)]
    for record, syncs in zip(records, extra):
        measured = record.diff is not None
        assert syncs <= (1 if measured else 0), (record, syncs)
    if name in MEASURED:
        assert sum(extra) >= 1, "the counter must see the measured decision's sync"
    else:
        assert sum(extra) == 0


def _slot_shapes(handle) -> dict[str, tuple]:
    return {path: (tuple(t.shape), t.dtype) for path, t in cached_tensors(handle).items()}


@pytest.mark.parametrize("name", [*MEASURED, *SCHEDULED])
def test_cached_tensors_keep_their_shapes_across_steps(flux, name):
    """Static slots are possible: each cached tensor has one shape and dtype for the whole run, and
    the set of tensors stops growing (no per-step allocation under new names)."""
    handle = enable_dit_cache(flux.pipe, enabled=True, **{**MEASURED, **SCHEDULED}[name])
    snapshots: list[dict[str, tuple]] = []
    flux.transformer.register_forward_hook(lambda *_: snapshots.append(_slot_shapes(handle)))
    flux.run(num_inference_steps=8, cfg=True)
    assert handle.last_run.steps_cached > 0 and len(snapshots) == 16
    assert cached_tensors(handle) == {}  # outside a run the cache holds nothing
    seen: dict[str, tuple] = {}
    for snapshot in snapshots:
        assert set(seen) <= set(snapshot), "a cached tensor disappeared within the run"
        for path, shape in snapshot.items():
            assert seen.setdefault(path, shape) == shape, (path, seen[path], shape)
    half = len(snapshots) // 2
    assert all(set(s) == set(snapshots[-1]) for s in snapshots[half:]), "the cache kept growing"
    assert any("['cond']" in path for path in seen) and any("['uncond']" in path for path in seen)
