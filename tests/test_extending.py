"""What adding a strategy or a backend costs, as docs/extending.md counts it, proven from this module alone.

Each fixture registers one thing per place the docs name, without editing phyai_cache: a strategy
served by diffusers (its declaration, its driver, its row in the adapter's table, its minimum
version) and a backend (its classes, registered, and the declaration of the strategy it serves).
Then the schema, the registry, ``backend="auto"``, the bench sweep and the reliability matrix pick
them up and they run on a real tiny Flux pipeline. The native strategy's count is proven the same
way by tests/test_strategy_declaration.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from combos import served_combinations

import phyai_cache.registry as registry
from phyai_cache import DiTCacheConfig, DiTCacheConfigError, enable_dit_cache, list_backends
from phyai_cache.adapters.base import Backend, Installation, Plan, StrategySupport
from phyai_cache.adapters.diffusers import DIFFUSERS_CACHES, DiffusersCache
from phyai_cache.adapters.diffusers.driver import Driver
from phyai_cache.adapters.diffusers.model import BlockHooks
from phyai_cache.decision import StepRules
from phyai_cache.runtime import RunStates
from phyai_cache.strategies import StrategySpec, backend_names, register_strategy, unregister_strategy
from phyai_cache.strategies._options import OptionRules
from phyai_cache.versions import MIN_VERSIONS
from phyai_cache_lab.bench.sweep import plan_sweep

EXTENDING = Path(__file__).resolve().parents[1] / "docs" / "extending.md"

# docs/extending.md section -> the places it says to touch (each named in the section, counted in bold).
PLACES = {
    "A strategy the native engine runs": ("phyai_cache/strategies/<name>.py",),
    "A strategy served by an upstream backend": (
        "phyai_cache/strategies/<name>.py",
        "phyai_cache/adapters/diffusers/<name>.py",
        "DIFFUSERS_CACHES",
        "MIN_VERSIONS",
    ),
    "A backend": ("register_backend", "backends"),
}


def _section(title: str) -> str:
    text = EXTENDING.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


@pytest.mark.parametrize("title", PLACES)
def test_the_docs_state_the_count_the_fixtures_below_need(title):
    section = _section(title)
    count = re.search(r"\*\*(\d+) (?:files?|places?)\b", section)
    assert count is not None, f"'{title}' states no count"
    assert int(count.group(1)) == len(PLACES[title]), title
    for place in PLACES[title]:
        assert place in section, (title, place)


# -- a strategy served by diffusers: declaration, driver, table row, minimum version -----------------

class PlainFirstBlockDriver(Driver):
    """diffusers' FirstBlockCache as it is (its own decision), reporting what it decided."""

    strategy = "throwaway_fbc"
    uses_context = True
    option_rules = OptionRules(unified={"threshold": "threshold"})
    block_hooks = BlockHooks(min_blocks=2, head_tail_failure="diffusers' FirstBlockCache fails on it",
                             literal_arguments=("hidden_states", "encoder_hidden_states"))

    def build_config(self) -> Any:
        from diffusers.hooks.first_block_cache import FirstBlockCacheConfig

        return FirstBlockCacheConfig(threshold=self.config.threshold)

    def attach(self, installation: Any) -> None:
        (self.head,) = self.find_hooks("_should_compute_remaining_blocks")

    def after_call(self, call: Any, state: Any) -> None:
        cached = not self.head.state_manager.get_state().should_compute
        call.decision, call.reason = ("cached", "cached") if cached else ("computed", "diffusers")
        state.counters(call.branch).record(cached, call.scratch.key)


DIFFUSERS_SPEC = StrategySpec(
    name="throwaway_fbc",
    summary="diffusers' FirstBlockCache with its own decision, declared by a test",
    fields=("threshold",),
    defaults={"threshold": 0.1},
    backends=("diffusers",),
    not_served={backend: "declared by a test for diffusers only" for backend in ("native", "cache_dit")},
    hit_settings={"threshold": 10.0},
    sweep="threshold",
)


