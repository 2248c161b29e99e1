"""Serving under faults (issue 19): a bad or failing request never costs its neighbours.

Each test names the problem of the issue it covers; every one failed before the change. The model is
the toy DiT (random weights) driven by the step-level loop of ``toy_serving``; Qwen-Image is the
tiny diffusers model of the support matrix.
"""

from __future__ import annotations

import threading

import pytest
import torch
from snapshots import target_fingerprint
from toy_serving import STEPS, ToyJob, close_leftover_requests, decisions, solo, step_batch

from phyai_cache import (
    CacheStateError,
    DistributedCacheError,
    DiTCacheConfigError,
    RequestClosedError,
    RequestFailedError,
    Row,
    enable_dit_cache,
    load_config,
)
from phyai_cache_lab.testing.toy import build_toy_dit

NATIVE = dict(enabled=True, backend="native", strategy="fbcache", blocks="layers")
HIT = dict(enabled=True, strategy="fbcache", threshold=10.0, warmup_steps=1)  # random weights: always hits
RATIOS = [1.0, 0.99, 0.98, 0.97, 0.96, 0.95]
# One request of every kind of state a step moves: residuals, forecaster factors, scheduled counters,
# method accumulators (magcache, easycache, teacache), shared CFG decisions.
TIERS = [
    HIT,
    {"enabled": False},
    dict(HIT, strategy="dbcache", front_blocks=2, back_blocks=1, taylorseer_order=1),
    dict(enabled=True, strategy="taylorseer", cache_interval=2, warmup_steps=1),
    dict(enabled=True, strategy="magcache", threshold=0.2, warmup_steps=1, options={"mag_ratios": RATIOS}),
    dict(enabled=True, strategy="easycache", threshold=0.5, warmup_steps=1),
    dict(enabled=True, strategy="teacache", threshold=0.3, warmup_steps=1, options={"probe": "input"}),
    dict(HIT, threshold=0.2, separate_cfg=False),
]


@pytest.fixture
def model():
    return build_toy_dit()


@pytest.fixture
def handle(model):
    handle = enable_dit_cache(model, **NATIVE)
    yield handle
    close_leftover_requests(handle)
    handle.disable()


def _jobs(handle, tiers=TIERS):
    return [ToyJob(handle.open_request(config, num_inference_steps=STEPS), seed=i, guidance=2.0 if i % 2 else None)
            for i, config in enumerate(tiers)]


def _assert_solo(model, handle, jobs, tiers=TIERS):
    for job, config in zip(jobs, tiers):
        alone, alone_decisions = solo(model, handle, config, seed=job.seed, guidance=job.guidance)
        assert decisions(job.request) == alone_decisions, config
        torch.testing.assert_close(job.x, alone, rtol=1e-4, atol=1e-5)


class _FailOnce:
    """Makes block ``position`` raise ``error`` the ``at``-th time it runs (an OOM inside a block)."""

    def __init__(self, model, position: int, at: int, error: BaseException) -> None:
        self.block, self.at, self.error, self.calls = model.layers[position], at, error, 0
        self.original = self.block.forward
        self.block.forward = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise self.error
        return self.original(*args, **kwargs)


# -- problem 1: a bad step count is refused at admission ------------------------------------------


@pytest.mark.parametrize("steps", [0, -5, "20", 2.5, True])
def test_a_bad_step_count_is_refused_when_the_request_opens(model, handle, steps):
    healthy = ToyJob(handle.open_request(HIT, num_inference_steps=STEPS), seed=0, guidance=None)
    for config in (HIT, TIERS[4]):
        with pytest.raises(DiTCacheConfigError, match="num_inference_steps"):
            handle.open_request(config, num_inference_steps=steps)
    assert handle.open_requests == [healthy.request.id]
    while not healthy.done:
        step_batch(model, handle, [healthy])
    _assert_solo(model, handle, [healthy], [HIT])
    with pytest.raises(DiTCacheConfigError, match="num_inference_steps"):
        with handle.run(num_inference_steps=steps):
            pass


# -- problem 2: a failed transformer call costs nothing ---------------------------------------------


