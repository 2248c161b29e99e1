"""Native magcache, easycache and teacache: their statistics, decisions, options and errors.

Decisions are checked against the arithmetic each paper describes, recomputed here from the figures
the engine reports per step, on the tiny random-weight pipelines (mechanics) and on the trained
reference model (realistic statistics).
"""

from __future__ import annotations

import pytest
import torch
from counting import count_block_executions

import phyai_cache_lab.testing.families as families
from phyai_cache import CacheStateError, DiTCacheConfigError, enable_dit_cache
from phyai_cache.strategies.magcache import ratios_for_steps
from phyai_cache_lab.reference import call_kwargs, load_pipeline
from phyai_cache_lab.testing.toy import denoise

ON = {"enabled": True, "backend": "native"}
LABELS = [0, 3, 7, 9]


@pytest.fixture(scope="module")
def reference_pipe():
    return load_pipeline()


def _run(pipe, config, steps=20, seed=0, cfg_scale=None):
    handle = enable_dit_cache(pipe, config)
    try:
        with torch.no_grad():
            output = pipe(**call_kwargs(LABELS, num_inference_steps=steps, seed=seed, cfg_scale=cfg_scale)).images
        return output, handle.last_run
    finally:
        handle.disable()


@pytest.fixture(scope="module")
def uncached(reference_pipe):
    with torch.no_grad():
        return reference_pipe(**call_kwargs(LABELS, num_inference_steps=20, seed=0)).images


# -- magcache ------------------------------------------------------------------------------------


def test_magcache_follows_the_accumulated_ratio_error(toy):
    ratios = [1.0, 1.0, 0.9, 0.95, 1.1, 1.0, 0.8, 1.0]
    handle = enable_dit_cache(toy, **ON, strategy="magcache", blocks="layers", threshold=0.2, warmup_steps=2,
                              max_consecutive_cached=None, options={"mag_ratios": ratios})
    denoise(toy, steps=8, handle=handle)
    records = handle.last_run.records
    # MagCache: ratio *= gamma_t, err += |1 - ratio| over the streak; cache while err < threshold;
    # every computed step resets both.
    expected, ratio, error = [], 1.0, 0.0
    for step, gamma in enumerate(ratios):
        if step < 2:
            expected.append(("computed", "warmup"))
            continue
        candidate_ratio = ratio * gamma
        candidate_error = error + abs(1 - candidate_ratio)
        if candidate_error < 0.2:
            ratio, error = candidate_ratio, candidate_error
            expected.append(("cached", "cached"))
        else:
            ratio, error = 1.0, 0.0
            expected.append(("computed", "above_threshold"))
    assert [(r.decision, r.reason) for r in records] == expected
    assert "cached" in [d for d, _ in expected] and "above_threshold" in [r for _, r in expected]
    for record in records[2:]:
        assert record.diff == pytest.approx(record.measures["mag_error"])


def test_magcache_caps_streaks_like_the_papers_k(toy):
    handle = enable_dit_cache(toy, **ON, strategy="magcache", blocks="layers", threshold=10.0, warmup_steps=1,
                              max_consecutive_cached=2, options={"mag_ratios": [1.0]})
    denoise(toy, steps=10, handle=handle)
    decisions = "".join("C" if r.decision == "cached" else "." for r in handle.last_run.records)
    assert decisions == ".CC.CC.CC."


def test_magcache_needs_ratios_except_for_flux(toy, flux):
    with pytest.raises(DiTCacheConfigError, match="calibrate") as info:
        enable_dit_cache(toy, **ON, strategy="magcache", blocks="layers")
    assert info.value.field == "options.mag_ratios"
    handle = enable_dit_cache(flux.pipe, **ON, strategy="magcache", threshold=10.0, warmup_steps=1)
    flux.run(num_inference_steps=6)
    assert handle.last_run.steps_cached > 0  # FluxTransformer2DModel: diffusers' FLUX.1-dev ratios


