"""Whole-call skipping per row (issue 19, problem 7): a request whose strategy skips whole calls
(``options.skip_call``) shares step-level batches with any other request. Rows that skip take their
forecast; the transformer runs only on the rows that compute, embeddings included, where the call's
arguments can be cut to them (tiny diffusers Flux); otherwise (the toy DiT's unnamed ``t``, ``cond``)
the skipping rows pass through every block without computing. Either way every request equals its
solo run, and every shipped native preset is served as a request."""

from __future__ import annotations

import pytest
import torch
from toy_serving import STEPS, ToyJob, decisions, solo, step_batch

from phyai_cache import Row, enable_dit_cache, list_presets, load_config
from phyai_cache_lab.testing.toy import build_toy_dit

HIT = dict(enabled=True, strategy="fbcache", threshold=10.0, warmup_steps=1)
SKIP = {"skip_call": True}
RATIOS = [1.0, 0.99, 0.98, 0.97, 0.96, 0.95]
TIERS = [
    dict(enabled=True, strategy="taylorseer", cache_interval=2, warmup_steps=1, taylorseer_order=1, options=SKIP),
    {"enabled": False},
    dict(enabled=True, strategy="magcache", threshold=0.3, warmup_steps=1, options={"mag_ratios": RATIOS, **SKIP}),
    HIT,
    dict(enabled=True, strategy="easycache", threshold=0.5, warmup_steps=1, options=SKIP),
    dict(enabled=True, strategy="taylorseer", cache_interval=3, warmup_steps=1, separate_cfg=False, options=SKIP),
]


def _native_presets() -> list[str]:
    return [name for name in list_presets() if load_config(name).backend in ("auto", "native")]


@pytest.fixture
def toy():
    model = build_toy_dit()
    handle = enable_dit_cache(model, enabled=True, backend="native", blocks="layers")
    yield model, handle
    handle.disable()


def _serve(model, handle, tiers, guidance=lambda i: 2.0 if i % 2 else None, per_row=True):
    jobs = [ToyJob(handle.open_request(config, num_inference_steps=STEPS), seed=i, guidance=guidance(i))
            for i, config in enumerate(tiers)]
    while not all(job.done for job in jobs):
        step_batch(model, handle, [job for job in jobs if not job.done], per_row=per_row)
    for job in jobs:
        job.request.close()
    return jobs


def _assert_solo(model, handle, jobs, tiers):
    for job, config in zip(jobs, tiers):
        alone, alone_decisions = solo(model, handle, config, seed=job.seed, guidance=job.guidance)
        assert decisions(job.request) == alone_decisions, config
        torch.testing.assert_close(job.x, alone, rtol=1e-4, atol=1e-5)


def test_whole_call_skipping_requests_share_per_row_batches_and_equal_their_solo_runs(toy):
    model, handle = toy
    jobs = _serve(model, handle, TIERS)
    _assert_solo(model, handle, jobs, TIERS)
    skipped = {index: job.request.stats.calls_skipped for index, job in enumerate(jobs)}
    assert all(skipped[i] > 0 for i in (0, 2, 4, 5)) and skipped[1] == skipped[3] == 0
    for job in jobs:  # a skipped call runs no block for its rows
        assert all(r.blocks_computed == 0 for r in job.request.stats.records if r.skipped_call)
    assert handle.cache_bytes == 0


def test_a_batch_in_which_every_row_skips_runs_nothing(toy):
    model, handle = toy
    calls = []
    model.proj_in.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    tiers = [TIERS[0], dict(TIERS[0], cache_interval=2)]
    jobs = _serve(model, handle, tiers, guidance=lambda i: None)
    assert calls == [2, 2, 2, 2]  # steps 0, 1, 3, 5 compute; 2 and 4 are skipped by both requests
    _assert_solo(model, handle, jobs, tiers)


