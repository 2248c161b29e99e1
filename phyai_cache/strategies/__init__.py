"""Strategies, declared once each: the one mapping from a strategy name to everything about it.

Each module in this package declares one :class:`StrategySpec` as ``SPEC`` (peft's ``tuners/<method>``
is the model): the unified config fields the strategy uses and their defaults, the values that define
it, which backends serve it (best first: ``backend="auto"`` tries them in this order) and why the
others do not, and, when the native engine serves it, how (:class:`NativeSpec`). The config
schema, the registry, ``list_backends()``, the CLI, the bench sweep (a strategy's grid is its
:class:`Sweep`), ``tune`` and the reliability matrix all read these declarations; nothing else
lists strategy names. The backend names a declaration may list are the built-in ones
(:data:`BUILTIN_BACKENDS`) and those registered with ``phyai_cache.registry.register_backend``.

Adding a strategy the native engine can run is one new module here (docs/extending.md).
:func:`register_strategy` adds one at run time (tests and plug-ins).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# The backends phyai_cache ships, in the order ``list_backends()`` reports them: name -> the
# ``module:Class`` of its Backend in ``phyai_cache.adapters`` (the registry imports them at start-up).
BUILTIN_BACKENDS: dict[str, str] = {
    "native": "native:NativeBackend",
    "diffusers": "diffusers:DiffusersBackend",
    "cache_dit": "cache_dit:CacheDiTBackend",
}
# The built-in backend names, "auto" first; backend_names() adds those registered at run time.
BACKENDS: tuple[str, ...] = ("auto", *BUILTIN_BACKENDS)
_REGISTERED_BACKENDS: list[str] = []  # by phyai_cache.registry.register_backend


def backend_names() -> tuple[str, ...]:
    """Every backend a config may name and a declaration may list, "auto" first."""
    return (*BACKENDS, *_REGISTERED_BACKENDS)


def add_backend_name(name: str) -> None:
    """Accept ``name`` as a backend (called by ``registry.register_backend``)."""
    if name not in backend_names():
        _REGISTERED_BACKENDS.append(name)


def remove_backend_name(name: str) -> None:
    """Forget a backend name added at run time (called by ``registry.unregister_backend``)."""
    users = [spec.name for spec in _SPECS.values() if name in spec.backends]
    if users:
        raise ValueError(f"backend {name!r} still serves strategies {users}: unregister them first")
    if name in _REGISTERED_BACKENDS:
        _REGISTERED_BACKENDS.remove(name)


# The step-schedule fields (docs/config-reference.md, "Step rules").
STEP_SCHEDULE = ("warmup_steps", "active_steps", "max_cached_steps", "max_consecutive_cached", "compute_mask")

# The unified fields whose meaning depends on the strategy: a spec lists the ones it uses, and
# setting any other is an error. enabled, backend, strategy, separate_cfg and options apply to all.
STRATEGY_SPECIFIC_FIELDS = (
    "threshold", "front_blocks", "back_blocks", *STEP_SCHEDULE, "taylorseer_order", "cache_interval",
)


@dataclass(frozen=True)
class NativeSpec:
    """How the native engine runs a strategy.

    measured:
        ``True``: the step is decided after the ``front_blocks`` on the relative L1 change of their
        residual (fbcache/dbcache). ``False``: decided when the block chain starts (no front block),
        and the whole chain is approximated on cached steps: from the step rules alone (taylorseer),
        or from the strategy's own statistic (``statistic``: magcache, easycache, teacache).
    statistic:
        ``"module:Class"`` of a :class:`phyai_cache.adapters.native.method.Method` in
        ``phyai_cache.adapters.native``: the strategy's own statistic and per-branch state. Its
        ``measure`` is what the one decision sequence (:func:`phyai_cache.decision.decide`) compares
        with ``threshold``; its hooks see each decision and each computed step. None: the front
        residual's relative L1 (measured) or no statistic at all (scheduled).
    options:
        The ``options`` the native engine accepts for this strategy, name -> check
        (``phyai_cache.strategies._options``); any other name is refused with this list.
    """

    measured: bool
    statistic: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Calibration:
    """What ``phyai_cache.calibrate`` measures for a strategy on the user's own pipeline.

    options:
        The ``options`` it fills in (e.g. ``("mag_ratios",)``); ``tune`` and the bench calibrate first
        when a config has none of them.
    fit:
        ``fit(records_by_run) -> options``: the calibrated options from the ``RunStats.records`` of
        uncached runs made with ``options.calibrate: true`` on the native engine (each record's
        ``measures`` hold what the strategy's statistic observed).
    """

    options: tuple[str, ...]
    fit: Any


SEARCH_SCHEDULE = "search_schedule"  # a Sweep.search key (not a config field): tune searches options.schedule


@dataclass(frozen=True)
class Sweep:
    """What the bench sweeps and ``tune`` searches for a strategy.

    knob:
        ``"threshold"`` or ``"interval"`` (``cache_interval``): the value the bench sweeps and ``tune``
        bisects.
    grid, quick:
        The values the bench sweeps (``quick``: with ``--quick``, enough to exercise every backend in
        CI). None: the bench's default grid for the knob (multiples of the strategy's default
        threshold; a few intervals).
    forecast, quick_forecast:
        Values swept again with the TaylorSeer forecaster (``taylorseer_order=forecast_order``): it
        lets a higher threshold keep its quality, and a higher order pays off over a longer interval.
    native:
        Settings swept on the native engine only, beside the grid (whole-call skipping, the verified
        forecaster), so its forms are compared in the same table.
    search:
        The structural variants ``tune`` searches, each with its own knob search (fields the strategy
        does not use are dropped). A variant with ``SEARCH_SCHEDULE: True`` searches which steps
        compute (``options.schedule``, per step count) instead of the knob.
    """

    knob: str
    grid: tuple[float, ...] | None = None
    quick: tuple[float, ...] | None = None
    forecast: tuple[float, ...] = ()
    quick_forecast: tuple[float, ...] = ()
    forecast_order: int = 1
    native: tuple[Mapping[str, Any], ...] = ()
    search: tuple[Mapping[str, Any], ...] = ({},)

    def __post_init__(self) -> None:
        if self.knob not in ("threshold", "interval"):
            raise ValueError(f"Sweep.knob must be 'threshold' or 'interval', got {self.knob!r}")


@dataclass(frozen=True)
class StrategySpec:
    """Everything phyai_cache knows about one strategy, in one place.

    name:
        The ``strategy`` value in configs.
    summary:
        One line for ``phyai-cache backends`` and the docs.
    fields:
        The strategy-specific unified fields it uses (subset of ``STRATEGY_SPECIFIC_FIELDS``).
    defaults:
        Values filled in for unset fields (conservative; the presets are the calibrated tiers).
    fixed, fixed_hint:
        Values that define the strategy (fbcache is front_blocks=1, back_blocks=0) and the hint
        shown when a config sets another value.
    backends:
        The backends that serve it, best first (the order ``backend="auto"`` tries).
    not_served:
        For backends that do not serve it: why (shown by ``phyai-cache backends``).
    native:
        How the native engine runs it; required when ``"native"`` is in ``backends``.
    hit_settings:
        Settings under which a tiny random-weight model really hits the cache (random weights show
        little redundancy): the reliability matrix and backend tests run every strategy with them.
    sweep:
        What the bench sweeps and ``tune`` searches for it (:class:`Sweep`; a knob name alone,
        ``"threshold"`` or ``"interval"``, sweeps the default grid), or None.
    calibration:
        What ``phyai_cache.calibrate`` measures for it (:class:`Calibration`), if anything.
    """

    name: str
    summary: str
    fields: tuple[str, ...]
    backends: tuple[str, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    fixed: Mapping[str, Any] = field(default_factory=dict)
    fixed_hint: str = ""
    not_served: Mapping[str, str] = field(default_factory=dict)
    native: NativeSpec | None = None
    hit_settings: Mapping[str, Any] = field(default_factory=dict)
    sweep: Sweep | None = None
    calibration: Calibration | None = None

    def __post_init__(self) -> None:
        unknown = [f for f in (*self.fields, *self.defaults, *self.fixed) if f not in STRATEGY_SPECIFIC_FIELDS]
        if unknown:
            raise ValueError(f"strategy {self.name!r}: {unknown} are not strategy-specific fields "
                             f"({', '.join(STRATEGY_SPECIFIC_FIELDS)})")
        unused = [f for f in (*self.defaults, *self.fixed) if f not in self.fields]
        if unused:
            raise ValueError(f"strategy {self.name!r}: defaults/fixed values for fields it does not use: {unused}")
        known = backend_names()[1:]
        bad = [b for b in (*self.backends, *self.not_served) if b not in known]
        if bad or not self.backends:
            raise ValueError(f"strategy {self.name!r}: backends must be a non-empty subset of {known} "
                             "(registry.register_backend adds one)")
        if ("native" in self.backends) != (self.native is not None):
            raise ValueError(f"strategy {self.name!r}: a NativeSpec is given exactly when 'native' serves it")
        if isinstance(self.sweep, str):
            object.__setattr__(self, "sweep", Sweep(self.sweep))
        sweep = self.sweep
        if sweep is not None and not isinstance(sweep, Sweep):
            raise ValueError(f"strategy {self.name!r}: sweep must be a Sweep, 'threshold', 'interval' or None")
        if sweep is not None and (sweep.forecast or sweep.quick_forecast) and "taylorseer_order" not in self.fields:
            raise ValueError(f"strategy {self.name!r}: a forecast sweep needs the field taylorseer_order")

    def why_not(self, backend: str) -> str:
        """Why ``backend`` does not serve this strategy."""
        return self.not_served.get(backend, f"backend {backend!r} does not implement {self.name!r}")


_SPECS: dict[str, StrategySpec] = {}


def register_strategy(spec: StrategySpec) -> StrategySpec:
    """Make ``spec`` known to the config schema, the registry and every tool that lists strategies."""
    if not isinstance(spec, StrategySpec):
        raise TypeError(f"expected a StrategySpec, got {type(spec).__name__}")
    if spec.name in _SPECS and _SPECS[spec.name] is not spec:
        raise ValueError(f"strategy {spec.name!r} is already registered")
    _SPECS[spec.name] = spec
    return spec


def unregister_strategy(name: str) -> None:
    """Forget a strategy registered at run time (the built-in ones stay)."""
    if name in _BUILTIN:
        raise ValueError(f"strategy {name!r} is built in and cannot be unregistered")
    _SPECS.pop(name, None)


def strategy_names() -> tuple[str, ...]:
    return tuple(_SPECS)


def get_strategy(name: str) -> StrategySpec:
    return _SPECS[name]


def all_strategies() -> tuple[StrategySpec, ...]:
    return tuple(_SPECS.values())


def _load_builtin() -> tuple[str, ...]:
    """Import every module of this package and register its ``SPEC``, in alphabetical order of
    modules (``phyai-cache backends`` lists them in registration order)."""
    names = []
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
        spec = importlib.import_module(f"{__name__}.{module}").SPEC
        register_strategy(spec)
        names.append(spec.name)
    return tuple(names)


_BUILTIN = _load_builtin()

__all__ = ["BACKENDS", "BUILTIN_BACKENDS", "Calibration", "NativeSpec", "StrategySpec", "Sweep", "add_backend_name",
           "all_strategies", "backend_names", "get_strategy", "register_strategy", "remove_backend_name",
           "strategy_names", "unregister_strategy"]
