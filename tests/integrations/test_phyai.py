"""phyai's own Cosmos3 model, runners and schedulers (from its source snapshot) as the cache's client.

Everything here is phyai's real code on a CPU: only two GPU kernels (phyai_kernel's RMSNorm and
flashinfer's silu_and_mul) are replaced by CPU stand-ins (phyai_cache_lab.testing.phyai). Random weights:
these tests check what the cache does with phyai's calls, not quality.
"""

from __future__ import annotations

import pytest
import torch

from phyai_cache import (
    BackendUnavailableError,
    CacheStateError,
    DiTCacheConfigError,
    enable_dit_cache,
    get_cache_handle,
)
from phyai_cache.integrations.phyai import attach
from phyai_cache_lab.testing.phyai import (
    build_tiny_cosmos3,
    cosmos3_action_request,
    cosmos3_policy_scheduler,
    cosmos3_request,
    cosmos3_scheduler,
)

STEPS = 12
MODERATE = dict(enabled=True, strategy="fbcache", threshold=0.3)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_cosmos3()


@pytest.fixture(scope="module")
def reference(tiny):
    """The uncached output of phyai's unmodified scheduler."""
    return cosmos3_scheduler(tiny).step(cosmos3_request(tiny, steps=STEPS))


def _scheduler_of(tiny, build):
    """A fresh phyai scheduler over ``tiny``; whatever cache a test left on the model is taken off."""
    scheduler = build(tiny)
    yield scheduler
    handle = get_cache_handle(tiny.transformer)
    if handle is not None:
        handle.disable()


@pytest.fixture
def scheduler(tiny):
    yield from _scheduler_of(tiny, cosmos3_scheduler)


def test_unmodified_scheduler_caches_with_branches_apart(tiny, scheduler, caplog):
    """The issue's repro: phyai passes the timestep positionally; the calls of one step are still told
    apart (cond, uncond) and each branch counts one step per denoising step."""
    handle = enable_dit_cache(tiny.transformer, backend="native", blocks="gen_layers", **MODERATE)
    with handle.run(num_inference_steps=STEPS):
        scheduler.step(cosmos3_request(tiny, steps=STEPS))
    stats = handle.last_run
    assert stats.steps_per_branch == {"call0": STEPS, "call1": STEPS}
    assert stats.steps_cached > 0 and not stats.warnings
    for branch in ("call0", "call1"):
        assert [r.step for r in stats.records if r.branch == branch] == list(range(STEPS))
    assert "WARNING" not in caplog.text


def test_branches_never_mix(tiny, scheduler):
    """Each branch's cached decisions equal those of a run that names the branches explicitly."""
    handle = enable_dit_cache(tiny.transformer, backend="native", blocks="gen_layers", **MODERATE)
    with handle.run(num_inference_steps=STEPS):
        inferred = scheduler.step(cosmos3_request(tiny, steps=STEPS))
    inferred_records = [(r.step, r.decision, r.diff) for r in handle.last_run.records]
    forward = scheduler.runner.forward

    def named(branch, *args, **kwargs):
        with handle.branch(branch):
            return forward(branch, *args, **kwargs)

    scheduler.runner.forward = named
    with handle.run(num_inference_steps=STEPS):
        explicit = scheduler.step(cosmos3_request(tiny, steps=STEPS))
    assert torch.equal(inferred, explicit)
    assert [(r.step, r.decision, r.diff) for r in handle.last_run.records] == inferred_records


def test_attach_in_one_call(tiny, scheduler, reference):
    cache = attach(scheduler, MODERATE)
    out = scheduler.step(cosmos3_request(tiny, steps=STEPS))
    stats = cache.last_run
    assert stats.num_inference_steps == STEPS and stats.steps_per_branch == {"cond": STEPS, "uncond": STEPS}
    assert stats.steps_cached > 0 and not stats.warnings
    assert out.shape == reference.shape and not torch.equal(out, reference)
    assert (out - reference).abs().max() < 0.5 * reference.abs().max()


