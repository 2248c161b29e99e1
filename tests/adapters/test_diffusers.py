"""The diffusers backend on real tiny diffusers pipelines: strategy x model matrix, per-run and per-branch
state, atomic install, options, and each measured upstream bug the adapter must not inherit
(docs/backend-diffusers.md lists them with the test that covers each)."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch
from counting import count_block_executions
from diffusers import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig
from diffusers.hooks.hooks import HookRegistry
from snapshots import target_fingerprint

import phyai_cache.lifecycle as lifecycle_module
from phyai_cache import (
    BackendUnavailableError,
    CacheStateError,
    DiTCacheConfigError,
    disable_dit_cache,
    enable_dit_cache,
)
from phyai_cache.adapters.diffusers import DiffusersBackend
from phyai_cache.versions import MIN_VERSIONS
from phyai_cache_lab.testing import PIPELINE_FAMILIES, build_tiny_pipeline
from phyai_cache_lab.testing.families import SERVED, family, run_family

STRATEGIES = ("fbcache", "pab", "fastercache", "taylorseer", "magcache")
ON = {"enabled": True, "backend": "diffusers"}
FLAT_RATIOS = {"mag_ratios": [1.0] * 8}  # random weights: any ratio list works; Flux uses FLUX_MAG_RATIOS
# Random weights only hit with permissive settings.
HIT = {
    "fbcache": dict(threshold=10.0, warmup_steps=1),
    "pab": {},
    "fastercache": {},
    "taylorseer": {},
    "magcache": dict(threshold=10.0),
}
# What a user must supply beyond HIT for the strategy to serve that model at all.
REQUIRED_OPTIONS = {("magcache", family): FLAT_RATIOS for family in PIPELINE_FAMILIES if family != "flux"}
# Combinations that cannot serve with those settings: (error, field it names).
REFUSED = {
    ("taylorseer", "wan"): (DiTCacheConfigError, "options.cache_identifiers"),
    # Qwen-Image 2.1: diffusers' block registry does not describe QwenImage21TransformerBlock, which its
    # FirstBlockCache and MagCache hooks need (the attention-level caches do not).
    ("fbcache", "qwenimage21"): (DiTCacheConfigError, "target"),
    ("magcache", "qwenimage21"): (DiTCacheConfigError, "target"),
    # Cosmos3: its blocks take `gen_seq`/`und_seq`, which diffusers' block hooks do not look up; its
    # attention modules (`self_attn`) match none of FasterCache's and TaylorSeer's default patterns.
    ("fbcache", "cosmos3"): (DiTCacheConfigError, "target"),
    ("magcache", "cosmos3"): (DiTCacheConfigError, "target"),
    ("fastercache", "cosmos3"): (DiTCacheConfigError, "options.spatial_attention_block_identifiers"),
    ("taylorseer", "cosmos3"): (DiTCacheConfigError, "options.cache_identifiers"),
}


def settings(strategy: str, family: str = "flux", **extra) -> dict:
    config = dict(ON, strategy=strategy, **HIT[strategy])
    options = REQUIRED_OPTIONS.get((strategy, family))
    if options:
        config["options"] = dict(options)
    config.update(extra)
    return config


@pytest.fixture
def untouched(flux):
    """Yields the Flux pipeline; afterwards its fingerprint and output must be as before."""
    reference = flux.run(num_inference_steps=4)
    fingerprint = target_fingerprint(flux.pipe)
    yield flux.pipe
    assert target_fingerprint(flux.pipe) == fingerprint
    assert torch.equal(flux.run(num_inference_steps=4), reference)


def leftover_diffusers_state(transformer) -> list[str]:
    """Per-context states or advanced counters still held by diffusers hooks."""
    leftovers = []
    for name, module in transformer.named_modules():
        registry = module.__dict__.get("_diffusers_hook")
        for hook_name, hook in (registry.hooks.items() if registry else ()):
            for value in vars(hook).values():
                if getattr(value, "_state_cache", None):
                    leftovers.append(f"{name}:{hook_name}")
            if getattr(getattr(hook, "state", None), "iteration", 0):
                leftovers.append(f"{name}:{hook_name}")
    return leftovers


# -- versions and support -----------------------------------------------------------------------


def test_strategy_support_follows_the_version_table():
    backend = DiffusersBackend()
    table = MIN_VERSIONS["diffusers"]
    assert not any(s.available for s in backend.strategy_support(None).values())
    at_035 = backend.strategy_support("0.35.2")
    assert [s for s in STRATEGIES if at_035[s].available] == ["fbcache", "pab", "fastercache"]
    assert at_035["taylorseer"].min_version == table["taylorseer"]
    assert "no TaylorSeerCache" in at_035["taylorseer"].reason
    assert not at_035["dbcache"].available and "native" in at_035["dbcache"].reason
    assert not backend.strategy_support("0.34.0")["fbcache"].available
    assert all(backend.supports(s).available for s in STRATEGIES)  # the installed 0.42.1


def test_auto_uses_diffusers_for_strategies_only_it_serves(flux):
    handle = enable_dit_cache(flux.pipe, enabled=True, strategy="pab")
    assert handle.backend == "diffusers"


def test_importing_the_adapter_does_not_import_diffusers():
    code = "import sys, phyai_cache, phyai_cache.adapters.diffusers; print('diffusers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# -- the strategy x model matrix ----------------------------------------------------------------


@pytest.mark.parametrize("family", PIPELINE_FAMILIES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_model_matrix(strategy, family, monkeypatch):
    """Serves with steps cached and stats filled, or refuses at enable time leaving the pipeline as it was;
    after disable, bit-identical to never enabled."""
    tiny = build_tiny_pipeline(family)
    reference = tiny.run(num_inference_steps=8, cfg=True)
    fingerprint = target_fingerprint(tiny.pipe)
    refused = REFUSED.get((strategy, family))
    if refused:
        error, field = refused
        with pytest.raises(error) as info:
            enable_dit_cache(tiny.pipe, **settings(strategy, family))
        assert info.value.field == field
    else:
        executed = count_block_executions(monkeypatch, tiny.transformer)  # class level
        handle = enable_dit_cache(tiny.pipe, **settings(strategy, family))
        tiny.run(num_inference_steps=8, cfg=True)
        stats = handle.last_run
        blocks = sum(len(getattr(tiny.transformer, name)) for name in tiny.block_lists)
        assert stats.steps_total == 16 and stats.branches == ["cond", "uncond"]
        assert stats.steps_cached > 0, [(r.branch, r.decision, r.reason) for r in stats.records]
        assert stats.blocks_total == 16 * blocks
        assert stats.blocks_computed == len(executed)
        assert stats.latency_s > 0 and stats.peak_memory_bytes > 0 and stats.cache_bytes > 0
        for branch in ("cond", "uncond"):
            assert [r.step for r in stats.records if r.branch == branch] == list(range(8))
        disable_dit_cache(tiny.pipe)
        monkeypatch.undo()
    assert target_fingerprint(tiny.pipe) == fingerprint
    assert torch.equal(tiny.run(num_inference_steps=8, cfg=True), reference)


PHYAI_SERVED = [(strategy, family) for family in ("qwenimage21", "cosmos3") for strategy in STRATEGIES
                if (strategy, family) not in REFUSED]


@pytest.mark.parametrize("strategy, family", PHYAI_SERVED)
def test_phyai_families_cfg_on_and_off_run_after_run(strategy, family):
    """Qwen-Image 2.1 and Cosmos3 on the diffusers caches that serve them: CFG switched on and off from
    run to run; every run equals a fresh pipeline's and records its own branches and steps."""
    reused = build_tiny_pipeline(family)
    handle = enable_dit_cache(reused.pipe, **settings(strategy, family))
    for cfg in (True, False, True):
        out = reused.run(num_inference_steps=8, cfg=cfg)
        stats = handle.last_run
        branches = ["cond", "uncond"] if cfg else ["cond"]
        assert stats.branches == branches and stats.steps_cached > 0
        for branch in branches:
            assert [r.step for r in stats.records if r.branch == branch] == list(range(8))
        fresh = build_tiny_pipeline(family)
        enable_dit_cache(fresh.pipe, **settings(strategy, family))
        assert torch.equal(out, fresh.run(num_inference_steps=8, cfg=cfg))


