"""The cache_dit backend on real tiny pipelines: the strategy x model matrix, and every Cache-DiT
pitfall our layer must not pass on (each test would fail if the adapter inherited the upstream bug).

Thresholds: the tiny models have random weights, so the front-block residual changes by 5-60 % per
step; 0.6 gives a mix of cached and computed steps. Cache-DiT treats thresholds >= 1 as "always
cache" without measuring, so tests stay below 1 to exercise the real decision.
"""

from __future__ import annotations

import ast
import logging
import os
from pathlib import Path

import diffusers
import pytest
import torch
from counting import count_block_executions

os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")  # read once, when cache_dit is first imported
cache_dit = pytest.importorskip("cache_dit")

from snapshots import target_fingerprint  # noqa: E402

import phyai_cache.adapters.cache_dit as adapter_module  # noqa: E402
import phyai_cache.adapters.cache_dit.model as cache_dit_model  # noqa: E402
import phyai_cache.lifecycle as lifecycle_module  # noqa: E402
import phyai_cache_lab.testing.families as families  # noqa: E402
from phyai_cache import (  # noqa: E402
    BackendUnavailableError,
    DiTCacheConfig,
    DiTCacheConfigError,
    disable_dit_cache,
    enable_dit_cache,
    get_cache_handle,
)
from phyai_cache.registry import resolve_backend  # noqa: E402
from phyai_cache.versions import feature_available  # noqa: E402
from phyai_cache_lab.testing import available_families, build_tiny_pipeline, family_available  # noqa: E402
from phyai_cache_lab.testing.toy import build_toy_dit, denoise  # noqa: E402

ON = {"enabled": True, "backend": "cache_dit", "threshold": 0.6, "warmup_steps": 1}
SERVED = {
    "fbcache": {},
    "dbcache": {"strategy": "dbcache", "front_blocks": 1, "back_blocks": 1},
    "fbcache+taylorseer": {"taylorseer_order": 1},
}
UNSERVED = ("taylorseer", "pab", "fastercache", "magcache")
# Families Cache-DiT cannot serve, refused at enable time: (field, text in the message).
REFUSED_FAMILIES = {
    # its forward reads block.attn.processor of every block, which Cache-DiT's wrapper replaces
    "qwenimage21": ("target", "backend='native', which serves this model"),
    # its blocks take the text stream first (und_seq, gen_seq); Cache-DiT passes hidden states first
    "cosmos3": ("blocks", "blocks whose hidden states are their first argument"),
}
SERVED_FAMILIES = [f for f in available_families() if f not in REFUSED_FAMILIES]
SUPPORTED = adapter_module.CacheDiTBackend().supports("fbcache").available


@pytest.fixture
def tiny():
    """Factory of fresh tiny pipelines; every cache enabled on them is disabled after the test."""
    if not SUPPORTED:
        pytest.skip(f"cache-dit {cache_dit.__version__} is older than the adapter supports (test_version_gating)")
    built = []

    def make(family: str = "flux"):
        built.append(build_tiny_pipeline(family))
        return built[-1]

    yield make
    for pipeline in built:
        if get_cache_handle(pipeline.pipe) is not None:
            disable_dit_cache(pipeline.pipe)


def decisions(stats) -> list[tuple[int, str, str]]:
    return [(r.step, r.branch, r.decision) for r in stats.records]


def class_state(cls: type) -> dict:
    return dict(vars(cls))


# -- the strategy x model matrix -----------------------------------------------------------------


