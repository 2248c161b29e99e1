"""Serving on one shared model: requests with their own config and state, step-level batches with
per-row decisions, per-call overrides, and the errors for everything that cannot be served."""

from __future__ import annotations

import threading

import pytest
import torch
from snapshots import target_fingerprint
from toy_serving import STEPS, ToyJob, close_leftover_requests, decisions, solo, step_batch

from phyai_cache import (
    BackendUnavailableError,
    BlockSpec,
    CacheStateError,
    DiTCacheConfig,
    DiTCacheConfigError,
    Row,
    disable_dit_cache,
    enable_dit_cache,
)
from phyai_cache.config import preset_path
from phyai_cache_lab.testing.toy import build_toy_dit


def open_preset(name: str) -> str:
    return preset_path(name).read_text()

NATIVE = dict(enabled=True, backend="native", strategy="fbcache", blocks="layers")
HIT = dict(enabled=True, strategy="fbcache", threshold=10.0, warmup_steps=1)  # random weights: always hits


@pytest.fixture
def model():
    return build_toy_dit()


@pytest.fixture
def seen(model):
    """The batch size every block really executes with (recorded under the cache's wrappers)."""
    return _rows_seen(model)


@pytest.fixture
def handle(model, seen):
    handle = enable_dit_cache(model, **NATIVE)
    yield handle
    close_leftover_requests(handle)
    handle.disable()


def _rows_seen(model):
    """Record the batch size every block sees; installed before the cache, so it sits under the
    cache's wrappers and records only real executions."""
    seen = []
    for position, block in enumerate(model.layers):
        original = block.forward

        def forward(x, emb, _original=original, _position=position):
            seen.append((_position, x.shape[0]))
            return _original(x, emb)

        block.forward = forward
    return seen


def test_requests_open_with_their_own_configs_and_leave_the_handle_alone(handle):
    a = handle.open_request("fbcache-fast")
    b = handle.open_request(threshold=0.3)  # the handle's config with an override
    c = handle.open_request({"enabled": False}, request_id="plain")
    d = handle.open_request(DiTCacheConfig(enabled=True, strategy="dbcache", front_blocks=2, back_blocks=1))
    assert a.config == DiTCacheConfig.from_yaml(open_preset("fbcache-fast"))
    assert (b.config.threshold, c.config.enabled, d.config.front_blocks) == (0.3, False, 2)
    assert handle.config.threshold == DiTCacheConfig(**{k: v for k, v in NATIVE.items() if k != "blocks"}).threshold
    assert set(handle.open_requests) == {a.id, b.id, "plain", d.id} and len({a.id, b.id, d.id}) == 3
    for request in (a, b, c, d):
        request.close()
    assert handle.open_requests == [] and all(r.closed for r in (a, b, c, d))


def test_per_row_batches_decide_every_request_like_its_solo_run(model, handle):
    configs = [HIT, {"enabled": False}, dict(HIT, strategy="dbcache", front_blocks=2, back_blocks=1),
               dict(enabled=True, strategy="taylorseer", cache_interval=2, warmup_steps=1),
               dict(HIT, threshold=0.0), dict(HIT, separate_cfg=False)]
    jobs = [ToyJob(handle.open_request(config), seed=i, guidance=2.0 if i % 2 else None)
            for i, config in enumerate(configs)]
    while not all(job.done for job in jobs):
        step_batch(model, handle, [job for job in jobs if not job.done])
    for index, (job, config) in enumerate(zip(jobs, configs)):
        job.request.close()
        alone, alone_decisions = solo(model, handle, config, seed=index, guidance=job.guidance)
        assert decisions(job.request) == alone_decisions, config
        torch.testing.assert_close(job.x, alone, rtol=1e-4, atol=1e-5)
    reasons = {record.reason for job in jobs for record in job.request.stats.records}
    assert {"cached", "disabled", "interval", "above_threshold", "warmup"} <= reasons
    assert handle.cache_bytes == 0