@pytest.mark.parametrize("strategy", ["pab", "fastercache"])
def test_attention_reuse_across_qwenimage21_kv_cache_mode_change(strategy):
    """Qwen-Image 2.1 prefills a text KV cache at step 0 (kv_cache_mode "extract": text + image tokens)
    and runs the image tokens only from step 1 ("cached"), with inputs of the same shapes. The mode is
    part of the cache key (decision.call_modes), so step 1 computes in each branch instead of
    broadcasting step 0's 24-token attention output onto 16 tokens (which raised before)."""
    tiny = build_tiny_pipeline("qwenimage21")
    every_timestep = {"options": {"spatial_attention_timestep_skip_range": [-1, 1001]}}
    handle = enable_dit_cache(tiny.pipe, **settings(strategy, "qwenimage21", **every_timestep))
    out = tiny.run(num_inference_steps=6, cfg=True)
    records = handle.last_run.records
    for branch in ("cond", "uncond"):
        step_one = next(r for r in records if r.branch == branch and r.step == 1)
        assert (step_one.decision, step_one.reason) == ("computed", "shape_changed")
    assert handle.last_run.steps_cached > 0  # later steps of the same mode reuse attention
    fresh = build_tiny_pipeline("qwenimage21")
    enable_dit_cache(fresh.pipe, **settings(strategy, "qwenimage21", **every_timestep))
    assert torch.equal(out, fresh.run(num_inference_steps=6, cfg=True))


