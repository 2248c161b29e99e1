"""``phyai_cache.calibrate``: what MagCache and TeaCache need, measured on the user's own pipeline.

The measured values are recomputed here from the model's own activations (forward hooks on the
first and last blocks of an uncached run), so a wrong formula, a wrong step or a wrong branch fails.
"""

from __future__ import annotations

import pytest
import torch
import yaml

import phyai_cache
from phyai_cache import DiTCacheConfigError, enable_dit_cache, load_config
from phyai_cache_lab.reference import call_kwargs, load_pipeline

LABELS = [1, 4, 8]


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline()


def _chain_residual_norms(pipe, kwargs) -> list[torch.Tensor]:
    """Per step: per-token L2 norms of (last block's hidden output - first block's hidden input)."""
    transformer = pipe.transformer
    first, last = transformer.transformer_blocks[0], transformer.single_transformer_blocks[-1]
    inputs, norms = [], []
    h1 = first.register_forward_pre_hook(lambda m, a, k: inputs.append(k["hidden_states"]), with_kwargs=True)
    h2 = last.register_forward_hook(
        lambda m, a, k, out: norms.append(torch.linalg.norm((out[1] - inputs[-1]).float(), dim=-1)), with_kwargs=True)
    try:
        with torch.no_grad():
            output = pipe(**kwargs).images
    finally:
        h1.remove()
        h2.remove()
    return norms, output


def test_magcache_ratios_are_the_models_residual_magnitude_ratios(pipe):
    def kwargs():  # a fresh generator per call: the call consumes it
        return call_kwargs(LABELS, num_inference_steps=8, seed=3)

    norms, uncached = _chain_residual_norms(pipe, kwargs())
    expected = [1.0] + [float((n / (p + 1e-8)).mean()) for p, n in zip(norms, norms[1:])]
    result = phyai_cache.calibrate(pipe, kwargs(), strategy="magcache")
    assert result.options["mag_ratios"] == pytest.approx(expected, abs=1e-5)
    assert result.runs == 1 and result.steps == [8]
    assert all(r.decision == "computed" and r.reason == "calibrate" for r in result.records[0])
    assert phyai_cache.get_cache_handle(pipe) is None  # left as it was
    with torch.no_grad():
        again = pipe(**kwargs()).images
    assert torch.equal(again, uncached)


def test_magcache_calibration_averages_runs_and_keeps_one_list_per_step_count(pipe):
    def make(steps):
        return lambda seed: call_kwargs(LABELS, num_inference_steps=steps, seed=seed)

    result = phyai_cache.calibrate(pipe, [make(6), make(9)], strategy="magcache", seeds=(0, 1))
    ratios = result.options["mag_ratios"]
    assert set(ratios) == {"6", "9"} and len(ratios["6"]) == 6 and len(ratios["9"]) == 9
    single = [phyai_cache.calibrate(pipe, make(6)(seed), strategy="magcache").options["mag_ratios"] for seed in (0, 1)]
    assert ratios["6"] == pytest.approx([(a + b) / 2 for a, b in zip(*single)], abs=2e-5)


def test_cfg_branches_are_calibrated_separately_then_averaged(pipe):
    kwargs = call_kwargs(LABELS, num_inference_steps=6, seed=0, cfg_scale=2.0)
    result = phyai_cache.calibrate(pipe, kwargs, strategy="magcache")
    branches = {r.branch for r in result.records[0]}
    assert branches == {"cond", "uncond"}
    per_branch = {b: [r.measures["mag_ratio"] for r in result.records[0] if r.branch == b] for b in branches}
    assert per_branch["cond"] != per_branch["uncond"]
    assert result.options["mag_ratios"] == pytest.approx(
        [(a + b) / 2 for a, b in zip(per_branch["cond"], per_branch["uncond"])], abs=2e-5)


