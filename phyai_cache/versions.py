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
    },
    "cache_dit": {
        "dbcache": "1.0.4",
        "fbcache": "1.0.4",
        "taylorseer_calibrator": "1.0.4",
        "steps_mask": "1.1.1",
        "refresh_context": "1.1.8",
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