def test_block_caches_skip_blocks_and_attention_caches_skip_attention(flux):
    handle = enable_dit_cache(flux.pipe, **settings("fbcache"))
    flux.run(num_inference_steps=6)
    for record in handle.last_run.records:
        assert record.blocks_computed == (1 if record.decision == "cached" else 4)
    disable_dit_cache(flux.pipe)
    handle = enable_dit_cache(flux.pipe, **settings("pab"))
    flux.run(num_inference_steps=6)
    cached = [r for r in handle.last_run.records if r.decision == "cached"]
    assert cached and all(r.blocks_computed == 4 and r.reason.startswith("attention_reused:") for r in cached)


# -- one run never sees another ---------------------------------------------------------------

RUNS = [  # batch size, resolution, steps, prompt, cfg
    dict(batch_size=1, resolution=64, num_inference_steps=6, prompt_seed=0),
    dict(batch_size=2, resolution=64, num_inference_steps=6, prompt_seed=0),
    dict(batch_size=1, resolution=96, num_inference_steps=8, prompt_seed=1),
    dict(batch_size=1, resolution=64, num_inference_steps=4, prompt_seed=2, cfg=True),
    dict(batch_size=2, resolution=80, num_inference_steps=6, prompt_seed=3, cfg=True),
]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_run_after_run_equals_fresh_run(strategy):
    reused = build_tiny_pipeline("flux")
    handle = enable_dit_cache(reused.pipe, **settings(strategy))
    for kwargs in RUNS:
        out = reused.run(**kwargs)
        stats = handle.last_run
        fresh = build_tiny_pipeline("flux")
        fresh_handle = enable_dit_cache(fresh.pipe, **settings(strategy))
        assert torch.equal(out, fresh.run(**kwargs)), kwargs
        assert [(r.step, r.branch, r.decision) for r in stats.records] == \
               [(r.step, r.branch, r.decision) for r in fresh_handle.last_run.records]
        assert stats.steps_total == kwargs["num_inference_steps"] * (2 if kwargs.get("cfg") else 1)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_run_that_raises_leaves_no_state(flux, strategy):
    """diffusers resets only at the end of a pipeline call that did not raise; ours resets at both ends."""
    handle = enable_dit_cache(flux.pipe, **settings(strategy))

    def explode(pipe, step, timestep, callback_kwargs):
        if step == 3:
            raise RuntimeError("cancelled by the caller")
        return callback_kwargs

    with pytest.raises(RuntimeError, match="cancelled"):
        flux.pipe(**flux.call_kwargs(num_inference_steps=8, cfg=True), callback_on_step_end=explode)
    assert handle.last_run.completed is False and handle.last_run.steps_total == 8
    assert leftover_diffusers_state(flux.transformer) == []
    after = flux.run(num_inference_steps=8, cfg=True)
    fresh = build_tiny_pipeline("flux")
    enable_dit_cache(fresh.pipe, **settings(strategy))
    assert torch.equal(after, fresh.run(num_inference_steps=8, cfg=True))