@pytest.mark.parametrize("strategy", list(SERVED))
@pytest.mark.parametrize("family", SERVED_FAMILIES)
def test_served_strategies_cache_and_fill_stats(tiny, family, strategy):
    pipeline = tiny(family)
    settings = SERVED[strategy]
    handle = enable_dit_cache(pipeline.pipe, **{**ON, **settings})
    pipeline.run(num_inference_steps=6, cfg=True)
    stats = handle.last_run
    blocks = handle.describe()["plan"]["blocks"]
    kept = settings.get("front_blocks", 1) + settings.get("back_blocks", 0)
    assert stats.backend == "cache_dit" and stats.steps_total == 12 and stats.branches == ["cond", "uncond"]
    assert stats.steps_cached > 0 and stats.steps_computed > 0
    assert stats.blocks_total == 12 * blocks
    assert stats.blocks_computed == sum(r.blocks_computed for r in stats.records) < stats.blocks_total
    for record in stats.records:
        assert record.blocks_computed == (kept if record.decision == "cached" else blocks)
        assert record.reason
        if record.reason in ("cached", "above_threshold"):
            assert record.diff is not None and record.diff >= 0
    assert stats.cache_bytes > 0 and stats.latency_s > 0


@pytest.mark.parametrize("strategy", UNSERVED)
@pytest.mark.parametrize("family", SERVED_FAMILIES)
def test_unserved_strategies_fail_at_enable_and_touch_nothing(tiny, family, strategy):
    pipeline = tiny(family)
    reference = pipeline.run(num_inference_steps=3)
    before = target_fingerprint(pipeline.pipe)
    with pytest.raises(BackendUnavailableError, match=f"'{strategy}' is not available on backend 'cache_dit'"):
        enable_dit_cache(pipeline.pipe, enabled=True, backend="cache_dit", strategy=strategy)
    assert target_fingerprint(pipeline.pipe) == before
    assert torch.equal(pipeline.run(num_inference_steps=3), reference)


# -- pitfall: transformer-only state resets one call late / never --------------------------------

RUNS = [  # batch size, resolution, step count and CFG change from run to run
    dict(batch_size=1, resolution=64, num_inference_steps=6, prompt_seed=0),
    dict(batch_size=2, resolution=64, num_inference_steps=6, prompt_seed=0, cfg=True),
    dict(batch_size=1, resolution=96, num_inference_steps=8, prompt_seed=1),
    dict(batch_size=1, resolution=64, num_inference_steps=4, prompt_seed=2, cfg=True),
    dict(batch_size=2, resolution=80, num_inference_steps=5, prompt_seed=3),
    dict(batch_size=1, resolution=64, num_inference_steps=6, prompt_seed=0),
]


@pytest.mark.parametrize("strategy", list(SERVED))
@pytest.mark.parametrize("family", sorted(set(REFUSED_FAMILIES) & set(available_families())))
def test_families_cache_dit_cannot_serve_are_refused_at_enable(tiny, family, strategy):
    pipeline = tiny(family)
    reference = pipeline.run(num_inference_steps=3, cfg=True)
    before = target_fingerprint(pipeline.pipe)
    field, text = REFUSED_FAMILIES[family]
    with pytest.raises(DiTCacheConfigError, match=text) as info:
        enable_dit_cache(pipeline.pipe, **{**ON, **SERVED[strategy]})
    assert info.value.field == field
    assert target_fingerprint(pipeline.pipe) == before
    assert torch.equal(pipeline.run(num_inference_steps=3, cfg=True), reference)


@pytest.mark.skipif(not family_available("qwenimage21"), reason="this diffusers has no Qwen-Image 2.1")
@pytest.mark.parametrize("strategy", list(SERVED))
def test_qwenimage21_is_refused_at_enable_and_auto_serves_it(tiny, strategy):
    """Cache-DiT puts one CachedBlocks module in place of transformer_blocks for the whole call and the
    model's forward reads block.attn.processor of every block: the first call raised AttributeError."""
    pipeline = tiny("qwenimage21")
    reference = pipeline.run(num_inference_steps=3, cfg=True)
    before = target_fingerprint(pipeline.pipe)
    with pytest.raises(DiTCacheConfigError, match="backend='native', which serves this model") as info:
        enable_dit_cache(pipeline.pipe, **{**ON, **SERVED[strategy]})
    assert (info.value.field, info.value.value) == ("target", "QwenImage21Transformer2DModel")
    assert target_fingerprint(pipeline.pipe) == before
    assert torch.equal(pipeline.run(num_inference_steps=3, cfg=True), reference)
    # The tiny random model's residual changes by more than 100 % per step: a threshold the native
    # engine (diff < threshold) can meet.
    auto = {**ON, **SERVED[strategy], "backend": "auto", "threshold": 2.0}
    handle = enable_dit_cache(pipeline.pipe, **auto)
    pipeline.run(num_inference_steps=6, cfg=True)
    assert handle.last_run.backend == "native" and handle.last_run.steps_cached > 0