def test_magcache_needs_the_runs_step_count(toy):
    handle = enable_dit_cache(toy, **ON, strategy="magcache", blocks="layers", options={"mag_ratios": [1.0, 0.9]})
    calls = []
    hook = toy.proj_in.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(CacheStateError, match="num_inference_steps"):
        with handle.run(), torch.no_grad():
            toy(torch.randn(1, 16, 8), torch.ones(1), torch.randn(1, 16))
    hook.remove()
    assert calls == []  # refused when the run starts, before the model runs
    with pytest.raises(CacheStateError, match="open_request"):
        handle.open_request(dict(**ON, strategy="magcache", options={"mag_ratios": [1.0]}))
    assert handle.open_requests == []


def test_magcache_ratios_per_step_count_and_interpolation():
    per_count = {"4": [1.0, 0.9, 0.8, 0.7], "6": [1.0, 1.0, 1.0, 0.9, 0.9, 0.9]}
    assert ratios_for_steps(per_count, 4) == [1.0, 0.9, 0.8, 0.7]
    assert ratios_for_steps(per_count, 3) == ratios_for_steps(per_count["6"], 3)  # the longest, interpolated
    assert ratios_for_steps([1.0, 2.0, 3.0], 5) == [1.0, 1.0, 2.0, 3.0, 3.0]  # torch.round: half to even
    from diffusers.hooks.mag_cache import nearest_interp

    for source, steps in (([1.0, 2.0, 3.0], 5), (per_count["6"], 4), ([0.5 + i / 50 for i in range(50)], 20)):
        assert ratios_for_steps(source, steps) == nearest_interp(torch.tensor(source), steps).tolist()


# -- easycache -----------------------------------------------------------------------------------


def test_easycache_predicts_from_the_transformation_rate(reference_pipe, uncached):
    output, stats = _run(reference_pipe, dict(**ON, strategy="easycache", threshold=0.15))
    records = stats.records
    # the two warmup steps give the first rate, so every later step can be predicted
    assert "no_rate" not in [r.reason for r in records]
    assert stats.steps_cached > 0
    accumulated = 0.0
    for record in records:
        if record.diff is None:
            accumulated = 0.0
            continue
        # the measure is the accumulated prediction: this step's plus the streak's so far
        assert record.diff == pytest.approx(accumulated + record.measures["predicted_change"], rel=1e-6)
        accumulated = record.diff if record.decision == "cached" else 0.0
        assert (record.decision == "cached") == (record.diff < 0.15)  # no caps set
    from phyai_cache.tuning import psnr

    assert psnr(output, uncached) > 30


def test_easycache_without_a_rate_computes(toy):
    handle = enable_dit_cache(toy, **ON, strategy="easycache", blocks="layers", threshold=10.0, warmup_steps=0)
    denoise(toy, steps=4, handle=handle)
    reasons = [r.reason for r in handle.last_run.records]
    assert reasons[:2] == ["no_cache", "no_rate"]  # step 0 has nothing; step 1 has one computed step only
    assert reasons[2] == "cached"


def test_threshold_zero_is_bit_identical_for_every_new_strategy(reference_pipe, uncached):
    for strategy in ("easycache", "teacache", "magcache"):
        output, stats = _run(reference_pipe, dict(**ON, strategy=strategy, threshold=0.0))
        assert stats.steps_cached == 0, strategy
        assert torch.equal(output, uncached), strategy


# -- teacache ------------------------------------------------------------------------------------