def test_threshold_zero_and_off_are_bit_identical(tiny, scheduler, reference):
    cache = attach(scheduler, dict(MODERATE, threshold=0.0))
    assert torch.equal(scheduler.step(cosmos3_request(tiny, steps=STEPS)), reference)
    assert cache.last_run.steps_cached == 0 and cache.last_run.steps_total == 2 * STEPS
    cache.detach()
    cache = attach(scheduler)  # engine default off
    assert torch.equal(scheduler.step(cosmos3_request(tiny, steps=STEPS)), reference)
    assert cache.last_run.strategy == "disabled" and cache.last_run.steps_cached == 0


def test_request_overrides(tiny, scheduler, reference):
    seen = []
    cache = attach(scheduler, None, on_stats=lambda request, stats: seen.append((request.seed, stats)))
    request = cosmos3_request(tiny, steps=STEPS)
    request.dit_cache = "fbcache-fast"  # a preset by name
    fast = scheduler.step(request)
    assert cache.last_run.strategy == "fbcache" and cache.last_run.steps_cached > 0
    request.dit_cache = dict(MODERATE, threshold=0.0)  # a mapping
    assert torch.equal(scheduler.step(request), reference)
    request.dit_cache = False  # off, whatever the engine default
    assert torch.equal(scheduler.step(request), reference) and cache.last_run.strategy == "disabled"
    request.dit_cache = None  # the engine default (off)
    assert torch.equal(scheduler.step(request), reference)
    assert len(seen) == 4 and all(stats is not None for _, stats in seen)
    assert not torch.equal(fast, reference)


def test_false_means_off_under_an_enabled_default(tiny, scheduler, reference):
    attach(scheduler, dict(MODERATE, threshold=0.9))
    request = cosmos3_request(tiny, steps=STEPS)
    request.dit_cache = False
    assert torch.equal(scheduler.step(request), reference)


@pytest.mark.parametrize("bad, field", [
    ("no-such-preset", "<config>"),
    ({"enabled": True, "threshold": -1}, "threshold"),
    ({"enabled": True, "strategy": "pab"}, "strategy"),
    ({"enabled": True, "backend": "diffusers"}, "backend"),
    (True, "<config>"),
    (42, "<config>"),
])
def test_bad_override_fails_that_request_only(tiny, scheduler, reference, bad, field):
    cache = attach(scheduler, MODERATE)
    good = scheduler.step(cosmos3_request(tiny, steps=STEPS))
    good_records = [(r.branch, r.decision) for r in cache.last_run.records]
    request = cosmos3_request(tiny, steps=STEPS)
    request.dit_cache = bad
    calls_before = cache.handle._lifecycle.last_run
    with pytest.raises((DiTCacheConfigError, BackendUnavailableError)) as error:
        scheduler.step(request)
    assert field in str(error.value) and "request's dit_cache" in str(error.value)
    assert cache.handle._lifecycle.last_run is calls_before  # refused before any step ran
    again = scheduler.step(cosmos3_request(tiny, steps=STEPS))  # the next request is unaffected
    assert torch.equal(again, good) and [(r.branch, r.decision) for r in cache.last_run.records] == good_records


@pytest.mark.parametrize("steps", [0, -3, 2.5, "12", True])
def test_bad_step_count_fails_before_the_first_step(tiny, scheduler, steps):
    cache = attach(scheduler, MODERATE)
    request = cosmos3_request(tiny, steps=STEPS)
    request.num_inference_steps = steps
    with pytest.raises(DiTCacheConfigError, match="num_inference_steps"):
        scheduler.step(request)
    assert cache.last_run is None


def test_detach_restores_everything(tiny, scheduler, reference):
    runner_dict, scheduler_dict = dict(scheduler.runner.__dict__), dict(scheduler.__dict__)
    forwards = {name: module.__dict__.get("forward") for name, module in tiny.transformer.named_modules()}
    cache = attach(scheduler, MODERATE)
    scheduler.step(cosmos3_request(tiny, steps=STEPS))
    cache.detach()
    assert scheduler.runner.__dict__.keys() == runner_dict.keys() and scheduler.__dict__.keys() == scheduler_dict.keys()
    assert scheduler.runner.forward.__func__ is type(scheduler.runner).forward
    assert {n: m.__dict__.get("forward") for n, m in tiny.transformer.named_modules()} == forwards
    assert torch.equal(scheduler.step(cosmos3_request(tiny, steps=STEPS)), reference)