def test_middle_blocks_run_only_on_the_rows_that_compute(model, handle, seen):
    cached = ToyJob(handle.open_request(HIT), seed=0, guidance=None)
    uncached = ToyJob(handle.open_request({"enabled": False}), seed=1, guidance=None)
    step_batch(model, handle, [cached, uncached])  # step 0: warmup, both compute
    assert seen == [(p, 2) for p in range(len(model.layers))]
    seen.clear()
    step_batch(model, handle, [cached, uncached])  # step 1: the first request caches
    assert seen == [(0, 2)] + [(p, 1) for p in range(1, len(model.layers))]  # front block on both
    assert handle.last_batch.compute_fraction == pytest.approx((6 + 1) / 12)
    assert [g["decision"] for g in handle.last_batch.groups] == ["cached", "computed"]


def test_a_batch_that_all_caches_or_all_computes_gathers_nothing(model, handle, seen, monkeypatch):
    jobs = [ToyJob(handle.open_request(HIT), seed=i, guidance=None) for i in range(3)]
    gathers = []
    real = torch.Tensor.index_select
    monkeypatch.setattr(torch.Tensor, "index_select", lambda self, *a, **k: gathers.append(1) or real(self, *a, **k))
    seen.clear()
    step_batch(model, handle, jobs)  # all compute (warmup)
    step_batch(model, handle, jobs)  # all cache
    assert gathers == []
    assert seen == [(p, 3) for p in range(len(model.layers))] + [(0, 3)]


def test_batched_cfg_with_shared_decisions_follows_the_leader_in_the_same_call(model, handle):
    job = ToyJob(handle.open_request(dict(HIT, threshold=0.05, separate_cfg=False)), seed=3, guidance=3.0)
    while not job.done:
        step_batch(model, handle, [job])
    records = job.request.stats.records
    for cond, uncond in zip(records[::2], records[1::2]):
        assert (cond.branch, uncond.branch) == ("cond", "uncond")
        assert cond.decision == uncond.decision
        assert uncond.reason in ("warmup", "cached") or uncond.reason == "follows_cond"


def test_per_batch_mode_computes_unless_every_row_would_cache(model, handle):
    cached = ToyJob(handle.open_request(HIT), seed=0, guidance=None)
    plain = ToyJob(handle.open_request({"enabled": False}), seed=1, guidance=None)
    for _ in range(3):
        step_batch(model, handle, [cached, plain], per_row=False)
    reasons = [r.reason for r in cached.request.stats.records]
    assert reasons == ["warmup", "batch_computes", "batch_computes"]
    assert handle.last_batch.compute_fraction == 1.0


def test_disabled_requests_in_a_batch_are_bit_identical_to_the_untouched_model(model, handle):
    jobs = [ToyJob(handle.open_request({"enabled": False}), seed=i, guidance=1.5) for i in range(2)]
    x = torch.cat([j.x for j in jobs for _ in j.branches])
    t = torch.full((4,), 0.5)
    cond = torch.randn(4, 16, generator=torch.Generator().manual_seed(9))
    with handle.batch([Row(j.request, b) for j in jobs for b in j.branches]):
        cached = model(x, t, cond)
    reference = build_toy_dit()(x, t, cond)
    assert torch.equal(cached, reference)


# -- what cannot be served fails before anything runs ---------------------------------------


def test_bad_rows_are_refused_before_anything_runs(model, handle, seen):
    request = handle.open_request(HIT)
    other = enable_dit_cache(build_toy_dit(), **NATIVE)
    foreign = other.open_request(HIT)
    x, t, cond = torch.zeros(2, 8, 8), torch.zeros(2), torch.zeros(2, 16)
    cases = [
        ([Row(request, "cond"), Row(request, "cond")], CacheStateError, "appears twice"),
        ([Row(foreign, "cond"), Row(request, "cond")], CacheStateError, "not opened on this cache handle"),
        ([Row(request, "cond")], CacheStateError, "batch has 2 rows but the row list describes 1"),
        ([Row(request, "cond", size=0)], DiTCacheConfigError, r"rows\[0\]\.size"),
        ([Row(request, "")], DiTCacheConfigError, r"rows\[0\]\.branch"),
        ([], DiTCacheConfigError, "non-empty list"),
    ]
    for rows, error, message in cases:
        with pytest.raises(error, match=message):
            with handle.batch(rows):
                model(x, t, cond)
    request.close()
    with pytest.raises(CacheStateError, match="closed"):
        with handle.batch([Row(request, "cond")]):
            pass
    assert seen == [] and request.stats.steps_total == 0
    foreign.close()
    other.disable()