@pytest.mark.parametrize("position", [0, 3, 5])  # before any decision, mid-chain, after residuals are stored
def test_a_failed_call_leaves_every_request_as_before_and_the_retry_equals_the_solo_run(model, handle, position):
    jobs = _jobs(handle)
    failing = _FailOnce(model, position, at=3, error=RuntimeError("CUDA out of memory (simulated)"))
    retried = 0
    while not all(job.done for job in jobs):
        try:
            step_batch(model, handle, [job for job in jobs if not job.done])
        except RuntimeError as error:
            assert "out of memory" in str(error)
            retried += 1  # the engine retries the same step
    model.layers[position].forward = failing.original
    assert retried == 1
    for job in jobs:
        raised = [r for r in job.request.stats.records if r.decision == "raised"]
        assert [r.reason for r in raised] == ["raised"] * len(job.branches)
        assert job.request.stats.calls_failed == len(job.branches)
        assert job.request.stats.steps_total == STEPS * len(job.branches) and not job.request.failed
        job.request.close()
    _assert_solo(model, handle, jobs)
    assert handle.cache_bytes == 0


def test_after_a_failed_call_the_engine_may_cancel_one_request_and_go_on(model, handle):
    jobs = _jobs(handle)
    failing = _FailOnce(model, 3, at=1, error=RuntimeError("bad request"))
    with pytest.raises(RuntimeError):
        step_batch(model, handle, jobs)  # step 0 of every request fails
    step_batch(model, handle, jobs[:1] + jobs[2:])  # the block is fine again; request 1 is not stepped
    model.layers[3].forward = failing.original
    jobs[1].request.cancel()  # the engine blames request 1 and drops it
    survivors, tiers = jobs[:1] + jobs[2:], TIERS[:1] + TIERS[2:]
    while not all(job.done for job in survivors):
        step_batch(model, handle, [job for job in survivors if not job.done])
    for job in survivors:
        job.request.close()
    assert not jobs[1].request.stats.completed and jobs[1].request.stats.steps_total == 0
    _assert_solo(model, handle, survivors, tiers)
    assert handle.cache_bytes == 0 and handle.open_requests == []


def test_a_failed_collective_marks_the_requests_failed_and_their_next_use_says_so(model, handle):
    """Where a failure cannot be undone (a collective failed: the other ranks may have moved on), the
    requests are marked failed. The collective is simulated: the error is raised by a block."""
    jobs = _jobs(handle, TIERS[:2])
    step_batch(model, handle, jobs)
    failing = _FailOnce(model, 3, at=1, error=DistributedCacheError("rank 1 timed out (simulated)"))
    with pytest.raises(DistributedCacheError):
        step_batch(model, handle, jobs)
    model.layers[3].forward = failing.original
    assert all(job.request.failed for job in jobs)
    with pytest.raises(RequestFailedError, match="failed: its transformer call raised DistributedCacheError"):
        step_batch(model, handle, jobs)
    assert isinstance(RequestFailedError(""), CacheStateError)
    fresh = ToyJob(handle.open_request(HIT, num_inference_steps=STEPS), seed=0, guidance=None)
    for job in jobs:
        job.request.cancel()
    while not fresh.done:  # the model serves new requests
        step_batch(model, handle, [fresh])
    fresh.request.close()
    _assert_solo(model, handle, [fresh], [HIT])
    assert handle.cache_bytes == 0 and handle.open_requests == []


# -- problem 3: per-batch compatibility is checked before anything runs ----------------------------


def test_a_per_batch_call_with_different_layouts_is_refused_before_any_step(model, handle):
    jobs = _jobs(handle, [HIT, TIERS[2]])  # front/back 1/0 and 2/1
    seen = []
    for block in model.layers:
        block.register_forward_pre_hook(lambda *_: seen.append(1))
    with pytest.raises(CacheStateError, match="same front/back blocks"):
        step_batch(model, handle, jobs, per_row=False)
    assert seen == [] and all(job.request.stats.steps_total == 0 for job in jobs)
    while not all(job.done for job in jobs):  # per row, they share batches
        step_batch(model, handle, jobs)
    for job in jobs:
        job.request.close()
    _assert_solo(model, handle, jobs, [HIT, TIERS[2]])


# -- problem 4: block arguments; Qwen-Image's encoder_hidden_states_mask --------------------------