@pytest.mark.parametrize("strategy", ["fbcache", "taylorseer", "magcache"])
def test_state_found_at_the_start_of_a_run_is_discarded(flux, strategy):
    """Whatever diffusers state exists when a run starts (left by anything) is reset first."""
    handle = enable_dit_cache(flux.pipe, **settings(strategy, warmup_steps=0))  # stale state could be used at once
    expected = flux.run(num_inference_steps=6)
    plant_stale_state(flux.transformer)
    assert leftover_diffusers_state(flux.transformer)
    assert torch.equal(flux.run(num_inference_steps=6), expected)
    assert handle.last_run.records[0].decision == "computed"


def plant_stale_state(transformer) -> None:
    """Fill every per-context hook state for 'cond' with tensors of a previous generation."""
    stale = torch.full((1, 16, 16), 3.0)
    for module in transformer.modules():
        registry = module.__dict__.get("_diffusers_hook")
        for hook in (registry.hooks.values() if registry else ()):
            manager = getattr(hook, "state_manager", None)
            if manager is None:
                continue
            with transformer.cache_context("cond"):
                state = manager.get_state()
            for name in ("head_block_residual", "previous_residual"):
                if hasattr(state, name):
                    setattr(state, name, stale)
            if hasattr(state, "tail_block_residuals"):
                state.tail_block_residuals = (stale, torch.zeros(1, 8, 32))
            if hasattr(state, "last_update_step"):
                state.current_step, state.last_update_step = 5, 5
                state.taylor_factors = {0: {0: stale}}
                state.module_dtypes = (torch.float32,)


def test_magcache_is_reconfigured_for_each_runs_step_count(flux):
    handle = enable_dit_cache(flux.pipe, **settings("magcache", warmup_steps=2, active_steps=[0, 7]))
    for steps in (6, 10):
        flux.run(num_inference_steps=steps)
        assert flux.transformer._cache_config.num_inference_steps == steps
        records = handle.last_run.records
        assert [r.reason for r in records[:2]] == ["warmup", "warmup"]
        assert all(r.decision == "computed" for r in records[7:])
        streak = longest = 0
        for record in records:
            streak = streak + 1 if record.decision == "cached" else 0
            longest = max(longest, streak)
        assert 0 < longest <= 3  # max_consecutive_cached (magcache default 3) -> max_skip_steps


# -- branches never share state -----------------------------------------------------------------


def _flux_call_inputs(branch: str, step: int, steps: int, batch: int = 1) -> dict:
    generator = torch.Generator().manual_seed(0 if branch == "cond" else 1)
    x0, noise = torch.randn(batch, 16, 16, generator=generator), torch.randn(batch, 16, 16, generator=generator)
    sigma = 1.0 - step / steps
    return dict(hidden_states=(1 - sigma) * x0 + sigma * noise,
                encoder_hidden_states=torch.randn(batch, 8, 32, generator=generator),
                pooled_projections=torch.randn(batch, 32, generator=generator), timestep=torch.tensor([sigma]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]))