# Families whose first call under Cache-DiT raised (the support matrix's former findings), refused at
# enable time now: the models in the adapter's table, and LTX-2, whose second stream is not the block's
# encoder_hidden_states parameter. Value: the field the refusal names.
CALL_TIME_FAILURES = {
    **{f.name: "target" for f in families.FAMILIES if f.model_class in cache_dit_model._FORWARD_USES_BLOCKS},
    "ltx2": "blocks",
}


def test_the_table_of_models_cache_dit_cannot_run_names_real_families():
    assert set(cache_dit_model._FORWARD_USES_BLOCKS) <= {f.model_class for f in families.FAMILIES}


@pytest.mark.parametrize("name", sorted(CALL_TIME_FAILURES))
def test_models_cache_dit_would_fail_on_are_refused_untouched_and_auto_serves_them(name):
    if not SUPPORTED:
        pytest.skip(f"cache-dit {cache_dit.__version__} is older than the adapter supports (test_version_gating)")
    fam = families.family(name)
    if not hasattr(diffusers, fam.model_class):  # tests_compat runs this suite on an older diffusers
        pytest.skip(f"diffusers {diffusers.__version__} has no {fam.model_class}")
    transformer = fam.build()
    reference = families.denoise(fam, transformer)
    before = families.target_fingerprint(transformer)
    for strategy in ("fbcache", "dbcache"):
        with pytest.raises(DiTCacheConfigError, match="backend='native', which serves this model") as info:
            enable_dit_cache(transformer, **{**ON, **SERVED[strategy]})
        assert info.value.field == CALL_TIME_FAILURES[name]
    assert families.target_fingerprint(transformer) == before
    assert all(torch.equal(a, b) for a, b in zip(families.denoise(fam, transformer), reference))
    cells = families.run_family(fam, [("auto", "fbcache"), ("auto", "dbcache")])
    assert [cell.status for cell in cells] == [families.SERVED] * 2, cells


@pytest.mark.parametrize("family", SERVED_FAMILIES)
def test_run_after_run_equals_a_fresh_pipeline(tiny, family):
    """Cache-DiT's persistent context would carry run N's residuals and step counter into run N+1."""
    reused = tiny(family)
    handle = enable_dit_cache(reused.pipe, **ON)
    for kwargs in RUNS:
        out = reused.run(**kwargs)
        stats = handle.last_run
        fresh = tiny(family)
        fresh_handle = enable_dit_cache(fresh.pipe, **ON)
        assert torch.equal(out, fresh.run(**kwargs)), kwargs
        assert decisions(stats) == decisions(fresh_handle.last_run)
        assert stats.steps_total == kwargs["num_inference_steps"] * (2 if kwargs.get("cfg") else 1)
        assert stats.records[0].reason == "warmup" and stats.steps_cached > 0
        disable_dit_cache(fresh.pipe)


def test_a_run_that_raises_leaves_nothing_for_the_next(tiny):
    pipeline = tiny("flux")
    handle = enable_dit_cache(pipeline.pipe, **ON)
    manager = pipeline.transformer._context_manager

    def cancel(pipe, step, timestep, callback_kwargs):
        if step == 3:
            raise RuntimeError("cancelled by the caller")
        return callback_kwargs

    with pytest.raises(RuntimeError, match="cancelled"):
        pipeline.pipe(**pipeline.call_kwargs(num_inference_steps=8, cfg=True), callback_on_step_end=cancel)
    assert handle.last_run.completed is False
    assert manager._cached_context_manager == {}, "no cache-dit context survives a run"
    after = pipeline.run(num_inference_steps=8)
    fresh = tiny("flux")
    enable_dit_cache(fresh.pipe, **ON)
    assert torch.equal(after, fresh.run(num_inference_steps=8))


