"""phyai's own code for the integration tests: skipped on a fresh clone without phyai's source, but
never in CI (``PHYAI_CACHE_REQUIRE_PHYAI=1`` in .ci/run turns the skip into a failure)."""

from __future__ import annotations

import os

import pytest

from phyai_cache_lab.testing.phyai import missing_reason, phyai_source

REQUIRE_ENV = "PHYAI_CACHE_REQUIRE_PHYAI"


def pytest_collection_modifyitems(config, items):
    if phyai_source() is not None:
        return
    if os.environ.get(REQUIRE_ENV):
        raise pytest.UsageError(f"{REQUIRE_ENV} is set but {missing_reason()}")
    skip = pytest.mark.skip(reason=missing_reason())
    for item in items:
        if "integrations" in str(item.fspath):
            item.add_marker(skip)