@pytest.mark.parametrize("config, error, field", [
    (dict(enabled=True, strategy="pab"), BackendUnavailableError, "pab"),
    (dict(enabled=True, strategy="dbcache", front_blocks=6, back_blocks=0), DiTCacheConfigError, "front_blocks"),
    (dict(enabled=True, options={"x": 1}), DiTCacheConfigError, "options.x"),
    (dict(enabled=True, backend="diffusers"), DiTCacheConfigError, "backend"),
    (dict(enabled=True, threshold=-1), DiTCacheConfigError, "threshold"),
])
def test_a_request_the_engine_cannot_serve_is_refused_when_it_opens(handle, config, error, field):
    with pytest.raises(error, match=field):
        handle.open_request(config)
    assert handle.open_requests == []


def test_upstream_backends_refuse_requests_batches_and_overrides_naming_the_native_engine(flux):
    handle = enable_dit_cache(flux.pipe, enabled=True, backend="diffusers", strategy="fbcache")
    for operation in (lambda: handle.open_request(), lambda: handle.override(threshold=0.2).__enter__(),
                      lambda: handle.batch([]).__enter__()):
        with pytest.raises(BackendUnavailableError, match="backend 'native'"):
            operation()
    handle.disable()


def test_a_handle_disabled_by_a_config_for_an_upstream_backend_has_no_requests_to_open(model):
    handle = enable_dit_cache(model, enabled=False, backend="diffusers")
    with pytest.raises(CacheStateError, match="disabled by its config"):
        handle.open_request(HIT)


# -- lifecycle ------------------------------------------------------------------------------


def test_closing_frees_the_state_and_cancel_marks_the_request_incomplete(model, handle):
    done, dropped = (ToyJob(handle.open_request(HIT), seed=i, guidance=None) for i in range(2))
    step_batch(model, handle, [done, dropped])
    assert handle.cache_bytes > 0
    dropped.request.cancel()
    done.request.close()
    assert handle.cache_bytes == 0
    assert done.request.stats.completed and not dropped.request.stats.completed
    assert done.request.stats.steps_total == 1


def test_disable_with_open_requests_is_refused_then_restores_the_target(model):
    before = target_fingerprint(model)
    handle = enable_dit_cache(model, **NATIVE)
    request = handle.open_request(HIT)
    with pytest.raises(CacheStateError, match="request"):
        handle.disable()
    request.close()
    disable_dit_cache(model)
    assert target_fingerprint(model) == before


def test_a_request_closed_during_its_forward_is_freed_when_the_forward_ends(model, handle):
    closing = ToyJob(handle.open_request(HIT), seed=0, guidance=None)
    other = ToyJob(handle.open_request(HIT), seed=1, guidance=None)
    block = model.layers[3]
    original = block.forward

    def close_midway(x, emb):
        closing.request.close()  # e.g. a client disconnect handled by another thread
        assert closing.request.closed and handle.cache_bytes > 0  # still in use by this forward
        return original(x, emb)

    block.forward = close_midway
    step_batch(model, handle, [closing, other])
    block.forward = original
    assert handle.open_requests == [other.request.id]
    assert closing.request.stats.steps_total == 1 and closing.request.stats.completed
    with pytest.raises(CacheStateError, match="closed"):
        step_batch(model, handle, [closing, other])