# -- pitfall: pipeline mode patches the pipeline class -------------------------------------------


def test_other_instances_of_the_pipeline_class_are_unaffected(tiny):
    """Cache-DiT replaces type(pipe).__call__: an uncached sibling resets the cached one's state, and
    disabling one of two cached siblings breaks the other (AttributeError)."""
    a, b = tiny("flux"), tiny("flux")
    pipe_class, transformer_class = type(a.pipe), type(a.transformer)
    pipe_state, transformer_state = class_state(pipe_class), class_state(transformer_class)
    reference_a, reference_b = a.run(num_inference_steps=6), b.run(num_inference_steps=6, prompt_seed=1)

    handle_a = enable_dit_cache(a.pipe, **ON)
    cached_a = a.run(num_inference_steps=6)
    stats_a = handle_a.last_run
    assert torch.equal(b.run(num_inference_steps=6, prompt_seed=1), reference_b), "uncached sibling unchanged"
    assert handle_a.last_run is stats_a, "the sibling's call did not touch a's runs"

    handle_b = enable_dit_cache(b.pipe, **ON)
    cached_b = b.run(num_inference_steps=6, prompt_seed=1)
    disable_dit_cache(a.pipe)
    assert torch.equal(a.run(num_inference_steps=6), reference_a)
    assert torch.equal(b.run(num_inference_steps=6, prompt_seed=1), cached_b), "b behaves as if alone"
    assert handle_b.last_run.steps_cached > 0
    enable_dit_cache(a.pipe, **ON)
    assert torch.equal(a.run(num_inference_steps=6), cached_a)
    disable_dit_cache(a.pipe)
    disable_dit_cache(b.pipe)
    assert type(a.pipe) is pipe_class and type(b.pipe) is pipe_class
    assert class_state(pipe_class) == pipe_state and class_state(transformer_class) == transformer_state


# -- pitfall: enable_cache on a bare transformer returns a list ----------------------------------


def test_bare_transformer_target_keeps_its_identity(tiny):
    pipeline, reference = tiny("wan"), tiny("wan")
    transformer = pipeline.transformer
    handle = enable_dit_cache(transformer, **ON)
    assert pipeline.pipe.transformer is transformer and isinstance(transformer, torch.nn.Module)
    with handle.run(num_inference_steps=6):
        out = pipeline.run(num_inference_steps=6, cfg=True)
    assert handle.last_run.steps_cached > 0 and handle.last_run.branches == ["cond", "uncond"]
    enable_dit_cache(reference.pipe, **ON)
    assert torch.equal(out, reference.run(num_inference_steps=6, cfg=True))


def test_custom_transformer_and_loop(tiny):
    """A non-diffusers model driven by handle.run()/handle.branch() gets the native engine's decisions."""
    toy, toy_native = build_toy_dit(), build_toy_dit()
    handle = enable_dit_cache(toy, blocks="layers", **ON)
    native = enable_dit_cache(toy_native, blocks="layers", **{**ON, "backend": "native"})
    out = denoise(toy, steps=10, guidance=3.0, handle=handle)
    expected = denoise(toy_native, steps=10, guidance=3.0, handle=native)
    assert handle.last_run.steps_cached > 0
    assert decisions(handle.last_run) == decisions(native.last_run)
    assert torch.equal(out, expected)  # one block list: the same residual arithmetic as native


# -- pitfall: CFG branches (Flux true CFG is not detected upstream) ------------------------------


def _diffs(stats) -> dict[tuple[int, str], float | None]:
    return {(r.step, r.branch): r.diff for r in stats.records}


