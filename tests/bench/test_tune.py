"""tune() meets its target on held-out seeds, writes a loadable preset, and works on any pipeline."""

from __future__ import annotations

import pytest
import yaml

from phyai_cache import get_cache_handle, load_config
from phyai_cache.tuning import TuneError, tune
from phyai_cache_lab.bench import reference_workload
from phyai_cache_lab.reference import load_pipeline

TARGET = 30.0


@pytest.fixture(scope="module")
def tuned():
    workload = reference_workload(steps=10, batch_size=4)
    pipe = load_pipeline()
    result = tune(pipe, workload.call_kwargs, target_psnr=TARGET, strategy="fbcache", extract=workload.extract,
                  calibration_seeds=(0,), heldout_seeds=(1, 2), iterations=4, timing_pairs=1,
                  agreement=workload.agreement)
    return pipe, result


@pytest.mark.slow
def test_tune_meets_its_target_on_heldout_seeds(tuned):
    pipe, result = tuned
    assert result.met and result.heldout.psnr_db >= TARGET
    assert result.calibration.psnr_db >= TARGET
    assert result.heldout.seeds == [1, 2] and result.calibration.seeds == [0]
    assert result.config.strategy == "fbcache" and result.config.threshold > 0
    assert result.heldout.caches and result.heldout.compute_fraction < 1.0
    assert result.speedup["default"] > 0
    assert get_cache_handle(pipe) is None  # the pipeline is left uncached


@pytest.mark.slow
def test_tune_picks_the_fewest_blocks_among_configs_that_meet_the_target(tuned):
    _, result = tuned
    meeting = [s for s in result.searched if s.get("meets") and s["compute_fraction"] < 1.0]
    assert meeting
    assert result.calibration.compute_fraction <= min(s["compute_fraction"] for s in meeting) + 0.005
    # bisection, not a grid: a handful of evaluations per variant
    assert len(result.searched) <= 2 * (4 + 5)


@pytest.mark.slow
def test_tuned_preset_loads_and_carries_its_figures(tuned, tmp_path):
    _, result = tuned
    path = result.write_preset(tmp_path / "my-preset.yaml", details={"model": "reference", "steps": [10]})
    assert load_config(path) == result.config.replace(enabled=True)
    meta = yaml.safe_load(path.read_text())["preset"]
    assert meta["name"] == "my-preset" and meta["calibrated"] is True and meta["target_psnr_db"] == TARGET
    assert meta["calibration"]["psnr_db"] >= TARGET and meta["heldout"]["psnr_db"] >= TARGET
    assert {"seeds", "psnr_db", "ssim", "agreement", "ideal_speedup"} <= set(meta["heldout"])
    assert "speedup" in meta["heldout"]


@pytest.mark.slow
def test_tune_searches_intervals_for_scheduled_strategies():
    workload = reference_workload(steps=8, batch_size=2)
    result = tune(load_pipeline(), {"8 steps": workload.call_kwargs}, target_psnr=25.0, strategy="taylorseer",
                  extract=workload.extract, calibration_seeds=(0,), heldout_seeds=(1,), max_interval=4,
                  timing_pairs=0, variants=[{"taylorseer_order": 1}])
    assert result.met and result.config.cache_interval >= 2
    assert all("n=" in s["config"] for s in result.searched)


def test_tune_works_on_any_diffusers_pipeline_with_the_default_extractor(flux):
    # a random-weight pipeline: large residual changes, so only high thresholds cache anything
    result = tune(flux.pipe, lambda seed: flux.call_kwargs(num_inference_steps=6, seed=seed), target_psnr=10.0,
                  strategy="fbcache", data_range=None, calibration_seeds=(0,), heldout_seeds=(1,), iterations=2,
                  timing_pairs=0, variants=[{}])
    assert result.heldout.psnr_db >= 10.0 and result.config.threshold > 0


def test_tune_refuses_a_pipeline_that_already_has_a_cache(flux):
    from phyai_cache import enable_dit_cache

    enable_dit_cache(flux.pipe, enabled=True)
    with pytest.raises(TuneError, match="without a cache"):
        tune(flux.pipe, lambda seed: flux.call_kwargs(seed=seed), target_psnr=30.0, strategy="fbcache")


def test_tune_reports_when_nothing_that_caches_meets_the_target(flux):
    with pytest.raises(TuneError, match="no config"):
        tune(flux.pipe, lambda seed: flux.call_kwargs(num_inference_steps=4, seed=seed), target_psnr=300.0,
             strategy="fbcache", data_range=None, calibration_seeds=(0,), iterations=1, max_threshold=0.5,
             timing_pairs=0, variants=[{}])


@pytest.mark.slow
def test_cli_tune_writes_a_preset(tmp_path, capsys):
    from phyai_cache.cli import main

    out = tmp_path / "digits-fast.yaml"
    code = main(["tune", "--target-psnr", "28", "--strategy", "fbcache", "--steps", "8", "--batch-size", "2",
                 "--calibration-seeds", "0", "--heldout-seeds", "1", "--iterations", "2", "--timing-pairs", "1",
                 "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr()
    assert "target met on held-out seeds: yes" in printed.out and "meets" in printed.err
    meta = yaml.safe_load(out.read_text())["preset"]
    assert meta["name"] == "digits-fast" and meta["steps"] == [8] and meta["heldout"]["psnr_db"] >= 28
    assert meta["command"].startswith("phyai-cache tune --target-psnr 28.0")
    assert load_config(out).strategy == "fbcache"


@pytest.mark.slow
def test_tune_searches_a_schedule_with_fewer_computed_steps_than_the_best_interval():
    """The schedule variant places the computed steps (options.schedule) and keeps the target with
    fewer of them than any interval that keeps it (measured on the same calibration seed)."""
    from phyai_cache.strategies import SEARCH_SCHEDULE

    workload = reference_workload(steps=12, batch_size=2)
    kwargs = dict(target_psnr=30.0, strategy="taylorseer", extract=workload.extract, calibration_seeds=(0,),
                  heldout_seeds=(1,), max_interval=6, timing_pairs=0)
    pipe = load_pipeline()
    scheduled = tune(pipe, {"12 steps": workload.call_kwargs}, variants=[
        {"taylorseer_order": 2, "options": {"skip_call": True}, SEARCH_SCHEDULE: True}], **kwargs)
    interval = tune(pipe, {"12 steps": workload.call_kwargs}, variants=[
        {"taylorseer_order": 2, "options": {"skip_call": True}}], **kwargs)
    computed = scheduled.config.options["schedule"]["12"]
    assert scheduled.met and computed[0] == 0 and len(computed) >= 4
    assert load_config(scheduled.config.to_dict()).options["schedule"] == {"12": computed}
    assert scheduled.calibration.compute_fraction <= interval.calibration.compute_fraction
    assert scheduled.config.calibrated_on == "FluxTransformer2DModel"