def test_teacache_measures_the_modulated_input_and_rescales_it(reference_pipe):
    _, plain = _run(reference_pipe, dict(**ON, strategy="teacache", threshold=0.15))
    _, doubled = _run(reference_pipe, dict(**ON, strategy="teacache", threshold=0.15,
                                           options={"coefficients": [2.0, 0.0]}))
    _, raw = _run(reference_pipe, dict(**ON, strategy="teacache", threshold=0.15, options={"probe": "input"}))
    changes = [r.measures.get("input_change") for r in plain.records]
    assert changes[2] is not None and changes[2] > 0
    # the first block's norm1(x, temb) moves differently from its raw input x
    assert [r.measures.get("input_change") for r in raw.records][2] != pytest.approx(changes[2], rel=1e-3)
    # p(x) = 2x doubles the first judged step's estimate (identity p before it)
    assert doubled.records[2].diff == pytest.approx(2 * plain.records[2].diff, rel=1e-5)
    assert doubled.steps_cached < plain.steps_cached
    accumulated = 0.0
    for record in plain.records[2:]:
        assert record.diff == pytest.approx(accumulated + record.measures["input_change"], rel=1e-5)
        accumulated = record.diff if record.decision == "cached" else 0.0


def test_teacache_probe_modulated_needs_an_adaptive_norm(toy):
    before = [p.clone() for p in toy.parameters()]
    with pytest.raises(DiTCacheConfigError, match="no adaptive norm") as info:
        enable_dit_cache(toy, **ON, strategy="teacache", blocks="layers", options={"probe": "modulated"})
    assert info.value.field == "options.probe" and "magcache" in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(before, toy.parameters()))
    handle = enable_dit_cache(toy, **ON, strategy="teacache", blocks="layers", threshold=10.0, warmup_steps=1)
    denoise(toy, steps=4, handle=handle)  # auto: the toy blocks have no temb, so the chain input is measured
    assert handle.last_run.steps_cached > 0


def test_teacache_on_chroma_measures_the_chain_input():
    """Chroma's double block slices its [B, 12, D] temb before its parameter-free norm1 (temb[:, :6]),
    so norm1(x, temb) is not the block's modulated input: 'modulated' is refused at enable time
    (model untouched) and 'auto' measures the chain input, as 'input' does."""
    fam = families.family("chroma")
    transformer = fam.build()
    reference, before = families.denoise(fam, transformer), families.target_fingerprint(transformer)
    settings = dict(enabled=True, backend="native", strategy="teacache", threshold=10.0,
                    warmup_steps=1)
    with pytest.raises(DiTCacheConfigError, match="ChromaTransformerBlock") as info:
        enable_dit_cache(transformer, **settings, options={"probe": "modulated"})
    assert info.value.field == "options.probe"
    assert families.target_fingerprint(transformer) == before
    assert all(torch.equal(a, b) for a, b in zip(families.denoise(fam, transformer), reference))
    changes = {}
    for probe in ("auto", "input"):
        handle = enable_dit_cache(transformer, **settings, options={"probe": probe})
        families.denoise(fam, transformer, handle)
        assert handle.last_run.steps_cached > 0
        changes[probe] = [r.measures.get("input_change") for r in handle.last_run.records]
        handle.disable()
    assert changes["auto"] == changes["input"] and any(c is not None for c in changes["auto"])


# -- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings, field, message", [
    (dict(strategy="fbcache", options={"foo": 1}), "options.foo", "one of verify"),
    (dict(strategy="fbcache", options={"verifi": 0.1}), "options.verifi", "did you mean 'verify'"),
    (dict(strategy="fbcache", options={"verify": 0}), "options.verify", "> 0"),
    (dict(strategy="fbcache", options={"skip_call": True}), "options.skip_call", "one of verify"),
    (dict(strategy="taylorseer", options={"skip_call": "yes"}), "options.skip_call", "true or false"),
    (dict(strategy="taylorseer", options={"skip_call": True, "verify": 0.1}), "options.skip_call",
     "with options.verify"),
    (dict(strategy="teacache", options={"skip_call": True}), "options.skip_call", "one of coefficients"),
    (dict(strategy="teacache", options={"probe": "temb"}), "options.probe", "'modulated'"),
    (dict(strategy="teacache", options={"coefficients": [1, "x"]}), "options.coefficients", "item 1"),
    (dict(strategy="magcache", options={"mag_ratios": {"twenty": [1.0]}}), "options.mag_ratios", "step counts"),
    (dict(strategy="magcache", options={"mag_ratios": []}), "options.mag_ratios", "non-empty"),
    (dict(strategy="easycache", options={"calibrate": True}), "options.calibrate", "one of skip_call"),
])
def test_native_options_are_validated_per_strategy(flux, settings, field, message):
    with pytest.raises(DiTCacheConfigError, match=message) as info:
        enable_dit_cache(flux.pipe, **ON, **settings)
    assert info.value.field == field
    assert "_phyai_cache_handle" not in vars(flux.pipe)