@pytest.mark.parametrize("family", ["flux", "wan", "qwenimage"])
def test_cfg_branches_never_mix(tiny, family):
    """Each branch compares its residual with its own last computed step: decisions and measured diffs
    equal the native engine's, which keeps one state per branch. Cache-DiT's own Flux default compares
    cond with uncond (20 "steps" for 10), and its parity split goes wrong when CFG is off."""
    pipeline, native_pipeline = tiny(family), tiny(family)
    handle = enable_dit_cache(pipeline.pipe, **ON)
    native = enable_dit_cache(native_pipeline.pipe, **{**ON, "backend": "native"})
    for cfg in (True, False, True):
        pipeline.run(num_inference_steps=8, cfg=cfg)
        native_pipeline.run(num_inference_steps=8, cfg=cfg)
        ours, theirs = handle.last_run, native.last_run
        assert decisions(ours) == decisions(theirs)
        for key, diff in _diffs(theirs).items():
            assert (diff is None) == (_diffs(ours)[key] is None), key
            if diff is not None:
                assert _diffs(ours)[key] == pytest.approx(diff, rel=1e-4), key
        for branch in ours.branches:
            assert [r.step for r in ours.records if r.branch == branch] == list(range(8))


def test_shared_cfg_decision_follows_the_first_branch(tiny):
    pipeline, native_pipeline = tiny("flux"), tiny("flux")
    handle = enable_dit_cache(pipeline.pipe, **ON, separate_cfg=False)
    native = enable_dit_cache(native_pipeline.pipe, **{**ON, "backend": "native", "separate_cfg": False})
    pipeline.run(num_inference_steps=8, cfg=True)
    native_pipeline.run(num_inference_steps=8, cfg=True)
    by_step: dict[int, list] = {}
    for record in handle.last_run.records:
        by_step.setdefault(record.step, []).append(record)
    for cond, uncond in by_step.values():
        assert cond.branch == "cond" and uncond.diff is None  # the follower does not measure
        assert cond.decision == uncond.decision
    assert handle.last_run.steps_cached > 0
    assert decisions(handle.last_run) == decisions(native.last_run)


# -- pitfall: Fn larger than a block list fails only at the first forward upstream ---------------


def test_front_blocks_are_checked_at_enable(tiny):
    pipeline = tiny("flux")
    reference = pipeline.run(num_inference_steps=3)
    before = target_fingerprint(pipeline.pipe)
    with pytest.raises(DiTCacheConfigError) as info:
        enable_dit_cache(pipeline.pipe, **ON, strategy="dbcache", front_blocks=4, back_blocks=0)
    assert info.value.field == "front_blocks" and "4 blocks" in str(info.value)
    with pytest.raises(DiTCacheConfigError) as info:
        enable_dit_cache(pipeline.pipe, **ON, strategy="dbcache", front_blocks=2, back_blocks=2)
    assert info.value.field == "back_blocks"
    assert target_fingerprint(pipeline.pipe) == before
    assert torch.equal(pipeline.run(num_inference_steps=3), reference)


@pytest.mark.parametrize("dummy_blocks", [True, False])
def test_flux_blocks_count_as_one_chain_whatever_the_environment(tiny, monkeypatch, dummy_blocks):
    """front_blocks=3 spans both Flux lists. Cache-DiT's layout depends on CACHE_DIT_FLUX_ENABLE_DUMMY_BLOCKS
    (two lists of 2: Fn=3 fails at the first forward); ours never does."""
    from cache_dit.envs import ENV

    monkeypatch.setattr(ENV, "CACHE_DIT_FLUX_ENABLE_DUMMY_BLOCKS", dummy_blocks)
    pipeline, native_pipeline = tiny("flux"), tiny("flux")
    settings = {**ON, "strategy": "dbcache", "front_blocks": 3, "back_blocks": 0}
    handle = enable_dit_cache(pipeline.pipe, **settings)
    native = enable_dit_cache(native_pipeline.pipe, **{**settings, "backend": "native"})
    out = pipeline.run(num_inference_steps=6)
    expected = native_pipeline.run(num_inference_steps=6)
    assert handle.describe()["plan"]["chain"] == ["transformer_blocks", "single_transformer_blocks"]
    cached = [r for r in handle.last_run.records if r.decision == "cached"]
    assert cached and all(r.blocks_computed == 3 for r in cached)
    assert decisions(handle.last_run) == decisions(native.last_run)
    assert torch.equal(out, expected)  # the middle is one segment here: the same arithmetic


