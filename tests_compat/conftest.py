"""tests_compat runs in .venv-compat against an older diffusers (see .ci/compat), never in the main venv."""

from __future__ import annotations

import os

import pytest
import torch

from phyai_cache import disable_dit_cache, list_backends
from phyai_cache.versions import MIN_VERSIONS, at_least, backend_version
from phyai_cache_lab.testing import build_tiny_pipeline

torch.set_num_threads(1)  # tiny models: threads only add noise on shared cores


def pytest_configure(config: pytest.Config) -> None:
    installed = backend_version("diffusers")
    expected = os.environ.get("COMPAT_DIFFUSERS")
    if installed is None or at_least(installed, MIN_VERSIONS["diffusers"]["taylorseer"]):
        raise pytest.UsageError(
            f"tests_compat needs a diffusers release older than TaylorSeer "
            f"({MIN_VERSIONS['diffusers']['taylorseer']}); found {installed}. Run .ci/compat."
        )
    if expected and installed != expected:
        raise pytest.UsageError(f"tests_compat: expected diffusers {expected}, found {installed}")


@pytest.fixture
def flux():
    """A fresh tiny FluxPipeline; its cache, if any, is disabled after the test."""
    tiny = build_tiny_pipeline("flux")
    yield tiny
    disable_dit_cache(tiny.pipe)


@pytest.fixture
def reports():
    """list_backends() by backend name."""
    return {report.name: report for report in list_backends()}
