"""The registry: capability reports, auto resolution and the errors for unavailable backends."""

from __future__ import annotations

import dataclasses

import pytest

import phyai_cache.registry as registry
import phyai_cache.strategies as strategies
from phyai_cache import BackendUnavailableError, DiTCacheConfig, list_backends
from phyai_cache.adapters.base import Backend, StrategySupport, unsupported
from phyai_cache.strategies import get_strategy, strategy_names


def test_every_backend_reports_every_strategy():
    reports = list_backends()
    assert "native" in [r.name for r in reports]
    for report in reports:
        assert set(report.strategies) == set(strategy_names())
        for support in report.strategies.values():
            assert support.available or support.reason, "an unavailable strategy must say why"
        assert report.to_dict()["name"] == report.name


def test_native_serves_fbcache_and_dbcache_without_extra_packages():
    native = next(r for r in list_backends() if r.name == "native")
    assert native.installed and {"fbcache", "dbcache"} <= set(native.available_strategies)


def test_auto_picks_native_for_fbcache(caplog):
    backend = registry.resolve_backend(DiTCacheConfig(enabled=True))
    assert backend.name == "native"
    assert "backend=auto chose 'native'" in caplog.text


class _OldBackend(Backend):
    """Stands in for an upstream backend at an old or missing version (cannot be installed here)."""

    name = "cache_dit"
    installed_version: str | None = None

    def version(self):
        return self.installed_version

    def support(self, spec, version):
        if spec.name == "dbcache" and version is not None and version >= "1.0.4":
            return StrategySupport(spec.name, True, min_version="1.0.4")
        return unsupported(spec.name, "too old" if version else "not installed", "1.0.4")

    def prepare(self, target, config, blocks=None):  # pragma: no cover - never reached
        raise AssertionError


@pytest.fixture
def fake_backend(monkeypatch):
    backend = _OldBackend()
    monkeypatch.setitem(registry._REGISTRY, "cache_dit", backend)
    return backend


def test_missing_backend_error_says_how_to_install_and_what_else_serves(fake_backend):
    with pytest.raises(BackendUnavailableError) as info:
        registry.resolve_backend(DiTCacheConfig(enabled=True, backend="cache_dit", strategy="dbcache"))
    message = str(info.value)
    assert "not installed" in message and "pip install 'phyai-cache[cache-dit]'" in message
    assert "native" in message  # the alternative that can serve dbcache here


def test_old_backend_error_gives_installed_and_minimum_versions(fake_backend):
    fake_backend.installed_version = "0.2.9"
    with pytest.raises(BackendUnavailableError) as info:
        registry.resolve_backend(DiTCacheConfig(enabled=True, backend="cache_dit", strategy="dbcache"))
    assert "0.2.9" in str(info.value) and ">= 1.0.4" in str(info.value)


def test_auto_skips_backends_that_cannot_serve(fake_backend, monkeypatch):
    # cache_dit first in dbcache's declared preference: auto must still skip it when it cannot serve.
    spec = dataclasses.replace(get_strategy("dbcache"), backends=("cache_dit", "native"))
    monkeypatch.setitem(strategies._SPECS, "dbcache", spec)
    assert registry.resolve_backend(DiTCacheConfig(enabled=True, strategy="dbcache")).name == "native"


def test_strategy_nobody_serves():
    with pytest.raises(BackendUnavailableError, match="pab"):
        registry.resolve_backend(DiTCacheConfig(enabled=True, strategy="pab", backend="native"))
