"""A strategy is declared once (phyai_cache/strategies/), and everything that lists strategies reads it.

The throwaway strategy below is declared in this module alone; registering it must make it appear
in the config schema, the registry and ``list_backends()``, ``backend="auto"``, the CLI, the bench
sweep and the reliability matrix, and the native engine must run it, without touching any other
library module. That is what adding a native strategy costs (docs/extending.md).
"""

from __future__ import annotations

import pytest
from combos import served_combinations, settings_for

from phyai_cache import DiTCacheConfig, DiTCacheConfigError, enable_dit_cache, list_backends
from phyai_cache.adapters.cache_dit import SERVED_STRATEGIES as CACHE_DIT_SERVED
from phyai_cache.adapters.diffusers import DIFFUSERS_CACHES
from phyai_cache.cli import main
from phyai_cache.registry import resolve_backend
from phyai_cache.strategies import (
    STEP_SCHEDULE,
    NativeSpec,
    StrategySpec,
    all_strategies,
    register_strategy,
    strategy_names,
    unregister_strategy,
)
from phyai_cache_lab.bench.sweep import plan_sweep

THROWAWAY = StrategySpec(
    name="throwaway_fb",
    summary="a first-block cache declared by a test",
    fields=("threshold", "front_blocks", "back_blocks", *STEP_SCHEDULE),
    defaults={"threshold": 0.2, "front_blocks": 1, "back_blocks": 0, "warmup_steps": 1},
    backends=("native",),
    not_served={"cache_dit": "declared by a test for the native engine only"},
    native=NativeSpec(measured=True),
    hit_settings={"threshold": 10.0, "warmup_steps": 1},
    sweep="threshold",
)


@pytest.fixture
def throwaway():
    register_strategy(THROWAWAY)
    yield THROWAWAY
    unregister_strategy(THROWAWAY.name)
    assert THROWAWAY.name not in strategy_names()


def test_the_schema_accepts_it_with_its_defaults_and_rejects_fields_it_does_not_use(throwaway):
    config = DiTCacheConfig(enabled=True, strategy="throwaway_fb")
    assert (config.threshold, config.warmup_steps, config.front_blocks) == (0.2, 1, 1)
    with pytest.raises(DiTCacheConfigError, match="cache_interval.*throwaway_fb"):
        DiTCacheConfig(enabled=True, strategy="throwaway_fb", cache_interval=2)


def test_the_registry_reports_and_auto_resolves_it(throwaway):
    reports = {r.name: r for r in list_backends()}
    assert "throwaway_fb" in reports["native"].available_strategies
    assert reports["cache_dit"].strategies["throwaway_fb"].reason == "declared by a test for the native engine only"
    assert "does not implement 'throwaway_fb'" in reports["diffusers"].strategies["throwaway_fb"].reason
    assert resolve_backend(DiTCacheConfig(enabled=True, strategy="throwaway_fb")).name == "native"


def test_the_cli_bench_sweep_and_reliability_matrix_list_it(throwaway, capsys):
    assert main(["backends"]) == 0
    assert "yes throwaway_fb" in capsys.readouterr().out
    swept = {(e.backend, e.strategy) for e in plan_sweep(quick=True, include_presets=False).entries}
    assert ("native", "throwaway_fb") in swept
    assert ("native", "throwaway_fb") in served_combinations()


def test_the_native_engine_runs_it_like_the_fbcache_it_copies(throwaway, flux):
    handle = enable_dit_cache(flux.pipe, **settings_for("native", "throwaway_fb"))
    flux.pipe(**flux.call_kwargs(num_inference_steps=5))
    mine = [(r.decision, r.reason) for r in handle.last_run.records]
    handle.disable()
    handle = enable_dit_cache(flux.pipe, **settings_for("native", "fbcache"))
    flux.pipe(**flux.call_kwargs(num_inference_steps=5))
    assert mine == [(r.decision, r.reason) for r in handle.last_run.records]
    assert handle.last_run.steps_cached > 0


def test_a_declaration_must_be_consistent():
    with pytest.raises(ValueError, match="NativeSpec"):
        StrategySpec(name="x", summary="", fields=("threshold",), backends=("native",))
    with pytest.raises(ValueError, match="does not use"):
        StrategySpec(name="x", summary="", fields=("threshold",), backends=("diffusers",),
                     defaults={"warmup_steps": 1})
    with pytest.raises(ValueError, match="already registered"):
        register_strategy(StrategySpec(name="fbcache", summary="", fields=(), backends=("diffusers",)))
    with pytest.raises(ValueError, match="built in"):
        unregister_strategy("fbcache")


def test_upstream_adapters_implement_exactly_the_strategies_declared_for_them():
    for spec in all_strategies():
        assert ("diffusers" in spec.backends) == (spec.name in DIFFUSERS_CACHES), spec.name
        assert ("cache_dit" in spec.backends) == (spec.name in CACHE_DIT_SERVED), spec.name