def test_teacache_coefficients_fit_output_change_against_modulated_input_change(pipe):
    calls = [call_kwargs(LABELS, num_inference_steps=12, seed=s) for s in (0, 1)]
    result = phyai_cache.calibrate(pipe, calls, strategy="teacache")
    pairs = [(r.measures["input_change"], r.measures["output_change"]) for records in result.records
             for r in records if "output_change" in r.measures]
    assert len(pairs) == 2 * 11  # every step but the first of each run
    coefficients = result.options["coefficients"]
    assert len(coefficients) == 5  # degree 4, as TeaCache
    import numpy as np

    fitted = np.polyval(coefficients, [x for x, _ in pairs])
    residual = np.abs(fitted - [y for _, y in pairs]).mean()
    spread = np.abs(np.array([y for _, y in pairs]) - np.mean([y for _, y in pairs])).mean()
    assert residual < 0.5 * spread  # the fit explains most of the output change


def test_calibrated_options_drive_both_magcache_backends_from_one_preset(pipe, tmp_path):
    result = phyai_cache.calibrate(pipe, call_kwargs(LABELS, num_inference_steps=10, seed=5), strategy="magcache")
    path = result.write_preset(tmp_path / "my-magcache.yaml", threshold=0.3, max_consecutive_cached=3)
    data = yaml.safe_load(path.read_text())
    assert data["dit_cache"]["options"] == {"mag_ratios": result.options["mag_ratios"]}
    decisions = {}
    for backend in ("native", "diffusers"):
        handle = enable_dit_cache(pipe, load_config(path, backend=backend))
        try:
            with torch.no_grad():
                pipe(**call_kwargs(LABELS, num_inference_steps=10, seed=6))
            decisions[backend] = [r.decision for r in handle.last_run.records]
        finally:
            handle.disable()
    assert decisions["native"] == decisions["diffusers"] and "cached" in decisions["native"]


def test_calibrate_refuses_what_it_cannot_do(pipe):
    kwargs = call_kwargs(LABELS, num_inference_steps=4, seed=0)  # never called: every case is refused first
    with pytest.raises(DiTCacheConfigError, match="needs no calibration") as info:
        phyai_cache.calibrate(pipe, kwargs, strategy="fbcache")
    assert info.value.field == "strategy"
    with pytest.raises(DiTCacheConfigError, match="'magcache'"):
        phyai_cache.calibrate(pipe, kwargs, strategy="magcach")
    with pytest.raises(DiTCacheConfigError, match="call_kwargs"):
        phyai_cache.calibrate(pipe, [42], strategy="magcache")
    handle = enable_dit_cache(pipe, "fbcache-balanced")
    try:
        with pytest.raises(DiTCacheConfigError, match="disable_dit_cache"):
            phyai_cache.calibrate(pipe, kwargs, strategy="magcache")
    finally:
        handle.disable()


def test_cli_calibrate_writes_a_loadable_preset(tmp_path, capsys):
    from phyai_cache.cli import main

    out = tmp_path / "teacache-calibrated.yaml"
    assert main(["calibrate", "--strategy", "teacache", "--steps", "8", "--seeds", "0", "--batch-size", "2",
                 "--out", str(out)]) == 0
    config = load_config(out)
    assert config.strategy == "teacache" and len(config.options["coefficients"]) == 5
    assert "coefficients" in capsys.readouterr().out


FACTORY = '''
from phyai_cache_lab import reference

_PIPES = []


def make(steps):
    if not _PIPES:
        _PIPES.append(reference.load_pipeline())
    return _PIPES[0], lambda seed: reference.call_kwargs([1, 7], num_inference_steps=steps, seed=seed)
'''


def test_cli_calibrate_on_a_pipeline_of_ones_own_records_its_model_class(tmp_path):
    """`--pipeline FILE.py:FUNCTION` is the one-command path for a user's model: the preset it writes
    records the transformer class, and enabling it on another class warns (tests/adapters/test_native_forecast.py)."""
    from phyai_cache.cli import main

    factory = tmp_path / "my_model.py"
    factory.write_text(FACTORY)
    out = tmp_path / "mine.yaml"
    assert main(["calibrate", "--strategy", "magcache", "--pipeline", f"{factory}:make", "--steps", "8",
                 "--seeds", "0", "--out", str(out)]) == 0
    config = load_config(out)
    assert config.calibrated_on == "FluxTransformer2DModel" and len(config.options["mag_ratios"]) == 8
    with pytest.raises(SystemExit, match="MODULE:FUNCTION"):
        main(["calibrate", "--strategy", "magcache", "--pipeline", str(factory)])