# -- pitfall: disable_cache does not revert the Flux PatchFunctor --------------------------------


@pytest.mark.parametrize("family", SERVED_FAMILIES)
def test_disable_restores_the_transformer_exactly(tiny, family):
    pipeline = tiny(family)
    transformer = pipeline.transformer
    reference = pipeline.run(num_inference_steps=6, cfg=True)
    before = target_fingerprint(pipeline.pipe)
    instance_state = dict(transformer.__dict__)
    transformer_class = type(transformer)
    class_forward, class_before = transformer_class.forward, class_state(transformer_class)
    enable_dit_cache(pipeline.pipe, **ON)
    pipeline.run(num_inference_steps=6, cfg=True)
    disable_dit_cache(pipeline.pipe)
    assert target_fingerprint(pipeline.pipe) == before  # instance dicts, forwards, hooks, module order
    assert transformer.__dict__.keys() == instance_state.keys()
    assert all(transformer.__dict__[k] is v for k, v in instance_state.items())
    assert "forward" not in transformer.__dict__ and "_is_patched" not in transformer.__dict__
    assert transformer_class.forward is class_forward and class_state(transformer_class) == class_before
    assert torch.equal(pipeline.run(num_inference_steps=6, cfg=True), reference)


# -- pitfall: a failed enable must leave nothing behind ------------------------------------------


@pytest.fixture
def untouched(tiny):
    pipeline = tiny("flux")
    reference = pipeline.run(num_inference_steps=4)
    before = target_fingerprint(pipeline.pipe)
    yield pipeline.pipe
    assert target_fingerprint(pipeline.pipe) == before
    assert torch.equal(pipeline.run(num_inference_steps=4), reference)


def test_failure_inside_cache_dit_is_rolled_back(untouched, monkeypatch):
    """enable_cache fails after it already set its context manager and params on the transformer."""
    from cache_dit.caching.cache_adapters.cache_adapter import CachedAdapter

    def failing_mock_blocks(*args, **kwargs):
        raise RuntimeError("simulated failure inside cache-dit")

    monkeypatch.setattr(CachedAdapter, "mock_blocks", failing_mock_blocks)
    with pytest.raises(RuntimeError, match="simulated"):
        enable_dit_cache(untouched, **ON)


def test_failure_while_wrapping_the_pipeline_is_rolled_back(untouched, monkeypatch):
    def failing_swap(*args, **kwargs):
        raise RuntimeError("simulated class swap failure")

    monkeypatch.setattr(lifecycle_module, "ClassSwap", failing_swap)
    with pytest.raises(RuntimeError, match="simulated"):
        enable_dit_cache(untouched, **ON)


@pytest.mark.parametrize(
    "settings, field, message",
    [
        (dict(options={"Fn_compute_blocks": 2}), "options.Fn_compute_blocks", "unified field front_blocks"),
        (dict(options={"residual_diff_threshold": 0.2}), "options.residual_diff_threshold", "unified field threshold"),
        (dict(options={"enable_separate_cfg": True}), "options.enable_separate_cfg", "unified field separate_cfg"),
        (dict(options={"num_inference_steps": 8}), "options.num_inference_steps", "one call late"),
        (dict(options={"cache_type": "DBPrune"}), "options.cache_type", "DBPrune"),
        (dict(options={"steps_computation_policy": "static"}), "options.steps_computation_policy", "static"),
        (dict(options={"warmup_intervall": 2}), "options.warmup_intervall", "did you mean 'warmup_interval'"),
        (dict(options={"warmup_interval": 0}), "options.warmup_interval", "integer >= 1"),
        (dict(options={"warmup_interval": 2}, active_steps=[0, 3]), "options.warmup_interval", "active_steps"),
    ],
)
def test_bad_options_fail_before_anything_changes(untouched, settings, field, message):
    with pytest.raises(DiTCacheConfigError) as info:
        enable_dit_cache(untouched, **{**ON, **settings})
    assert info.value.field == field and message in str(info.value)


