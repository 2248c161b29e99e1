"""Config fuzzing: any mapping or YAML document gives a valid config or a DiTCacheConfigError naming
the field — never another exception type — and every valid config round-trips losslessly.

The CI-sized default runs a few hundred examples per property; set PHYAI_CACHE_FUZZ_EXAMPLES for a
longer run (docs/reliability.md).
"""

from __future__ import annotations

import math
import os

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phyai_cache import DiTCacheConfig, DiTCacheConfigError, load_config
from phyai_cache.config import BACKENDS, field_names
from phyai_cache.strategies import strategy_names

STRATEGIES = strategy_names()

EXAMPLES = int(os.environ.get("PHYAI_CACHE_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FIELDS = field_names()
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**9, 10**9), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from([*STRATEGIES, *BACKENDS, "auto", "1101", "", "FBCache"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=8)
# Mostly real field names (so validation, not just the unknown-key check, is exercised), some junk.
keys = st.one_of(st.sampled_from(FIELDS), st.sampled_from(FIELDS).map(lambda k: k[:-1]), st.text(max_size=10))
mappings = st.dictionaries(keys, values, max_size=6)
plausible = st.fixed_dictionaries({}, optional={
    "enabled": st.booleans(),
    "backend": st.sampled_from(BACKENDS),
    "strategy": st.sampled_from(STRATEGIES),
    "threshold": st.floats(0, 5, allow_nan=False),
    "warmup_steps": st.integers(0, 10),
    "active_steps": st.tuples(st.integers(0, 5), st.one_of(st.none(), st.integers(6, 50))),
    "max_cached_steps": st.one_of(st.none(), st.integers(0, 20)),
    "max_consecutive_cached": st.one_of(st.none(), st.integers(0, 5)),
    "taylorseer_order": st.one_of(st.none(), st.integers(0, 4)),
    "compute_mask": st.one_of(st.none(), st.lists(st.integers(0, 1), min_size=1, max_size=12)),
    "separate_cfg": st.sampled_from([True, False, "auto"]),
    "options": st.dictionaries(st.text(min_size=1, max_size=6), st.integers(), max_size=2),
})


def _load(mapping):
    try:
        return load_config(mapping)
    except DiTCacheConfigError as error:
        assert error.field and isinstance(error.field, str)
        assert f"dit_cache.{error.field}" in str(error)
        return None


@FUZZ
@given(mappings)
def test_random_mappings_give_config_or_field_error(mapping):
    config = _load(mapping)
    if config is not None:
        assert DiTCacheConfig.from_dict(config.to_dict()) == config


@FUZZ
@given(st.one_of(mappings, st.dictionaries(st.text(max_size=8), mappings, max_size=3)))
def test_random_yaml_documents(document):
    text = yaml.safe_dump(document)
    try:
        config = DiTCacheConfig.from_yaml(text)
    except DiTCacheConfigError as error:
        assert f"dit_cache.{error.field}" in str(error)
        return
    assert DiTCacheConfig.from_yaml(config.to_yaml()) == config


@FUZZ
@given(st.text(max_size=200))
def test_arbitrary_text_as_yaml(text):
    try:
        DiTCacheConfig.from_yaml(text)
    except DiTCacheConfigError:
        pass


@FUZZ
@given(plausible)
def test_valid_configs_round_trip_losslessly(mapping):
    config = _load(mapping)
    if config is None:
        return
    assert DiTCacheConfig.from_dict(config.to_dict()) == config
    assert DiTCacheConfig.from_yaml(config.to_yaml()) == config
    assert hash(DiTCacheConfig.from_yaml(config.to_yaml())) == hash(config)
    data = config.to_dict()
    for value in (data["threshold"],):
        assert value is None or math.isfinite(value)


@FUZZ
@given(plausible, st.dictionaries(st.sampled_from(FIELDS), values, max_size=2))
def test_overrides_either_apply_or_name_the_field(mapping, overrides):
    base = _load(mapping)
    if base is None:
        return
    try:
        config = load_config(base, **overrides)
    except DiTCacheConfigError as error:
        assert error.field
        return
    assert DiTCacheConfig.from_dict(config.to_dict()) == config
