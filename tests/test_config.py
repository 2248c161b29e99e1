"""DiTCacheConfig: defaults, validation, conversion and every way of loading it."""

from __future__ import annotations

import math

import pytest
import yaml

from phyai_cache import DiTCacheConfig, DiTCacheConfigError, list_presets, load_config
from phyai_cache.strategies import get_strategy, strategy_names

STRATEGIES = strategy_names()


def test_default_is_disabled_and_filled():
    config = DiTCacheConfig()
    assert config.enabled is False
    data = config.to_dict()
    assert data["strategy"] == "fbcache"
    assert data["threshold"] == get_strategy("fbcache").defaults["threshold"]
    assert (data["front_blocks"], data["back_blocks"]) == (1, 0)
    assert data["active_steps"] == [0, None]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_defaults_are_visible_and_only_for_used_fields(strategy):
    data = DiTCacheConfig(strategy=strategy).to_dict()
    for name, default in get_strategy(strategy).defaults.items():
        assert data[name] == default
    for name in ("threshold", "front_blocks", "back_blocks", "taylorseer_order"):
        if name not in get_strategy(strategy).fields:
            assert data[name] is None


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_round_trip_dict_and_yaml(strategy):
    config = DiTCacheConfig(enabled=True, strategy=strategy, options={"a": [1, 2.5, {"b": None}]})
    assert DiTCacheConfig.from_dict(config.to_dict()) == config
    assert DiTCacheConfig.from_yaml(config.to_yaml()) == config
    assert hash(DiTCacheConfig.from_yaml(config.to_yaml())) == hash(config)


@pytest.mark.parametrize(
    "changes, field, allowed_part",
    [
        ({"strategy": "fbcach"}, "strategy", "did you mean 'fbcache'"),
        ({"backend": "cuda"}, "backend", "'native'"),
        ({"threshold": -0.1}, "threshold", ">= 0"),
        ({"threshold": math.nan}, "threshold", "finite"),
        ({"threshold": math.inf}, "threshold", "finite"),
        ({"threshold": "0.1"}, "threshold", "number"),
        ({"threshold": True}, "threshold", "number"),
        ({"enabled": "yes"}, "enabled", "true or false"),
        ({"warmup_steps": -1}, "warmup_steps", ">= 0"),
        ({"warmup_steps": 1.5}, "warmup_steps", "integer"),
        ({"strategy": "dbcache", "front_blocks": 0}, "front_blocks", ">= 1"),
        ({"strategy": "dbcache", "back_blocks": -1}, "back_blocks", ">= 0"),
        ({"front_blocks": 2}, "front_blocks", "dbcache"),
        ({"active_steps": [5, 2]}, "active_steps", "end must be"),
        ({"active_steps": [-1, None]}, "active_steps", "start must be"),
        ({"active_steps": 3}, "active_steps", "[start, end]"),
        ({"active_steps": "0-10"}, "active_steps", "[start, end]"),
        ({"max_cached_steps": -1}, "max_cached_steps", "or null"),
        ({"taylorseer_order": -1}, "taylorseer_order", "null to turn"),
        ({"taylorseer_order": 9}, "taylorseer_order", "from 0 to 4"),
        ({"compute_mask": "11a1"}, "compute_mask", "0/1"),
        ({"compute_mask": [1, 2]}, "compute_mask", "0/1"),
        ({"compute_mask": []}, "compute_mask", "non-empty"),
        ({"strategy": "taylorseer", "cache_interval": 0}, "cache_interval", ">= 1"),
        ({"strategy": "taylorseer", "cache_interval": 2, "compute_mask": "101"}, "cache_interval", "null when"),
        ({"cache_interval": 2}, "cache_interval", "null"),
        ({"separate_cfg": "sometimes"}, "separate_cfg", "'auto'"),
        ({"options": [1, 2]}, "options", "mapping"),
        ({"options": {"x": float("nan")}}, "options.x", "finite"),
        ({"options": {"x": object()}}, "options.x", "plain data"),
        ({"strategy": "pab", "threshold": 0.1}, "threshold", "null"),
        ({"thresold": 0.1}, "thresold", "did you mean 'threshold'"),
    ],
)
def test_bad_values_name_field_value_and_allowed(changes, field, allowed_part):
    with pytest.raises(DiTCacheConfigError) as info:
        DiTCacheConfig.from_dict(changes)
    error = info.value
    assert error.field == field
    assert f"dit_cache.{field}" in str(error)
    assert allowed_part in str(error)


