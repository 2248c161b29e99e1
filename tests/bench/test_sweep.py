"""The sweep follows the registry: new backends and strategies are picked up, unavailable ones listed."""

from __future__ import annotations

from phyai_cache.adapters.base import StrategySupport
from phyai_cache.config import list_presets, load_config
from phyai_cache.registry import BackendReport, list_backends
from phyai_cache.strategies import strategy_names
from phyai_cache_lab.bench import sweep
from phyai_cache_lab.bench.sweep import plan_sweep, strategy_variants


def _report(name: str, installed: bool = True, available: tuple[str, ...] = ()) -> BackendReport:
    strategies = {s: StrategySupport(s, s in available, "" if s in available else f"{name} lacks {s}")
                  for s in strategy_names()}
    return BackendReport(name, installed, "9.9" if installed else None, "fake", strategies)


def test_every_available_backend_and_strategy_of_the_registry_is_swept():
    plan = plan_sweep(quick=True)
    swept = {(e.backend, e.strategy) for e in plan.entries}
    skipped = {(s.backend, s.strategy) for s in plan.skipped}
    for report in list_backends():
        for strategy, support in report.strategies.items():
            pair = (report.name, strategy)
            if report.installed and support.available:
                assert pair in swept
            else:
                assert pair in skipped or (report.name, None) in skipped


def test_what_the_registry_offers_decides_the_sweep_without_code_changes(monkeypatch):
    # a registry where the backends offer other strategies than today's adapters do
    monkeypatch.setattr(sweep, "list_backends", lambda: [
        _report("native", available=("fbcache",)),
        _report("cache_dit", available=("magcache", "pab")),
        _report("diffusers", installed=False),
    ])
    plan = plan_sweep(include_presets=False)
    by_backend = {}
    for entry in plan.entries:
        by_backend.setdefault(entry.backend, set()).add(entry.strategy)
        entry.build()  # every planned config is valid
    assert by_backend == {"native": {"fbcache"}, "cache_dit": {"magcache", "pab"}}
    reasons = {(s.backend, s.strategy): s.reason for s in plan.skipped}
    assert reasons[("diffusers", None)] == "not installed"
    assert reasons[("cache_dit", "dbcache")] == "cache_dit lacks dbcache"


def test_variants_follow_the_fields_a_strategy_uses():
    assert all("threshold" in v for v in strategy_variants("fbcache"))
    assert any(v.get("taylorseer_order") for v in strategy_variants("fbcache"))
    assert all("cache_interval" in v for v in strategy_variants("taylorseer"))
    assert strategy_variants("pab") == [{}]
    magcache = strategy_variants("magcache")  # no grid entry: multiples of its own default
    assert len(magcache) > 1 and all(v["threshold"] > 0 for v in magcache)


def test_presets_are_swept_once_on_the_backend_auto_picks():
    plan = plan_sweep(backends=("native",))
    presets = [p for e in plan.entries for p in e.presets]
    native_presets = [n for n in list_presets() if load_config(n).backend in ("auto", "native")]
    assert sorted(presets) == sorted(set(presets))
    for name in native_presets:
        config = load_config(name)
        if config.strategy in ("fbcache", "dbcache", "taylorseer"):
            assert name in presets, name


# The points the bench swept when the grids were tables keyed by strategy name in the bench (sweep.py) and
# tune.py; they moved into the declarations (StrategySpec.sweep) and must sweep the same points, plus
# the two the forecast work added deliberately (issue 21): taylorseer's row forecasting over the
# sampler's time, and tune's search of taylorseer's computed steps (options.schedule).
# strategy -> (full sweep on the native engine, the native-only forms among them, --quick sweep)
SWEPT_BEFORE_THE_GRIDS_MOVED = {
    "dbcache": (["t=0.2", "t=0.4", "t=0.4 o=1", "t=0.5 o=1"], [], ["t=0.4 o=1"]),
    "easycache": (["t=0.1", "t=0.2", "t=0.3", "t=0.2 o=1", "t=0.4 o=1", "t=0.1 o=1 skip-call"],
                  ["t=0.1 o=1 skip-call"], ["t=0.2"]),
    "fbcache": (["t=0.1", "t=0.2", "t=0.3", "t=0.3 o=1", "t=0.4 o=1", "t=0.5 o=1", "t=0.5 o=1 verify=0.12"],
                ["t=0.5 o=1 verify=0.12"], ["t=0.2", "t=0.3 o=1"]),
    "magcache": (["t=0.1", "t=0.2", "t=0.4", "t=0.4 o=1", "t=1.0 o=1", "t=1.0 o=1 K=4 skip-call",
                  "t=3.0 o=2 K=8 skip-call"], ["t=1.0 o=1 K=4 skip-call", "t=3.0 o=2 K=8 skip-call"], ["t=0.2"]),
    "seacache": (["t=0.125", "t=0.25", "t=0.5"], [], ["t=0.25"]),
    "taylorseer": (["n=2", "n=3", "n=4", "n=4 o=2", "n=4 skip-call", "n=6 skip-call", "n=8 skip-call",
                    "n=8 skip-call forecast_axis=time"],
                   ["n=4 skip-call", "n=6 skip-call", "n=8 skip-call", "n=8 skip-call forecast_axis=time"], ["n=3"]),
    "teacache": (["t=0.1", "t=0.2", "t=0.4", "t=0.4 o=1"], [], ["t=0.2"]),
    **{name: ([""], [], [""]) for name in ("fastercache", "pab", "textkv")},
}
TUNE_SEARCHED_BEFORE_THE_GRIDS_MOVED = {
    "dbcache": [{"front_blocks": 1, "back_blocks": 1}, {"front_blocks": 1, "back_blocks": 1, "taylorseer_order": 1},
                {"front_blocks": 2, "back_blocks": 0, "taylorseer_order": 1}],
    "easycache": [{}, {"taylorseer_order": 1}, {"taylorseer_order": 1, "options": {"skip_call": True}}],
    "fbcache": [{}, {"taylorseer_order": 1}],
    "magcache": [{}, {"taylorseer_order": 1},
                 {"taylorseer_order": 1, "max_consecutive_cached": 4, "options": {"skip_call": True}},
                 {"taylorseer_order": 2, "max_consecutive_cached": 8, "options": {"skip_call": True}}],
    "taylorseer": [{"taylorseer_order": 1}, {"taylorseer_order": 2},
                   {"taylorseer_order": 2, "options": {"skip_call": True}, "search_schedule": True}],
    "teacache": [{}, {"taylorseer_order": 1}],
    **{name: [{}] for name in ("fastercache", "pab", "seacache", "textkv")},
}


def _labels(strategy, variants):
    return [sweep._label(strategy, v).removeprefix(strategy).strip() for v in variants]


def test_the_declared_grids_sweep_what_the_bench_swept_before():
    from phyai_cache.tuning.tune import _variants_for

    for strategy, (full, native_only, quick) in SWEPT_BEFORE_THE_GRIDS_MOVED.items():
        assert _labels(strategy, strategy_variants(strategy, backend="native")) == full, strategy
        elsewhere = [label for label in full if label not in native_only]
        assert _labels(strategy, strategy_variants(strategy, backend="diffusers")) == elsewhere, strategy
        assert _labels(strategy, strategy_variants(strategy, quick=True, backend="native")) == quick, strategy
        assert _variants_for(strategy, None) == TUNE_SEARCHED_BEFORE_THE_GRIDS_MOVED[strategy], strategy
