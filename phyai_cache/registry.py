"""The backend registry: which backends exist, what each can serve here, and how ``auto`` chooses.

The shipped backends (``strategies.BUILTIN_BACKENDS``) are registered at import; :func:`register_backend`
adds another at run time (tests and plug-ins), like ``strategies.register_strategy`` adds a strategy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .adapters.base import Backend, StrategySupport
from .config import DiTCacheConfig
from .errors import BackendUnavailableError
from .strategies import BUILTIN_BACKENDS, add_backend_name, get_strategy, remove_backend_name

logger = logging.getLogger("phyai_cache")

_REGISTRY: dict[str, Backend] = {}

# For backend="auto", the backends are tried in the order a strategy's declaration lists them
# (phyai_cache/strategies/): the native engine first where it implements the strategy, since its
# lifecycle, CFG handling and stats are our own and its overhead is ours to control.


def register_backend(backend: Backend) -> Backend:
    """Make ``backend`` known to the config schema (``backend: <name>``), to strategy declarations
    (``backends=(..., <name>)``), ``list_backends()`` and ``resolve_backend``."""
    if not isinstance(backend, Backend):
        raise TypeError(f"expected a Backend, got {type(backend).__name__}")
    name = getattr(backend, "name", None)
    if not isinstance(name, str) or not name.isidentifier() or name == "auto":
        raise ValueError(f"a backend's name must be an identifier other than 'auto', got {name!r}")
    if name in _REGISTRY and _REGISTRY[name] is not backend and name not in BUILTIN_BACKENDS:
        raise ValueError(f"backend {name!r} is already registered")
    add_backend_name(name)
    _REGISTRY[name] = backend
    return backend


def unregister_backend(name: str) -> None:
    """Forget a backend registered at run time (the built-in ones stay); the strategies declared as
    served by it must be unregistered first."""
    if name in BUILTIN_BACKENDS:
        raise ValueError(f"backend {name!r} is built in and cannot be unregistered")
    remove_backend_name(name)
    _REGISTRY.pop(name, None)


def registered_backends() -> dict[str, Backend]:
    return dict(_REGISTRY)


@dataclass(frozen=True)
class BackendReport:
    """What one backend offers on this machine."""

    name: str
    installed: bool
    version: str | None
    description: str
    strategies: dict[str, StrategySupport]

    @property
    def available_strategies(self) -> list[str]:
        return [s for s, support in self.strategies.items() if support.available]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "installed": self.installed,
            "version": self.version,
            "description": self.description,
            "strategies": {
                s: {"available": v.available, "reason": v.reason, "min_version": v.min_version}
                for s, v in self.strategies.items()
            },
        }


def list_backends() -> list[BackendReport]:
    """Every registered backend: installed or not, its version, and per strategy whether it is
    available at that version and, if not, why."""
    reports = []
    for name, backend in _REGISTRY.items():
        version = backend.version()
        reports.append(BackendReport(name, version is not None, version, backend.description,
                                     backend.strategy_support(version)))
    return reports


def resolve_backend(config: DiTCacheConfig) -> Backend:
    """The backend that will serve ``config``; raises BackendUnavailableError with alternatives."""
    if config.backend == "auto":
        return _resolve_auto(config.strategy)
    backend = _REGISTRY.get(config.backend)
    if backend is None:
        raise BackendUnavailableError(
            f"backend {config.backend!r} has no adapter in this version of phyai_cache; "
            f"{_alternatives(config.strategy)}"
        )
    _require(backend, config.strategy)
    return backend


def _resolve_auto(strategy: str) -> Backend:
    tried = []
    for name in get_strategy(strategy).backends:
        backend = _REGISTRY.get(name)
        if backend is None:
            continue
        support = backend.supports(strategy)
        if support.available:
            logger.info("phyai_cache: backend=auto chose %r for strategy %r (%s)", name, strategy,
                        "first choice" if not tried else "; ".join(tried))
            return backend
        tried.append(f"{name}: {support.reason}")
    raise BackendUnavailableError(
        f"no installed backend can serve strategy {strategy!r}: " + ("; ".join(tried) or "none registered")
    )


def _require(backend: Backend, strategy: str) -> None:
    version = backend.version()
    if version is None:
        raise BackendUnavailableError(
            f"backend {backend.name!r} is not installed (pip install 'phyai-cache[{backend.name.replace('_', '-')}]'); "
            f"{_alternatives(strategy)}"
        )
    support = backend.strategy_support(version)[strategy]
    if not support.available:
        needed = f", needs >= {support.min_version}" if support.min_version else ""
        raise BackendUnavailableError(
            f"strategy {strategy!r} is not available on backend {backend.name!r} {version} "
            f"({support.reason}{needed}); {_alternatives(strategy)}"
        )


def _alternatives(strategy: str) -> str:
    serving = [f"{r.name} {r.version}" for r in list_backends() if strategy in r.available_strategies]
    if serving:
        return f"backends that can serve {strategy!r} here: {', '.join(serving)}"
    return f"no installed backend can serve {strategy!r}"


def _register_builtin_backends() -> None:
    """Register the shipped adapters. Importing an adapter never imports its library: that happens
    only when the backend is used, so phyai deployments without diffusers or cache-dit still work."""
    import importlib

    for backend_class in BUILTIN_BACKENDS.values():
        module_name, class_name = backend_class.split(":")
        try:
            module = importlib.import_module(f".adapters.{module_name}", __package__)
        except ModuleNotFoundError as error:
            if error.name and error.name.startswith(__package__):  # adapter not shipped in this build
                continue
            raise
        register_backend(getattr(module, class_name)())


_register_builtin_backends()

__all__ = ["BackendReport", "list_backends", "register_backend", "resolve_backend", "unregister_backend"]