def test_several_block_lists_of_an_unknown_model_are_refused(untouched):
    """Only models known to run their lists back to back are cached as one chain by cache_dit."""
    with pytest.raises(DiTCacheConfigError, match="backend 'native'") as info:
        enable_dit_cache(untouched.transformer, **ON, blocks=["single_transformer_blocks", "transformer_blocks"])
    assert info.value.field == "blocks"


# -- semantics: same decisions as the native engine ----------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        dict(warmup_steps=3, active_steps=[2, 7]),
        dict(warmup_steps=1, max_cached_steps=2),
        pytest.param(dict(warmup_steps=1, max_consecutive_cached=1, threshold=0.9), marks=pytest.mark.skipif(
            not feature_available("cache_dit", "max_continuous_streak", cache_dit.__version__),
            reason="cache-dit < 1.5.3 counts streaks differently: refused there (test_version_gating)")),
        dict(warmup_steps=0, threshold=0.0),
    ],
    ids=["warmup-active", "max_cached", "max_consecutive", "threshold-0"],
)
def test_step_rules_mean_what_they_mean_on_native(tiny, settings):
    pipeline, native_pipeline = tiny("qwenimage"), tiny("qwenimage")
    handle = enable_dit_cache(pipeline.pipe, **{**ON, **settings})
    native = enable_dit_cache(native_pipeline.pipe, **{**ON, **settings, "backend": "native"})
    pipeline.run(num_inference_steps=10, cfg=True)
    native_pipeline.run(num_inference_steps=10, cfg=True)
    assert decisions(handle.last_run) == decisions(native.last_run)
    reasons = {(r.step, r.branch): r.reason for r in handle.last_run.records}
    for record in native.last_run.records:  # reasons that do not depend on the order of the checks
        if record.reason in ("warmup", "inactive", "cached"):
            assert reasons[(record.step, record.branch)] == record.reason


def test_passthrough_option_budget(tiny):
    pipeline = tiny("flux")
    handle = enable_dit_cache(pipeline.pipe, **{**ON, "threshold": 0.9},
                              options={"max_accumulated_residual_diff_threshold": 0.5})
    pipeline.run(num_inference_steps=8)
    reasons = [r.reason for r in handle.last_run.records]
    assert "max_accumulated_diff" in reasons
    assert handle.describe()["plan"]["dbcache"]["max_accumulated_residual_diff_threshold"] == 0.5


# -- stats ---------------------------------------------------------------------------------------


def test_stats_count_real_block_executions(tiny, monkeypatch):
    pipeline = tiny("flux")
    executed = count_block_executions(monkeypatch, pipeline.transformer)
    handle = enable_dit_cache(pipeline.pipe, **ON, strategy="dbcache", front_blocks=1, back_blocks=1)
    pipeline.run(num_inference_steps=8, cfg=True)
    stats = handle.last_run
    assert stats.blocks_computed == len(executed) and stats.steps_cached > 0
    assert {r.blocks_computed for r in stats.records if r.decision == "cached"} == {2}


def test_calls_outside_a_run_bypass_cache_dit(tiny):
    pipeline = tiny("flux")
    enable_dit_cache(pipeline.pipe, **ON)
    inputs = dict(hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 8, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]))
    first = pipeline.transformer(**inputs).sample
    assert torch.equal(pipeline.transformer(**inputs).sample, first)
    assert pipeline.transformer._context_manager._cached_context_manager == {}