def _loop(transformer, handle, branches, steps=8) -> dict[str, list[torch.Tensor]]:
    """A custom CFG loop whose inputs do not depend on the outputs (so branches can be compared).

    ``handle=None``: the same loop for a transformer with a diffusers cache enabled directly, each branch
    in its own diffusers ``cache_context``."""
    outputs = {branch: [] for branch in branches}
    run = handle.run(num_inference_steps=steps) if handle else contextlib.nullcontext()
    with run:
        for step in range(steps):
            for branch in branches:
                scope = handle.branch(branch) if handle else transformer.cache_context(branch)
                with scope:
                    outputs[branch].append(transformer(**_flux_call_inputs(branch, step, steps)).sample)
    return outputs


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cond_and_uncond_never_mix(flux, strategy):
    """Each branch's outputs are exactly those of a run with that branch alone."""
    every_timestep = {"options": {"spatial_attention_timestep_skip_range": [-1, 1001]}}
    extra = every_timestep if strategy in ("pab", "fastercache") else {}
    handle = enable_dit_cache(flux.transformer, **settings(strategy, **extra))
    together = _loop(flux.transformer, handle, ["cond", "uncond"])
    assert handle.last_run.steps_cached > 0
    for branch in ("cond", "uncond"):
        alone = _loop(flux.transformer, handle, [branch])
        assert all(torch.equal(a, b) for a, b in zip(together[branch], alone[branch])), branch


def test_upstream_pab_mixes_branches_which_the_test_above_detects(flux):
    """Calling diffusers directly: the uncond call reads the cond call's attention."""
    transformer = flux.transformer
    transformer.enable_cache(PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: 500))

    def loop(branches):
        outputs = _loop(transformer, None, branches)
        transformer._reset_stateful_cache()
        return outputs

    together, alone = loop(["cond", "uncond"]), loop(["uncond"])
    transformer.disable_cache()
    assert not all(torch.equal(a, b) for a, b in zip(together["uncond"], alone["uncond"]))


def test_pipelines_and_loops_without_cache_context(flux):
    """FirstBlockCache/TaylorSeer raise without a cache_context; our layer enters one per branch."""
    transformer = flux.transformer
    transformer.enable_cache(FirstBlockCacheConfig(threshold=10.0))
    with pytest.raises(ValueError, match="context"):
        transformer(**_flux_call_inputs("cond", 0, 4))
    transformer._reset_stateful_cache()
    transformer.disable_cache()
    for strategy in ("fbcache", "taylorseer"):
        handle = enable_dit_cache(transformer, **settings(strategy))
        with handle.run(num_inference_steps=6):
            for step in range(6):
                inputs = _flux_call_inputs("cond", step, 6)  # one timestep tensor for both calls of a step
                transformer(**inputs)
                transformer(**{**inputs, "encoder_hidden_states": inputs["encoder_hidden_states"] + 1})
        stats = handle.last_run
        assert stats.branches == ["call0", "call1"] and stats.steps_cached > 0
        disable_dit_cache(transformer)


def test_transformer_called_outside_a_run_is_uncached(flux):
    inputs = _flux_call_inputs("cond", 2, 8)
    reference = flux.transformer(**inputs).sample
    for strategy in ("fbcache", "pab", "taylorseer"):
        enable_dit_cache(flux.pipe, **settings(strategy))
        flux.run(num_inference_steps=4)
        first = flux.transformer(**inputs).sample
        second = flux.transformer(**inputs).sample
        assert torch.equal(first, reference) and torch.equal(second, reference), strategy
        disable_dit_cache(flux.pipe)


def test_shape_change_inside_a_run_recomputes(flux):
    """diffusers' FirstBlockCache would broadcast batch-1 residuals onto a batch of 2."""
    transformer = flux.transformer
    batch_two = _flux_call_inputs("cond", 3, 6, batch=2)
    expected = transformer(**batch_two).sample
    handle = enable_dit_cache(transformer, **settings("fbcache"))
    with handle.run(num_inference_steps=6):
        for step in range(3):
            transformer(**_flux_call_inputs("cond", step, 6))
        out = transformer(**batch_two).sample
    assert [r.reason for r in handle.last_run.records][-1] == "shape_changed"
    assert torch.equal(out, expected)