def _qwen_batch(family, rows):
    """One call with rows (seed, padded tokens) side by side; a padded prompt has its last tokens masked."""
    kwargs = [family.call_kwargs("cond") for _ in rows]
    for kw, (seed, padded) in zip(kwargs, rows):
        g = torch.Generator().manual_seed(seed)
        kw["hidden_states"] = torch.randn(kw["hidden_states"].shape, generator=g)
        kw["encoder_hidden_states"] = torch.randn(kw["encoder_hidden_states"].shape, generator=g)
        if padded:
            kw["encoder_hidden_states_mask"][:, -padded:] = 0
    batch = {key: torch.cat([kw[key] for kw in kwargs]) for key in ("hidden_states", "encoder_hidden_states",
                                                                   "encoder_hidden_states_mask")}
    batch["img_shapes"] = [shape for kw in kwargs for shape in kw["img_shapes"]]
    return batch


def test_qwen_image_padded_prompts_share_a_per_row_batch_without_a_block_spec():
    from phyai_cache_lab.testing.families import family

    qwen = family("qwenimage")
    model = qwen.build()
    handle = enable_dit_cache(model, enabled=True, backend="native")
    rows = [(1, 3), (2, 0)]

    def run(configs, rows):
        requests = [handle.open_request(config, num_inference_steps=3) for config in configs]
        outputs = []
        for step in range(3):
            kwargs = _qwen_batch(qwen, rows)
            kwargs["timestep"] = torch.full((len(rows),), 1.0 - 0.01 * step)
            with handle.batch([Row(r) for r in requests]), torch.no_grad():
                outputs.append(model(**kwargs, return_dict=False)[0])
        for request in requests:
            request.close()
        return torch.stack(outputs), [decisions(r) for r in requests]

    together, together_decisions = run([HIT, {"enabled": False}], rows)
    assert together_decisions[0][1][2] == "cached"  # the rows differ at step 1: only the second runs
    for index, config in enumerate([HIT, {"enabled": False}]):
        alone, alone_decisions = run([config], rows[index:index + 1])
        assert together_decisions[index] == alone_decisions[0]
        torch.testing.assert_close(together[:, index:index + 1], alone, rtol=1e-4, atol=1e-5)
    handle.disable()


def test_an_ambiguous_block_argument_is_refused_at_the_first_mixed_batch_at_no_cost():
    from test_requests import GatedModel

    model = GatedModel()
    handle = enable_dit_cache(model, enabled=True, backend="native", blocks="blocks")
    a, b = handle.open_request(HIT), handle.open_request({"enabled": False})
    with pytest.raises(CacheStateError, match=r"'gate'.*row_args=\('gate',\)"):
        with handle.batch([Row(a), Row(b)]):  # step 0: every row computes, and still refused
            model(torch.randn(2, 5, 4), torch.rand(2, 4))
    assert a.stats.steps_total == b.stats.steps_total == 0 and a.stats.calls_failed == 1
    assert a.cache_bytes == 0
    a.close()
    b.close()
    handle.disable()


# -- problems 5 and 9: thread-safe figures, a per-request memory figure ----------------------------


def test_every_figure_can_be_read_from_a_metrics_thread_while_requests_open_close_and_run(model, handle):
    errors: list[BaseException] = []
    stop = threading.Event()
    jobs = _jobs(handle)
    seen_bytes = []

    def poll() -> None:
        try:
            while not stop.is_set():
                seen_bytes.append(handle.cache_bytes)
                for job in jobs:
                    job.request.cache_bytes, job.request.stats.to_dict(), job.request.stats.summary()
                _ = handle.open_requests, handle.last_batch
        except BaseException as error:  # reported below
            errors.append(error)

    def churn() -> None:
        try:
            while not stop.is_set():
                request = handle.open_request(HIT)
                _ = request.cache_bytes
                request.close()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=poll), threading.Thread(target=churn)]
    for thread in threads:
        thread.start()
    try:
        while not all(job.done for job in jobs):
            step_batch(model, handle, [job for job in jobs if not job.done])
            assert sum(job.request.cache_bytes for job in jobs) == handle.cache_bytes or errors
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert errors == [] and max(seen_bytes) > 0
    held = [job.request.cache_bytes for job in jobs]
    assert held[1] == 0 and all(b > 0 for i, b in enumerate(held) if i != 1)  # the uncached one holds nothing
    for job in jobs:
        job.request.close()
        assert job.request.cache_bytes == 0 and 0 < job.request.stats.cache_bytes or job is jobs[1]
    assert handle.cache_bytes == 0