def test_a_forward_that_raises_records_it_and_leaves_the_requests_usable(model, handle):
    job = ToyJob(handle.open_request(HIT), seed=0, guidance=None)
    block = model.layers[2]
    original = block.forward
    block.forward = lambda x, emb: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        step_batch(model, handle, [job])
    block.forward = original
    records = job.request.stats.records
    assert [(r.step, r.decision, r.blocks_computed) for r in records] == [(0, "raised", 2)]  # with what ran
    step_batch(model, handle, [job])  # the same step again (tests/serving/test_faults.py: equal to solo)
    job.request.close()
    assert job.request.stats.steps_total == 1 and job.request.stats.calls_failed == 1 and handle.cache_bytes == 0
    assert [r.step for r in job.request.stats.records] == [0, 0]


def test_requests_open_and_close_from_other_threads_while_a_scheduler_steps(model, handle):
    errors: list[BaseException] = []
    stop = threading.Event()

    def client(seed: int) -> None:
        try:
            while not stop.is_set():
                handle.open_request(HIT).close()
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    try:
        jobs = [ToyJob(handle.open_request(HIT), seed=i, guidance=None) for i in range(3)]
        while not all(j.done for j in jobs):
            step_batch(model, handle, [j for j in jobs if not j.done])
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert errors == []
    for job in jobs:
        job.request.close()
        assert job.request.stats.steps_total == STEPS
    assert handle.open_requests == [] and handle.cache_bytes == 0


# -- block arguments ------------------------------------------------------------------------


class GatedBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x, gate):
        return x + self.linear(x) * gate[:, None]


class GatedModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(GatedBlock() for _ in range(3))

    def forward(self, x, gate):
        for block in self.blocks:
            x = block(x, gate)
        return x


def _two_requests_one_cached(handle, model):
    a, b = handle.open_request(HIT), handle.open_request({"enabled": False})
    x, gate = torch.randn(2, 5, 4), torch.rand(2, 4)
    try:
        for _ in range(2):  # step 0 computes both; step 1 runs the middle blocks on b's row only
            with handle.batch([Row(a), Row(b)]):
                output = model(x, gate)
    finally:
        a.close()
        b.close()
    return output, x, gate


def test_an_ambiguous_per_row_argument_is_refused_with_its_name():
    model = GatedModel()
    handle = enable_dit_cache(model, enabled=True, backend="native", blocks="blocks")
    with pytest.raises(CacheStateError, match=r"'gate'.*row_args=\('gate',\)"):
        _two_requests_one_cached(handle, model)
    handle.disable()


def test_a_declared_per_row_argument_is_sliced_with_its_rows():
    model = GatedModel()
    handle = enable_dit_cache(model, enabled=True, backend="native",
                              blocks=BlockSpec("blocks", row_args=("gate",)))
    output, x, gate = _two_requests_one_cached(handle, model)
    handle.disable()
    torch.testing.assert_close(output[1:], model(x[1:], gate[1:]))  # b's row: the real model, alone


# -- per-call overrides ---------------------------------------------------------------------


def test_an_override_runs_one_pipeline_call_with_another_config_and_leaves_the_handle_alone(flux):
    handle = enable_dit_cache(flux.pipe, enabled=True, backend="native", strategy="fbcache",
                              threshold=10.0, warmup_steps=1)
    with handle.override(threshold=0.0):
        flux.pipe(**flux.call_kwargs(num_inference_steps=4))
    assert handle.last_run.steps_cached == 0 and handle.config.threshold == 10.0
    flux.pipe(**flux.call_kwargs(num_inference_steps=4))
    assert handle.last_run.steps_cached == 3
    with handle.override("fbcache-fast"):
        flux.pipe(**flux.call_kwargs(num_inference_steps=4))
    assert handle.last_run.strategy == "fbcache" and handle.last_run.steps_total == 4
    handle.disable()


def test_a_bad_override_fails_before_the_call(flux):
    handle = enable_dit_cache(flux.pipe, enabled=True, backend="native", strategy="fbcache")
    with pytest.raises(DiTCacheConfigError, match="front_blocks"):
        with handle.override(strategy="dbcache", front_blocks=99):
            flux.pipe(**flux.call_kwargs(num_inference_steps=2))
    assert handle.last_run is None
    with handle.run():
        with pytest.raises(CacheStateError, match="inside a run"):
            handle.override(threshold=0.1).__enter__()
    handle.disable()