@pytest.fixture
def diffusers_strategy(monkeypatch):
    register_strategy(DIFFUSERS_SPEC)
    monkeypatch.setitem(DIFFUSERS_CACHES, DIFFUSERS_SPEC.name, DiffusersCache(
        "FirstBlockCache", "first_block_cache:FirstBlockCacheConfig", PlainFirstBlockDriver))
    monkeypatch.setitem(MIN_VERSIONS["diffusers"], DIFFUSERS_SPEC.name, MIN_VERSIONS["diffusers"]["fbcache"])
    yield DIFFUSERS_SPEC
    unregister_strategy(DIFFUSERS_SPEC.name)


def test_a_diffusers_strategy_is_reported_resolved_swept_and_in_the_matrix(diffusers_strategy):
    reports = {r.name: r for r in list_backends()}
    if not reports["diffusers"].installed:
        pytest.skip("diffusers is not installed")
    assert "throwaway_fbc" in reports["diffusers"].available_strategies
    assert reports["native"].strategies["throwaway_fbc"].reason == "declared by a test for diffusers only"
    assert registry.resolve_backend(DiTCacheConfig(enabled=True, strategy="throwaway_fbc")).name == "diffusers"
    assert ("diffusers", "throwaway_fbc") in {(e.backend, e.strategy) for e in plan_sweep(quick=True).entries}
    assert ("diffusers", "throwaway_fbc") in served_combinations()


def test_its_driver_s_option_rules_are_the_ones_enforced(diffusers_strategy, flux):
    with pytest.raises(DiTCacheConfigError, match="the unified field threshold") as info:
        enable_dit_cache(flux.pipe, enabled=True, strategy="throwaway_fbc", options={"threshold": 0.2})
    assert info.value.field == "options.threshold"
    with pytest.raises(DiTCacheConfigError, match="no options for strategy 'throwaway_fbc'"):
        enable_dit_cache(flux.pipe, enabled=True, strategy="throwaway_fbc", options={"foo": 1})


def test_it_runs_and_decides_like_diffusers_fbcache(diffusers_strategy, flux):
    handle = enable_dit_cache(flux.pipe, enabled=True, strategy="throwaway_fbc", threshold=10.0)
    flux.run(num_inference_steps=5)
    mine = [r.decision for r in handle.last_run.records]
    handle.disable()
    handle = enable_dit_cache(flux.pipe, enabled=True, backend="diffusers", strategy="fbcache", threshold=10.0,
                              warmup_steps=0)
    flux.run(num_inference_steps=5)
    assert mine == [r.decision for r in handle.last_run.records]
    assert "cached" in mine


# -- a backend: its classes, registered, and the strategy it serves ------------------------------------