def test_options_of_another_backend_are_refused_naming_them(flux):
    with pytest.raises(DiTCacheConfigError, match="options.skip_call"):
        enable_dit_cache(flux.pipe, enabled=True, backend="diffusers", strategy="magcache",
                         options={"skip_call": True})
    with pytest.raises(DiTCacheConfigError, match="taylorseer_order"):
        enable_dit_cache(flux.pipe, enabled=True, backend="diffusers", strategy="magcache", taylorseer_order=1)


# -- whole-call skipping ---------------------------------------------------------------------------


@pytest.mark.parametrize("strategy, settings", [
    ("taylorseer", dict(cache_interval=3, warmup_steps=1)),
    ("magcache", dict(threshold=10.0, warmup_steps=1, options={"mag_ratios": [1.0]})),
    ("easycache", dict(threshold=10.0, warmup_steps=1)),
])
def test_skip_call_takes_the_same_decisions_and_runs_nothing_of_the_model(flux, monkeypatch, strategy, settings):
    block_level = enable_dit_cache(flux.pipe, **ON, strategy=strategy, **settings)
    flux.run(num_inference_steps=8, cfg=True)
    expected = [(r.branch, r.step, r.decision, r.reason) for r in block_level.last_run.records]
    block_level.disable()

    executed = count_block_executions(monkeypatch, flux.transformer)
    embedded = []
    hook = flux.transformer.x_embedder.register_forward_pre_hook(lambda module, args: embedded.append(1))
    options = {**settings.get("options", {}), "skip_call": True}
    handle = enable_dit_cache(flux.pipe, **ON, strategy=strategy, **{**settings, "options": options})
    try:
        output = flux.run(num_inference_steps=8, cfg=True)
    finally:
        hook.remove()
    stats = handle.last_run
    assert [(r.branch, r.step, r.decision, r.reason) for r in stats.records] == expected
    assert stats.calls_skipped == stats.steps_cached > 0
    assert all(r.skipped_call == (r.decision == "cached") for r in stats.records)
    assert all(r.blocks_computed == 0 for r in stats.records if r.skipped_call)
    assert len(embedded) == stats.steps_computed  # a skipped call runs no embedding either
    assert len(executed) == stats.blocks_computed == 4 * stats.steps_computed
    assert output.shape == flux.run(num_inference_steps=8, cfg=True).shape and torch.isfinite(output).all()


def test_skip_call_forecasts_each_branch_from_its_own_outputs(toy):
    handle = enable_dit_cache(toy, **ON, strategy="taylorseer", blocks="layers", cache_interval=2,
                              warmup_steps=2, taylorseer_order=0, options={"skip_call": True})
    outputs: dict[str, list[torch.Tensor]] = {"cond": [], "uncond": []}

    def record(module, args, output):  # a forward hook sees what the call returned, skipped or not
        outputs["uncond" if len(outputs["cond"]) > len(outputs["uncond"]) else "cond"].append(output.clone())

    hook = toy.register_forward_hook(record)
    try:
        denoise(toy, steps=6, guidance=3.0, handle=handle)
    finally:
        hook.remove()
    records = handle.last_run.records
    for branch in ("cond", "uncond"):
        decisions = [r.decision for r in records if r.branch == branch]
        assert decisions == ["computed", "computed", "computed", "cached", "computed", "cached"]
        series = outputs[branch]
        # order 0 forecasts the output of the last computed step of the same branch
        assert torch.equal(series[3], series[2]) and torch.equal(series[5], series[4])
    assert not torch.equal(outputs["cond"][3], outputs["uncond"][3])