def test_blocks_of_phyai_models_are_known(tiny):
    """No blocks= needed: the library knows Cosmos3's GEN layers and their per-row K/V arguments."""
    handle = enable_dit_cache(tiny.transformer, backend="native", **MODERATE)
    try:
        assert handle.describe()["plan"]["blocks"] == len(tiny.transformer.gen_layers)
    finally:
        handle.disable()


def test_reset_inside_a_request_is_refused(tiny, scheduler):
    cache = attach(scheduler, MODERATE)
    request = cosmos3_request(tiny, steps=STEPS)
    with cache.request(request):
        scheduler.runner.reset()  # before any call: fine (the scheduler does this itself)
        video = torch.randn(1, 4, *tiny.video_shape)
        t = torch.tensor([0.5])
        scheduler.runner.forward("cond", video, t, text_ids=request.text_ids, text_mask=request.text_mask,
                                 video_shape=tiny.video_shape)
        with pytest.raises(CacheStateError, match="reset"):
            scheduler.runner.reset()


def test_attach_refuses_what_is_not_a_phyai_runner(tiny):
    with pytest.raises(DiTCacheConfigError, match="target"):
        attach(tiny.transformer, MODERATE)


# -- the policy variant: (video, action) -------------------------------------------------------------

@pytest.fixture(scope="module")
def policy():
    return build_tiny_cosmos3(action=True, scale=0.3)


@pytest.fixture
def policy_scheduler(policy):
    yield from _scheduler_of(policy, cosmos3_policy_scheduler)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean() / b.abs().mean())


def test_policy_decides_on_the_worst_stream(policy, policy_scheduler):
    """The action tokens ride behind the video tokens: measured pooled, their change hardly moves the
    statistic. By default each stream is measured on its own and the worst decides."""
    request = cosmos3_action_request(policy, steps=STEPS)
    reference = policy_scheduler.step(request)
    errors = {}
    for streams in ("pooled", "worst"):
        cache = attach(policy_scheduler, dict(MODERATE, options={"streams": streams}))
        out = policy_scheduler.step(request)
        measured = [r.measures for r in cache.last_run.records if r.diff is not None]
        errors[streams] = (_relative(out["video"], reference["video"]), _relative(out["action"], reference["action"]),
                           cache.last_run.steps_cached)
        if streams == "worst":
            assert measured and all(set(m) == {"change_main", "change_action"} for m in measured)
            assert all(r.diff == max(r.measures.values()) for r in cache.last_run.records if r.diff is not None)
        else:
            assert not any(measured)
        cache.detach()
    assert errors["worst"][1] < errors["pooled"][1]  # the action is kept closer to the uncached one
    assert errors["worst"][2] > 0


def test_policy_default_is_worst_stream(policy, policy_scheduler):
    cache = attach(policy_scheduler, MODERATE)
    policy_scheduler.step(cosmos3_action_request(policy, steps=STEPS))
    assert any("change_action" in r.measures for r in cache.last_run.records)


def test_policy_skip_call_forecasts_the_action_too(policy, policy_scheduler):
    """A skipped call's (video, action) are both forecast: the action is never the stale last one."""
    outputs = []
    forward = policy_scheduler.runner.forward

    def recording(*args, **kwargs):
        out = forward(*args, **kwargs)
        outputs.append(tuple(t.clone() for t in out))
        return out

    policy_scheduler.runner.forward = recording
    cache = attach(policy_scheduler, dict(enabled=True, strategy="taylorseer", cache_interval=3, warmup_steps=2,
                                          taylorseer_order=1, options={"skip_call": True}))
    policy_scheduler.step(cosmos3_action_request(policy, steps=STEPS, guidance_scale=1.0))
    records = cache.last_run.records
    assert sum(r.skipped_call for r in records) > 0
    for index, record in enumerate(records):
        if record.skipped_call:
            last = max(i for i in range(index) if not records[i].skipped_call)
            video, action = outputs[index]
            assert not torch.equal(action, outputs[last][1]) and not torch.equal(video, outputs[last][0])
