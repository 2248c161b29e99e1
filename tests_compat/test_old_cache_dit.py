"""phyai_cache with the oldest cache-dit the adapter serves (1.1.8, beside diffusers 0.35.x): what
list_backends() reports and the features refused at that version, against the real installed
release (see .ci/compat); nothing here patches the version. That what exists works there, with our
lifecycle and CFG guarantees, is shown by the whole tests/adapters/test_cache_dit.py, which
.ci/compat runs in the same environment.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")  # read once, when cache_dit is first imported

from phyai_cache import (  # noqa: E402
    BackendUnavailableError,
    DiTCacheConfigError,
    enable_dit_cache,
)
from phyai_cache.versions import MIN_VERSIONS, at_least, backend_version  # noqa: E402

INSTALLED = backend_version("cache_dit")
TABLE = MIN_VERSIONS["cache_dit"]
ON = {"enabled": True, "backend": "cache_dit", "threshold": 0.6, "warmup_steps": 1}

pytestmark = pytest.mark.skipif(
    INSTALLED is None or at_least(INSTALLED, TABLE["max_continuous_streak"]),
    reason=f"needs a cache-dit older than {TABLE['max_continuous_streak']} (.ci/compat installs one); "
           f"found {INSTALLED}",
)


def test_list_backends_reports_the_old_cache_dit(reports):
    report = reports["cache_dit"]
    assert report.installed and report.version == INSTALLED
    assert sorted(report.available_strategies) == ["dbcache", "fbcache"]
    assert "calibrator" in report.strategies["taylorseer"].reason


def test_the_streak_cap_is_refused_before_upstream_counts_it_like_we_do(flux):
    reference = flux.run(num_inference_steps=4)
    with pytest.raises(DiTCacheConfigError) as info:
        enable_dit_cache(flux.pipe, **ON, max_consecutive_cached=2)
    assert info.value.field == "max_consecutive_cached"
    assert TABLE["max_continuous_streak"] in str(info.value) and "backend 'native'" in str(info.value)
    assert torch.equal(flux.run(num_inference_steps=4), reference)  # untouched


def test_missing_accelerate_is_reported_at_enable(flux, monkeypatch):
    """cache-dit < 1.2.0 imports accelerate in enable_cache without declaring it. accelerate is
    installed here, so its absence is simulated by a patched importlib.util.find_spec."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "accelerate" else real_find_spec(name, *a))
    reference = flux.run(num_inference_steps=4)
    with pytest.raises(BackendUnavailableError, match=rf"pip install accelerate.*>= {TABLE['accelerate_optional']}"):
        enable_dit_cache(flux.pipe, **ON)
    assert torch.equal(flux.run(num_inference_steps=4), reference)