# -- verified forecaster ---------------------------------------------------------------------------


def test_verified_forecaster_reports_its_error_and_computes_when_it_is_too_high(reference_pipe):
    _, free = _run(reference_pipe, dict(**ON, strategy="fbcache", threshold=0.5, taylorseer_order=1))
    _, loose = _run(reference_pipe, dict(**ON, strategy="fbcache", threshold=0.5, taylorseer_order=1,
                                         options={"verify": 10.0}))
    assert [(r.decision, r.reason) for r in loose.records] == [(r.decision, r.reason) for r in free.records]
    errors = [r.measures["forecast_error"] for r in loose.records if "forecast_error" in r.measures]
    assert len(errors) == loose.steps_cached > 0 and all(e > 0 for e in errors)
    tolerance = sorted(errors)[len(errors) // 2]  # half of the checked steps fail
    _, strict = _run(reference_pipe, dict(**ON, strategy="fbcache", threshold=0.5, taylorseer_order=1,
                                          options={"verify": tolerance}))
    failed = [r for r in strict.records if r.reason == "forecast_error"]
    assert failed and strict.steps_cached < loose.steps_cached
    for record in strict.records:
        if "forecast_error" in record.measures:
            assert (record.reason == "forecast_error") == (record.measures["forecast_error"] >= tolerance)


def test_verified_taylorseer_runs_one_front_block_and_checks_scheduled_steps(reference_pipe):
    _, schedule = _run(reference_pipe, dict(**ON, strategy="taylorseer", cache_interval=4))
    _, verified = _run(reference_pipe, dict(**ON, strategy="taylorseer", cache_interval=4,
                                            options={"verify": 10.0}))
    assert [r.decision for r in verified.records] == [r.decision for r in schedule.records]
    for record in verified.records:
        assert record.blocks_computed == (1 if record.decision == "cached" else 6)
        assert ("forecast_error" in record.measures) == (record.decision == "cached")
    _, strict = _run(reference_pipe, dict(**ON, strategy="taylorseer", cache_interval=4,
                                          options={"verify": 1e-6}))
    assert strict.steps_cached == 0
    assert {r.reason for r in strict.records} >= {"forecast_error"}


def test_disable_restores_the_model_after_every_new_mode(flux):
    flux.run(num_inference_steps=2)  # the pipeline's own cache_context creates diffusers' hook registry
    before = dict(vars(flux.transformer))
    for settings in (dict(strategy="taylorseer", options={"skip_call": True}),
                     dict(strategy="taylorseer", options={"verify": 0.5}),
                     dict(strategy="teacache"), dict(strategy="easycache", options={"skip_call": True})):
        handle = enable_dit_cache(flux.pipe, **ON, **settings)
        flux.run(num_inference_steps=4)
        handle.disable()
        assert dict(vars(flux.transformer)) == before, settings


def test_served_requests_run_the_new_strategies(toy):
    # Whole-call skipping in served requests: tests/serving/test_skip_call_rows.py.
    handle = enable_dit_cache(toy, **ON, strategy="fbcache", blocks="layers")
    request = handle.open_request(dict(**ON, strategy="easycache", threshold=10.0, warmup_steps=1),
                                  num_inference_steps=4)
    x, cond = torch.randn(1, 16, 8), torch.randn(1, 16)
    with torch.no_grad():
        for step in range(4):
            with handle.batch([(request, "cond")]):
                toy(x, torch.full((1,), 1 - step / 4), cond)
    stats = request.stats
    request.close()
    assert [r.reason for r in stats.records] == ["warmup", "no_rate", "cached", "cached"]