def test_cache_dit_does_not_log_at_info(tiny):
    """cache-dit logs a dozen lines per enable_cache to stdout; only our own lines may appear."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("cache_dit")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO)
        lg.addHandler(handler)
    try:
        pipeline = tiny("flux")
        enable_dit_cache(pipeline.pipe, **ON)
        pipeline.run(num_inference_steps=4, cfg=True)
        disable_dit_cache(pipeline.pipe)
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
    assert [r.getMessage() for r in records] == []


# -- our layer vs Cache-DiT called directly ------------------------------------------------------


def _direct_cache_dit(pipeline, family: str, fields: dict) -> None:
    """Cache-DiT's own pipeline mode: per-call reset, explicit separate CFG (Flux/HunyuanVideo need it)."""
    config = cache_dit.DBCacheConfig(**fields, enable_separate_cfg=True)
    if family != "hunyuanvideo":
        cache_dit.enable_cache(pipeline.pipe, cache_config=config)
        return
    # HunyuanVideo's registered adapter caches its two lists separately (a decision per list); the
    # documented BlockAdapter with both lists as one chain is the layout our layer uses.
    transformer = pipeline.transformer
    adapter = cache_dit.BlockAdapter(
        pipe=pipeline.pipe, transformer=transformer,
        blocks=transformer.transformer_blocks + transformer.single_transformer_blocks,
        blocks_name="transformer_blocks", dummy_blocks_names=["single_transformer_blocks"],
        forward_pattern=cache_dit.ForwardPattern.Pattern_0, check_num_outputs=False)
    cache_dit.enable_cache(adapter, cache_config=config)


@pytest.mark.parametrize("family", SERVED_FAMILIES)
def test_same_output_as_cache_dit_called_directly(tiny, family):
    ours, direct = tiny(family), tiny(family)
    pipe_class, pipe_state = type(direct.pipe), class_state(type(direct.pipe))
    enable_dit_cache(ours.pipe, **ON, strategy="dbcache", front_blocks=1, back_blocks=1)
    expected = ours.run(num_inference_steps=6, cfg=True)
    disable_dit_cache(ours.pipe)  # cache-dit patches the class shared with `ours`
    fields = dict(Fn_compute_blocks=1, Bn_compute_blocks=1, residual_diff_threshold=0.6, max_warmup_steps=1)
    _direct_cache_dit(direct, family, fields)
    try:
        out = direct.run(num_inference_steps=6, cfg=True)
    finally:
        cache_dit.disable_cache(direct.pipe)
    assert class_state(pipe_class) == pipe_state
    assert torch.equal(out, expected)


# -- versions and imports ------------------------------------------------------------------------


def test_version_gating(monkeypatch):
    backend = adapter_module.CacheDiTBackend()
    minimum = adapter_module.MIN_VERSIONS["cache_dit"]["dbcache"]
    old = backend.strategy_support("1.0.10")["dbcache"]
    assert not old.available and old.min_version == minimum and "predates" in old.reason
    assert backend.strategy_support(None)["fbcache"].reason == "cache-dit is not installed"
    assert backend.strategy_support("1.5.3")["fbcache"].available
    assert "calibrator" in backend.strategy_support(cache_dit.__version__)["taylorseer"].reason

    settings = dict(ON, strategy="dbcache")
    monkeypatch.setattr(adapter_module.CacheDiTBackend, "version", lambda self: "1.0.10")
    with pytest.raises(BackendUnavailableError, match=f"1.0.10.*>= {minimum}"):
        resolve_backend(DiTCacheConfig(**settings))
    monkeypatch.setattr(adapter_module.CacheDiTBackend, "version", lambda self: "1.5.2")
    pipeline = build_tiny_pipeline("wan")
    with pytest.raises(DiTCacheConfigError, match="1.5.3") as info:
        enable_dit_cache(pipeline.pipe, **settings, max_consecutive_cached=2)
    assert info.value.field == "max_consecutive_cached"


def test_importing_the_adapter_does_not_import_cache_dit():
    """cache_dit is slow to import: only the adapter's methods import it."""
    for module in sorted(Path(adapter_module.__file__).parent.glob("*.py")):
        tree = ast.parse(module.read_text())
        top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        names = [alias.name for node in top_level for alias in node.names]
        modules = [node.module or "" for node in top_level if isinstance(node, ast.ImportFrom)]
        assert not any(name.startswith("cache_dit") for name in names + modules), module.name