# -- install is atomic, remove is exact ------------------------------------------------------


@pytest.fixture
def register_fails_at_third_hook(monkeypatch):
    real = HookRegistry.register_hook
    calls = []

    def failing(self, hook, name):
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("simulated failure while registering hooks")
        return real(self, hook, name)

    monkeypatch.setattr(HookRegistry, "register_hook", failing)
    return calls


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_failed_enable_leaves_the_target_untouched(untouched, register_fails_at_third_hook, strategy):
    with pytest.raises(RuntimeError, match="simulated"):
        enable_dit_cache(untouched, **settings(strategy))
    assert len(register_fails_at_third_hook) == 3


def test_upstream_failed_enable_leaves_orphan_hooks(flux, register_fails_at_third_hook):
    """What the test above guards against: diffusers alone keeps the hooks registered before the failure."""
    before = target_fingerprint(flux.pipe)
    with pytest.raises(RuntimeError, match="simulated"):
        flux.transformer.enable_cache(FirstBlockCacheConfig())
    assert target_fingerprint(flux.pipe) != before and not flux.transformer.is_cache_enabled


def test_failure_after_install_is_rolled_back(untouched, monkeypatch):
    def failing_swap(*args, **kwargs):
        raise RuntimeError("simulated class swap failure")

    monkeypatch.setattr(lifecycle_module, "ClassSwap", failing_swap)
    with pytest.raises(RuntimeError, match="simulated"):
        enable_dit_cache(untouched, **settings("fbcache"))


def test_disable_restores_everything_for_every_strategy(untouched):
    for strategy in STRATEGIES:
        handle = enable_dit_cache(untouched, **settings(strategy))
        untouched(**build_tiny_pipeline("flux").call_kwargs(num_inference_steps=4))
        handle.disable()


# -- mapping of the unified config ---------------------------------------------------------------


@pytest.mark.parametrize("cfg", [False, True])
def test_fbcache_equals_calling_diffusers_directly(cfg):
    direct = build_tiny_pipeline("flux")
    direct.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    expected = direct.run(num_inference_steps=10, cfg=cfg)
    ours = build_tiny_pipeline("flux")
    handle = enable_dit_cache(ours.pipe, **ON, strategy="fbcache", threshold=0.5, warmup_steps=0)
    assert torch.equal(ours.run(num_inference_steps=10, cfg=cfg), expected)
    assert 0 < handle.last_run.steps_cached < handle.last_run.steps_total


def test_fbcache_honours_warmup_active_steps_and_caps(flux):
    handle = enable_dit_cache(flux.pipe, **ON, threshold=10.0, warmup_steps=3, active_steps=[0, 7],
                              max_cached_steps=3, max_consecutive_cached=2)
    flux.run(num_inference_steps=10)
    reasons = [r.reason for r in handle.last_run.records]
    decisions = [r.decision for r in handle.last_run.records]
    assert reasons[:3] == ["warmup"] * 3 and reasons[7:] == ["inactive"] * 3
    assert decisions.count("cached") == 3 and "cached-cached-cached" not in "-".join(decisions)
    assert {"max_consecutive", "max_cached"} & set(reasons)
    disable_dit_cache(flux.pipe)
    handle = enable_dit_cache(flux.pipe, **ON, threshold=10.0, warmup_steps=0, compute_mask="1001")
    flux.run(num_inference_steps=6)
    assert [r.decision[:4] for r in handle.last_run.records] == ["comp", "cach", "cach", "comp", "comp", "comp"]


def test_fbcache_shared_cfg_decision(flux):
    handle = enable_dit_cache(flux.pipe, **settings("fbcache", separate_cfg=False))
    flux.run(num_inference_steps=6, cfg=True)
    by_step = {}
    for record in handle.last_run.records:
        by_step.setdefault(record.step, []).append(record)
    for cond, uncond in by_step.values():
        assert uncond.diff is None and cond.decision == uncond.decision


