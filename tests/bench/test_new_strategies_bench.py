"""The bench and tune pick up magcache/easycache/teacache, calibrate them first, and compare the
native-only forms (whole-call skipping, the verified forecaster) in the same tables."""

from __future__ import annotations

import pytest

from phyai_cache import get_cache_handle, load_config
from phyai_cache.config import DiTCacheConfig
from phyai_cache.tuning import tune
from phyai_cache_lab.bench import reference_workload, runner
from phyai_cache_lab.bench.report import native_versus_anchors
from phyai_cache_lab.bench.runner import BenchRow, calibrated
from phyai_cache_lab.bench.sweep import plan_sweep, strategy_variants
from phyai_cache_lab.reference import load_pipeline


def test_native_forms_are_swept_on_the_native_engine_only():
    native = strategy_variants("taylorseer", backend="native")
    assert {"cache_interval": 6, "options": {"skip_call": True}} in native
    assert all(not v.get("options") for v in strategy_variants("taylorseer", backend="diffusers"))
    assert all(not v.get("options") for v in strategy_variants("taylorseer", quick=True, backend="native"))
    names = {(e.backend, e.name) for e in plan_sweep(include_presets=False).entries}
    assert ("native", "taylorseer n=6 skip-call") in names and ("native", "taylorseer n=4") in names
    assert ("native", "fbcache t=0.5 o=1 verify=0.12") in names
    for strategy in ("magcache", "easycache", "teacache"):
        assert any(s == strategy and b == "native" for b, s in
                   {(e.backend, e.strategy) for e in plan_sweep(quick=True, include_presets=False).entries})


def test_the_bench_calibrates_once_per_strategy_and_only_what_lacks_calibration(monkeypatch):
    workload = reference_workload(steps=6, batch_size=2)
    plain = workload.make_pipeline()
    calls = []
    real = runner.calibrate

    def counting(*args, **kwargs):
        calls.append(kwargs["strategy"])
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "calibrate", counting)
    cache: dict = {}
    first = calibrated(DiTCacheConfig(enabled=True, strategy="magcache", threshold=0.2), workload, plain, cache)
    again = calibrated(DiTCacheConfig(enabled=True, backend="diffusers", strategy="magcache"), workload, plain, cache)
    given = calibrated(DiTCacheConfig(enabled=True, strategy="magcache", options={"mag_ratios": [1.0]}),
                       workload, plain, cache)
    plain_fb = calibrated(DiTCacheConfig(enabled=True, strategy="fbcache"), workload, plain, cache)
    assert calls == ["magcache"]
    assert len(first.options["mag_ratios"]) == 6 and again.options == first.options
    assert given.options == {"mag_ratios": [1.0]} and plain_fb.options == {}
    assert first.threshold == 0.2 and get_cache_handle(plain) is None


def _row(name, backend, speedup, psnr):
    return BenchRow(name, backend, "x", 20, [], {}, measured={"speedup": speedup, "psnr_db": psnr})


def test_native_versus_anchors_compares_the_fastest_of_each_side_per_psnr_level():
    rows = [_row("fast-native", "native", 4.0, 36.0), _row("good-native", "native", 3.0, 41.0),
            _row("anchor-a", "diffusers", 2.0, 42.0), _row("anchor-b", "cache_dit", 2.5, 36.5),
            _row("broken", "native", 9.0, None)]
    lines = native_versus_anchors(rows, levels=(35.0, 40.0, 45.0))
    assert lines[0].startswith(">= 35 dB: native fast-native 4.00x vs anchor cache_dit/anchor-b 2.50x = 1.60x")
    assert lines[1].startswith(">= 40 dB: native good-native 3.00x vs anchor diffusers/anchor-a 2.00x = 1.50x")
    assert lines[2] == ">= 45 dB: no native config keeps it"


@pytest.mark.slow
def test_tune_calibrates_magcache_and_writes_the_ratios_into_the_preset(tmp_path):
    workload = reference_workload(steps=8, batch_size=2)
    pipe = load_pipeline()
    result = tune(pipe, workload.call_kwargs, target_psnr=30.0, strategy="magcache", extract=workload.extract,
                  calibration_seeds=(0,), heldout_seeds=(1,), iterations=2, timing_pairs=0, max_threshold=2.0,
                  variants=[{}, {"taylorseer_order": 1, "options": {"skip_call": True}}])
    assert len(result.config.options["mag_ratios"]) == 8
    assert any("skip-call" in s["config"] for s in result.searched)
    path = result.write_preset(tmp_path / "magcache-test.yaml")
    assert load_config(path).options["mag_ratios"] == result.config.options["mag_ratios"]
    assert get_cache_handle(pipe) is None