def test_compute_mask_accepts_strings_and_lists():
    assert DiTCacheConfig(compute_mask="1101").compute_mask == (1, 1, 0, 1)
    assert DiTCacheConfig(compute_mask=[1, 0]).to_dict()["compute_mask"] == [1, 0]
    taylor = DiTCacheConfig(strategy="taylorseer", compute_mask="110")
    assert taylor.cache_interval is None  # the mask is the schedule: no interval default


def test_backend_aliases_and_case():
    assert DiTCacheConfig(backend="Cache-DiT").backend == "cache_dit"
    assert DiTCacheConfig(strategy="FBCache").strategy == "fbcache"


def test_replace_revalidates_and_rederives_strategy_defaults():
    config = DiTCacheConfig(enabled=True, threshold=0.3)
    assert config.replace(warmup_steps=5).threshold == 0.3
    pab = config.replace(strategy="pab")
    assert pab.threshold is None and pab.enabled
    with pytest.raises(DiTCacheConfigError):
        config.replace(threshold=-1)


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        DiTCacheConfig().threshold = 0.5  # type: ignore[misc]


def test_load_config_sources(tmp_path):
    bare = tmp_path / "bare.yaml"
    bare.write_text("enabled: true\nthreshold: 0.2\n")
    assert load_config(bare).threshold == 0.2
    assert load_config(str(bare), threshold=0.3).threshold == 0.3
    assert load_config({"enabled": True}).enabled
    assert load_config(None) == DiTCacheConfig()
    config = DiTCacheConfig(enabled=True)
    assert load_config(config) is config


def test_dit_cache_section_in_larger_pipeline_config(tmp_path):
    pipeline_yaml = tmp_path / "pipeline.yaml"
    pipeline_yaml.write_text(yaml.safe_dump({
        "model": {"name": "flux-dev", "dtype": "bf16"},
        "scheduler": {"steps": 28},
        "runtime": {"dit_cache": {"enabled": True, "strategy": "dbcache", "front_blocks": 2}},
    }))
    config = load_config(pipeline_yaml)
    assert (config.enabled, config.strategy, config.front_blocks) == (True, "dbcache", 2)


@pytest.mark.parametrize("section, enabled", [(None, False), (False, False), (True, True)])
def test_dit_cache_section_shorthands(section, enabled):
    assert load_config({"model": "x", "dit_cache": section}).enabled is enabled


def test_two_dit_cache_sections_are_an_error():
    with pytest.raises(DiTCacheConfigError, match="exactly one"):
        load_config({"a": {"dit_cache": {}}, "b": {"dit_cache": {}}})


def test_larger_config_without_section_fails_loudly():
    with pytest.raises(DiTCacheConfigError, match="model"):
        load_config({"model": {"name": "flux"}})


def test_bad_section_value_and_bad_yaml(tmp_path):
    with pytest.raises(DiTCacheConfigError, match="dit_cache"):
        load_config({"dit_cache": 3})
    broken = tmp_path / "broken.yaml"
    broken.write_text("enabled: [true\n")
    with pytest.raises(DiTCacheConfigError, match="valid YAML"):
        load_config(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(DiTCacheConfigError, match="mapping"):
        load_config(listy)


def test_unknown_preset_or_path_suggests_presets():
    with pytest.raises(DiTCacheConfigError) as info:
        load_config("fbcache-balancd")
    assert "did you mean 'fbcache-balanced'" in str(info.value)


def test_presets_load_enabled_and_valid():
    names = list_presets()
    assert {"fbcache-quality", "fbcache-balanced", "fbcache-fast"} <= set(names)
    thresholds = [load_config(f"fbcache-{tier}").threshold for tier in ("quality", "balanced", "fast")]
    assert thresholds == sorted(thresholds), "tiers must trade more quality for speed in order"
    for name in names:
        assert load_config(name).enabled
