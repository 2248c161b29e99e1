"""The version table: which backend feature exists from which release.

This is the only place that knows version numbers. Adapters ask :func:`feature_available`;
``list_backends()`` reports the same facts. Versions are read from installed distribution
metadata, so checking never imports the (slow to import) backend packages.
"""

from __future__ import annotations

from importlib import metadata

from packaging.version import InvalidVersion, Version

# Distribution (pip) name of each upstream backend's package.
BACKEND_DISTRIBUTIONS: dict[str, str] = {"diffusers": "diffusers", "cache_dit": "cache-dit"}

# backend -> strategy/feature -> first release that has it (measured from upstream tags and wheels;
# see docs/architecture.md). A feature absent from a backend's table does not exist there.
MIN_VERSIONS: dict[str, dict[str, str]] = {
    "diffusers": {
        "cache_mixin": "0.33.0",
        "cache_context": "0.35.0",
        "cache_context_kwargs": "0.41.0",
        "pab": "0.33.0",
        "fastercache": "0.33.0",
        "fbcache": "0.35.0",
        "taylorseer": "0.36.0",
        "magcache": "0.37.0",
        # From diffusers' release notes and wheels:
        # SeaCache and cache_context(name, step_index=..., sigma=...) arrived together in 0.41.0.
        "seacache": "0.41.0",
        "textkv": "0.38.0",
    },
    "cache_dit": {
        # The oldest release the adapter serves: it needs DBCacheConfig (1.0.4), transformer-only
        # BlockAdapter(pipe=None) (1.0.10), the cache_dit.caching package (1.0.11),
        # steps_computation_mask (1.1.1) and persistent contexts that do not demand
        # num_inference_steps (1.1.8, the refresh_context release; 1.1.1 asserts on it). Verified by
        # running tests/adapters/test_cache_dit.py against 1.1.8, 1.2.0, 1.3.12, 1.5.0, 1.5.2, 1.5.3.
        "dbcache": "1.1.8",
        "fbcache": "1.1.8",
        "dbcache_config": "1.0.4",
        "transformer_only": "1.0.10",
        "caching_package": "1.0.11",
        "steps_computation_mask": "1.1.1",
        "refresh_context": "1.1.8",
        "persistent_context_without_steps": "1.1.8",
        "taylorseer_calibrator": "0.3.1",
        # Before 1.2.0 enable_cache imports accelerate, which cache-dit does not declare.
        "accelerate_optional": "1.2.0",
        # Streaks of cached steps are counted like the native engine's max_consecutive_cached
        # (reset by any computed step) only from 1.5.3.
        "max_continuous_streak": "1.5.3",
    },
}


def installed_version(distribution: str) -> str | None:
    """Installed version of a pip distribution, or None when it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def backend_version(backend: str) -> str | None:
    return installed_version(BACKEND_DISTRIBUTIONS[backend])


def at_least(installed: str | None, minimum: str) -> bool:
    """``installed >= minimum``; pre-releases of ``minimum`` (e.g. 0.35.0.dev0) count as older."""
    if installed is None:
        return False
    try:
        return Version(installed) >= Version(minimum)
    except InvalidVersion:
        return False


def feature_available(backend: str, feature: str, installed: str | None) -> bool:
    minimum = MIN_VERSIONS.get(backend, {}).get(feature)
    return minimum is not None and at_least(installed, minimum)