@pytest.mark.parametrize("schedule", [dict(cache_interval=3, warmup_steps=2, active_steps=[1, 9]),
                                      dict(compute_mask="1100101", warmup_steps=0, taylorseer_order=2)])
def test_taylorseer_schedule_means_the_same_as_native(flux, schedule):
    decisions = {}
    for backend in ("native", "diffusers"):
        handle = enable_dit_cache(flux.pipe, enabled=True, backend=backend, strategy="taylorseer", **schedule)
        flux.run(num_inference_steps=10, cfg=True)
        decisions[backend] = [(r.step, r.branch, r.decision) for r in handle.last_run.records]
        disable_dit_cache(flux.pipe)
    assert decisions["native"] == decisions["diffusers"]
    assert any(d == "cached" for _, _, d in decisions["diffusers"])


def test_pab_active_steps_and_timestep_ranges(flux):
    handle = enable_dit_cache(flux.pipe, **settings("pab", active_steps=[2, 6],
                                                    options={"spatial_attention_timestep_skip_range": [-1, 1001]}))
    flux.run(num_inference_steps=8)
    records = handle.last_run.records
    assert all(r.decision == "computed" for r in records if not 2 <= r.step < 6)
    assert {r.reason for r in records if r.step >= 6} == {"inactive"}
    assert any(r.decision == "cached" for r in records if 2 <= r.step < 6)


def test_fastercache_first_step_inside_its_timestep_range_works(flux):
    """diffusers' FasterCache crashes (TypeError, cache None) when iteration 0 lies inside its range."""
    handle = enable_dit_cache(flux.pipe, **settings("fastercache", options={
        "spatial_attention_timestep_skip_range": [-1, 1001], "attention_weight_callback": 0.3}))
    flux.run(num_inference_steps=6, cfg=True)
    assert handle.last_run.steps_cached > 0 and handle.last_run.records[0].reason == "no_cache"


def test_pab_reads_cosmos3s_vision_timesteps_in_a_custom_loop():
    """Cosmos 3 takes `vision_timesteps`, no `timestep`; the matrix run checks the first step against
    the uncached model and that disabling is bit-identical."""
    (cell,) = run_family(family("cosmos3"), [("diffusers", "pab")])
    assert cell.status == SERVED and cell.steps_cached > 0, cell.reason


@pytest.mark.parametrize("strategy", ["pab", "fastercache"])
def test_a_loop_without_timesteps_fails_at_its_first_call(flux, strategy):
    """Without a timestep the hooks never enter their timestep ranges and would compute every step."""
    transformer = flux.transformer
    handle = enable_dit_cache(transformer, **settings(strategy))
    with pytest.raises(CacheStateError, match="'timestep'"):
        with handle.run(num_inference_steps=4):
            transformer(**{**_flux_call_inputs("cond", 0, 4), "timestep": None})
    assert leftover_diffusers_state(transformer) == []
    outputs = _loop(transformer, handle, ["cond"], steps=4)  # the handle still serves a proper loop
    assert handle.last_run.steps_cached > 0 and len(outputs["cond"]) == 4


def test_taylorseer_that_hooks_nothing_is_an_error():
    tiny = build_tiny_pipeline("wan")
    before = target_fingerprint(tiny.pipe)
    with pytest.raises(DiTCacheConfigError, match=r"hooked 0 modules.*blocks\.0\.attn1") as info:
        enable_dit_cache(tiny.pipe, **settings("taylorseer"))
    assert info.value.field == "options.cache_identifiers"
    assert target_fingerprint(tiny.pipe) == before
    for options in ({"cache_identifiers": [r"blocks\.\d+\.attn1"]}, {"use_lite_mode": True}):
        handle = enable_dit_cache(tiny.pipe, **settings("taylorseer", options=options))
        tiny.run(num_inference_steps=8)
        assert handle.last_run.steps_cached > 0
        handle.disable()