class ReuseInstallation(Installation):
    """Returns the branch's last computed transformer output on the steps the step rules do not force."""

    def __init__(self, config: DiTCacheConfig) -> None:
        self.rules = StepRules(config)
        self.runs: RunStates[dict[str, Any]] = RunStates()

    def begin_run(self, run: Any) -> None:
        self.runs.open(run, {})

    def end_run(self, run: Any) -> None:
        self.runs.close(run)

    def run_call(self, call: Any, original: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        outputs = self.runs[call.run]
        reason = self.rules.must_compute(call.step)
        if reason is None and call.branch in outputs:
            call.decision, call.reason = "cached", "reused"
            return outputs[call.branch]
        outputs[call.branch] = original(*args, **kwargs)
        call.decision, call.reason = "computed", reason or "no_cache"
        return outputs[call.branch]

    def remove(self) -> None:
        pass


class ReusePlan(Plan):
    def __init__(self, config: DiTCacheConfig) -> None:
        self.config = config

    def install(self, lifecycle: Any) -> Installation:
        return ReuseInstallation(self.config)


class ReuseBackend(Backend):
    name = "throwaway"
    description = "reuses whole transformer outputs, declared by a test"

    def version(self) -> str | None:
        return "1.0"

    def support(self, spec: StrategySpec, version: str | None) -> StrategySupport:
        return StrategySupport(spec.name, True)

    def prepare(self, target: Any, config: DiTCacheConfig, blocks: Any = None) -> Plan:
        return ReusePlan(config)


def reuse_spec() -> StrategySpec:
    """The strategy the backend serves (declarable once the backend is registered)."""
    return StrategySpec(
        name="throwaway_reuse",
        summary="reuse the whole transformer output between scheduled steps, declared by a test",
        fields=("warmup_steps", "cache_interval"),
        defaults={"warmup_steps": 1, "cache_interval": 2},
        backends=("throwaway",),
        sweep="interval",
    )


@pytest.fixture
def backend():
    registered = registry.register_backend(ReuseBackend())
    register_strategy(reuse_spec())
    yield registered
    unregister_strategy("throwaway_reuse")
    registry.unregister_backend(registered.name)
    assert "throwaway" not in backend_names() and "throwaway" not in registry.registered_backends()
    with pytest.raises(DiTCacheConfigError, match="backend"):
        DiTCacheConfig(enabled=True, backend="throwaway")


def test_a_backend_is_accepted_reported_resolved_and_swept(backend):
    assert DiTCacheConfig(enabled=True, backend="throwaway", strategy="throwaway_reuse").backend == "throwaway"
    reports = {r.name: r for r in list_backends()}
    assert reports["throwaway"].available_strategies == ["throwaway_reuse"]
    assert "does not implement 'fbcache'" in reports["throwaway"].strategies["fbcache"].reason
    assert not reports["native"].strategies["throwaway_reuse"].available
    assert registry.resolve_backend(DiTCacheConfig(enabled=True, strategy="throwaway_reuse")) is backend
    swept = {(e.backend, e.name) for e in plan_sweep(quick=True).entries}
    assert ("throwaway", "throwaway_reuse n=3") in swept
    assert ("throwaway", "throwaway_reuse") in served_combinations()


def test_a_backend_runs_through_the_lifecycle_and_leaves_the_model_as_it_was(backend, flux):
    untouched = flux.run(num_inference_steps=6)
    handle = enable_dit_cache(flux.pipe, enabled=True, strategy="throwaway_reuse")
    cached = flux.run(num_inference_steps=6)
    assert [(r.step, r.decision) for r in handle.last_run.records] == [
        (0, "computed"), (1, "computed"), (2, "cached"), (3, "computed"), (4, "cached"), (5, "computed")]
    assert not torch.equal(cached, untouched)
    handle.disable()
    assert torch.equal(flux.run(num_inference_steps=6), untouched)


def test_backend_registration_is_checked():
    with pytest.raises(ValueError, match="built in"):
        registry.unregister_backend("native")
    with pytest.raises(ValueError, match="identifier other than 'auto'"):
        registry.register_backend(type("Auto", (ReuseBackend,), {"name": "auto"})())
    with pytest.raises(TypeError, match="Backend"):
        registry.register_backend(object())
    registered = registry.register_backend(ReuseBackend())
    try:
        with pytest.raises(ValueError, match="already registered"):
            registry.register_backend(ReuseBackend())
        register_strategy(reuse_spec())
        with pytest.raises(ValueError, match="still serves"):
            registry.unregister_backend("throwaway")
        unregister_strategy("throwaway_reuse")
    finally:
        registry.unregister_backend(registered.name)
    with pytest.raises(ValueError, match="register_backend adds one"):
        StrategySpec(name="x", summary="", fields=(), backends=("throwaway",))


def test_every_package_of_the_library_is_shipped():
    """A backend shipped as a package (adapters/<backend>/) must be in pyproject's package list, or a
    wheel would leave it out and the registry would skip it as 'not shipped in this build'."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    library = root / "phyai_cache"
    found = {".".join(init.parent.relative_to(root).parts) for init in library.rglob("__init__.py")
             if "__pycache__" not in init.parts}
    assert found - listed == set()
