"""The shipped presets: calibrated on the reference model, carrying their figures, tiers in order."""

from __future__ import annotations

import pytest
import torch
import yaml

from phyai_cache import enable_dit_cache, list_presets, load_config
from phyai_cache.config import preset_path
from phyai_cache.tuning import psnr
from phyai_cache_lab.bench import reference_workload

TIER_DB = {"quality": 40.0, "balanced": 33.0, "fast": 28.0}
FIGURES = {"seeds", "psnr_db", "ssim", "agreement", "ideal_speedup"}


def _meta(name: str) -> dict:
    return yaml.safe_load(preset_path(name).read_text())["preset"]


def _tier(name: str) -> str | None:
    return next((tier for tier in TIER_DB if name.endswith(f"-{tier}")), None)


def test_every_preset_loads_enabled_and_names_itself():
    for name in list_presets():
        assert load_config(name).enabled, name
        assert _meta(name)["name"] == name


def test_calibrated_presets_carry_their_figures():
    calibrated = [n for n in list_presets() if _meta(n).get("calibrated")]
    assert {"fbcache-quality", "fbcache-balanced", "fbcache-fast"} <= set(calibrated)
    for name in calibrated:
        meta = _meta(name)
        assert meta["model"] and meta["steps"] and meta["backend"], name
        assert FIGURES <= set(meta["calibration"]) and FIGURES <= set(meta["heldout"]), name
        assert not set(meta["calibration"]["seeds"]) & set(meta["heldout"]["seeds"]), name
        assert all(v and v > 0 for v in meta["heldout"]["speedup"].values()), name


@pytest.mark.parametrize("name", [n for n in list_presets() if _tier(n)])
def test_tiers_meet_their_quality_bar_on_calibration_and_heldout_seeds(name):
    meta = _meta(name)
    bar = TIER_DB[_tier(name)]
    assert meta["target_psnr_db"] == bar
    assert meta["calibration"]["psnr_db"] >= bar and meta["heldout"]["psnr_db"] >= bar


def test_faster_tiers_compute_fewer_blocks():
    families = {n.rsplit("-", 1)[0] for n in list_presets() if _tier(n)}
    for family in families:
        fractions = [_meta(f"{family}-{tier}")["heldout"]["compute_fraction"]
                     for tier in TIER_DB if f"{family}-{tier}" in list_presets()]
        assert fractions == sorted(fractions, reverse=True), family


@pytest.mark.slow
@pytest.mark.parametrize("tier", list(TIER_DB))
def test_fbcache_tiers_reproduce_on_their_heldout_seeds_at_20_steps(tier):
    name = f"fbcache-{tier}"
    seeds = _meta(name)["heldout"]["seeds"]
    workload = reference_workload(steps=20, batch_size=_meta(name).get("batch_size", 10))
    plain, cached = workload.make_pipeline(), workload.make_pipeline()
    enable_dit_cache(cached, name)
    with torch.no_grad():
        reference = torch.cat([workload.extract(plain(**workload.call_kwargs(s))) for s in seeds])
        output = torch.cat([workload.extract(cached(**workload.call_kwargs(s))) for s in seeds])
    assert psnr(output, reference) >= TIER_DB[tier]