@pytest.mark.parametrize("strategy, options, field, message", [
    ("taylorseer", {"interval": 3}, "options.interval", "cache_identifiers, skip_predict_identifiers"),
    ("taylorseer", {"max_order": 2}, "options.max_order", "unified field taylorseer_order"),
    ("taylorseer", {"cache_interval": 2}, "options.cache_interval", "unified field cache_interval"),
    ("pab", {"spatial_attention_block_skip_rang": 3}, "options.spatial_attention_block_skip_rang",
     "did you mean 'spatial_attention_block_skip_range'"),
    ("pab", {"spatial_attention_block_skip_range": 0}, "options.spatial_attention_block_skip_range", "integer >= 1"),
    ("pab", {"current_timestep_callback": "pipe"}, "options.current_timestep_callback", "phyai_cache supplies it"),
    ("fastercache", {"is_guidance_distilled": False}, "options.is_guidance_distilled", "CFG cache"),
    ("fastercache", {"spatial_attention_timestep_skip_range": [5, 1]}, "options.spatial_attention_timestep_skip_range",
     "low < high"),
    ("fbcache", {"threshold": 0.2}, "options.threshold", "unified field threshold"),
    ("fbcache", {"foo": 1}, "options.foo", "no options for strategy 'fbcache'"),
    ("magcache", {"max_skip_steps": 2}, "options.max_skip_steps", "max_consecutive_cached"),
    ("magcache", {"num_inference_steps": 28}, "options.num_inference_steps", "each run's real step count"),
    ("magcache", {"mag_ratios": [1.0, -2.0]}, "options.mag_ratios", "positive"),
])
def test_options_are_validated_against_the_diffusers_config(untouched, strategy, options, field, message):
    with pytest.raises(DiTCacheConfigError, match=message) as info:
        enable_dit_cache(untouched, **ON, strategy=strategy, options=options)
    assert info.value.field == field


@pytest.mark.parametrize("overrides, error, message", [
    (dict(strategy="fbcache", taylorseer_order=1), DiTCacheConfigError, "backend 'native' serves fbcache"),
    (dict(strategy="magcache", separate_cfg=False), DiTCacheConfigError, "per CFG branch"),
    (dict(strategy="dbcache"), BackendUnavailableError, "backends that can serve 'dbcache' here: native"),
])
def test_unified_fields_diffusers_cannot_honour(untouched, overrides, error, message):
    with pytest.raises(error, match=message):
        enable_dit_cache(untouched, **ON, **overrides)


def test_magcache_needs_ratios_except_for_flux():
    tiny = build_tiny_pipeline("qwenimage")
    with pytest.raises(DiTCacheConfigError, match="calibrate") as info:
        enable_dit_cache(tiny.pipe, **ON, strategy="magcache")
    assert info.value.field == "options.mag_ratios"
    handle = enable_dit_cache(tiny.transformer, **settings("magcache", "qwenimage"))
    with pytest.raises(CacheStateError, match="num_inference_steps"):
        with handle.run():
            pass


def test_models_diffusers_cannot_cache_are_refused_at_enable_time():
    from diffusers import Flux2Transformer2DModel, SD3Transformer2DModel

    sd3 = SD3Transformer2DModel(sample_size=8, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16,
                                out_channels=4, pos_embed_max_size=8)
    before = target_fingerprint(sd3)
    with pytest.raises(DiTCacheConfigError, match="CacheMixin"):
        enable_dit_cache(sd3, **ON, strategy="pab")
    assert target_fingerprint(sd3) == before
    flux2 = Flux2Transformer2DModel(in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                    num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=16,
                                    axes_dims_rope=(4, 4, 4, 4))
    before = target_fingerprint(flux2)
    with pytest.raises(DiTCacheConfigError, match="#14280"):
        enable_dit_cache(flux2, **ON, strategy="fbcache")
    assert target_fingerprint(flux2) == before