def test_per_batch_decisions_skip_the_call_only_when_every_row_would(toy):
    model, handle = toy
    for other in ({"enabled": False}, HIT):  # another layout too: a whole-call request decides before the call
        jobs = _serve(model, handle, [TIERS[0], other], guidance=lambda i: None, per_row=False)
        assert [job.request.stats.steps_cached for job in jobs] == [0, 0]
        assert "batch_computes" in {r.reason for r in jobs[0].request.stats.records}
    tiers = [TIERS[0], dict(TIERS[0])]
    jobs = _serve(model, handle, tiers, guidance=lambda i: None, per_row=False)
    assert [job.request.stats.calls_skipped for job in jobs] == [2, 2]
    _assert_solo(model, handle, jobs, tiers)


@pytest.mark.parametrize("preset", _native_presets())
def test_every_shipped_native_preset_is_served_as_a_request_and_equals_its_solo_run(toy, preset):
    model, handle = toy
    tiers = [preset, HIT, {"enabled": False}, preset]
    jobs = _serve(model, handle, tiers)
    _assert_solo(model, handle, jobs, tiers)


def test_a_failed_call_with_whole_call_skipping_requests_costs_nothing(toy):
    model, handle = toy
    block = model.layers[4]
    original, calls = block.forward, []

    def fail_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("out of memory (simulated)")
        return original(*args, **kwargs)

    block.forward = fail_once
    jobs = [ToyJob(handle.open_request(config, num_inference_steps=STEPS), seed=i, guidance=None)
            for i, config in enumerate(TIERS)]
    while not all(job.done for job in jobs):
        try:
            step_batch(model, handle, [job for job in jobs if not job.done])
        except RuntimeError:
            pass  # retried
    block.forward = original
    for job in jobs:
        job.request.close()
    assert sum(job.request.stats.calls_failed for job in jobs) == len(jobs)
    _assert_solo(model, handle, jobs, TIERS)


# -- the transformer runs only on the computing rows (tiny diffusers Flux) ------------------------


def test_the_transformer_runs_only_on_the_rows_that_compute_embeddings_included():
    from phyai_cache_lab.testing.families import family

    flux = family("flux")
    model = flux.build()
    handle = enable_dit_cache(model, enabled=True, backend="native")
    embedded = []
    model.x_embedder.register_forward_hook(lambda module, args, output: embedded.append(args[0].shape[0]))
    skip = TIERS[0]  # computes steps 0, 1, 3, 5
    configs = [skip, HIT, {"enabled": False}]

    def run(configs, seeds):
        requests = [handle.open_request(c, num_inference_steps=STEPS) for c in configs]
        kwargs = [flux.call_kwargs("cond") for _ in seeds]
        for kw, seed in zip(kwargs, seeds):
            kw["hidden_states"] = torch.randn(kw["hidden_states"].shape, generator=torch.Generator().manual_seed(seed))
        latents = torch.cat([kw["hidden_states"] for kw in kwargs])
        outputs = []
        for step in range(STEPS):
            call = {key: torch.cat([kw[key] for kw in kwargs]) for key in
                    ("encoder_hidden_states", "pooled_projections", "guidance")}
            call.update(hidden_states=latents, timestep=torch.full((len(seeds),), 1.0 - 0.1 * step),
                        img_ids=kwargs[0]["img_ids"], txt_ids=kwargs[0]["txt_ids"])
            with handle.batch([Row(r) for r in requests]), torch.no_grad():
                velocity = model(**call, return_dict=False)[0]
            latents = latents - 0.1 * velocity
            outputs.append(velocity)
        for request in requests:
            request.close()
        return torch.stack(outputs), [decisions(r) for r in requests]

    together, together_decisions = run(configs, [0, 1, 2])
    assert embedded[:STEPS] == [3, 3, 2, 3, 2, 3]  # steps 2 and 4: the skipping row is not even embedded
    for index, config in enumerate(configs):
        alone, alone_decisions = run([config], [index])
        assert together_decisions[index] == alone_decisions[0], config
        torch.testing.assert_close(together[:, index:index + 1], alone, rtol=1e-4, atol=1e-5)
    handle.disable()