# -- problem 6: a request closed meanwhile has its own error --------------------------------------


def test_a_row_naming_a_request_closed_meanwhile_raises_request_closed_and_costs_nothing(model, handle):
    jobs = _jobs(handle, [HIT, TIERS[2]])
    step_batch(model, handle, jobs)
    jobs[0].request.cancel()  # another thread: a client disconnected
    with pytest.raises(RequestClosedError, match="closed") as raised:
        step_batch(model, handle, jobs)
    assert isinstance(raised.value, CacheStateError)
    while not jobs[1].done:  # the scheduler drops the row and goes on
        step_batch(model, handle, jobs[1:])
    jobs[1].request.close()
    _assert_solo(model, handle, jobs[1:], [TIERS[2]])


# -- problem 7: overrides merge into a preset's options -------------------------------------------


def test_an_override_of_one_option_keeps_the_presets_calibrated_options(handle):
    preset = load_config("magcache-balanced")
    request = handle.open_request("magcache-balanced", options={"skip_call": False}, num_inference_steps=20)
    assert request.config.options == {**preset.options, "skip_call": False}
    assert request.config.options["mag_ratios"] == preset.options["mag_ratios"]
    assert load_config("magcache-balanced", options={"skip_call": False}).options["mag_ratios"] == \
        preset.options["mag_ratios"]
    request.close()


# -- problem 8: a handle whose default is off serves requests; False means off --------------------


def test_a_handle_enabled_with_the_default_off_serves_uncached_and_cached_requests(model):
    before = target_fingerprint(model)
    handle = enable_dit_cache(model, None, blocks="layers")  # the engine default: off
    assert target_fingerprint(model) == before and not handle.enabled  # nothing installed until a request
    uncached = [ToyJob(handle.open_request(None), seed=0, guidance=2.0),  # the engine default: off
                ToyJob(handle.open_request(False), seed=1, guidance=None)]
    while not all(job.done for job in uncached):
        step_batch(model, handle, uncached)
    plain = [ToyJob(_Unserved(), seed=job.seed, guidance=job.guidance) for job in uncached]
    while not all(job.done for job in plain):  # the untouched model with the same rows
        step_batch(build_toy_dit(), _Unserved(), plain)
    assert all(torch.equal(a.x, b.x) for a, b in zip(uncached, plain))  # bit for bit
    tiers = [HIT, TIERS[3], {"enabled": False}]
    jobs = [ToyJob(handle.open_request(config, num_inference_steps=STEPS), seed=i, guidance=None)
            for i, config in enumerate(tiers)]
    while not all(job.done for job in jobs):
        step_batch(model, handle, [job for job in jobs if not job.done])
    for job in uncached + jobs:
        job.request.close()
    assert [job.request.config.enabled for job in uncached + jobs] == [False, False, True, True, False]
    reference = enable_dit_cache(build_toy_dit(), **NATIVE)
    _assert_solo(reference._target.transformer, reference, jobs, tiers)
    reference.disable()
    handle.disable()
    assert target_fingerprint(model) == before


class _Unserved:
    """Stands in for a handle and a request where the loop runs the plain model."""

    def batch(self, rows, per_row=True):
        import contextlib

        return contextlib.nullcontext()


def test_false_means_no_cache_on_an_enabled_handle(handle):
    request = handle.open_request(False)
    assert not request.config.enabled and handle.config.enabled
    request.close()


# -- problem 9: presets are parsed once, and every request gets its own config ---------------------


def test_presets_are_parsed_once_and_requests_do_not_share_mutable_options(handle, monkeypatch):
    import yaml

    load_config("magcache-fast")  # parsed (at most) here
    parses = []
    real = yaml.safe_load
    monkeypatch.setattr(yaml, "safe_load", lambda *a, **k: parses.append(1) or real(*a, **k))
    first = handle.open_request("magcache-fast", options={"skip_call": False}, num_inference_steps=20)
    second = handle.open_request("magcache-fast", options={"skip_call": False}, num_inference_steps=20)
    assert parses == []
    first.config.options["mag_ratios"]["20"][0] = 123.0  # a careless caller
    assert second.config.options["mag_ratios"]["20"][0] == 1.0
    assert load_config("magcache-fast").options["mag_ratios"]["20"][0] == 1.0
    first.close()
    second.close()
