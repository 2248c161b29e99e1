"""Shared fixtures: tiny offline pipelines and the toy custom transformer (random weights)."""

from __future__ import annotations

import logging

import pytest
import torch

from phyai_cache import disable_dit_cache, get_cache_handle
from phyai_cache_lab.testing import build_tiny_pipeline
from phyai_cache_lab.testing.toy import build_toy_dit

torch.set_num_threads(1)  # small models: threads only add noise on shared cores


@pytest.fixture(autouse=True)
def _phyai_cache_logs(caplog):
    caplog.set_level(logging.INFO, logger="phyai_cache")


@pytest.fixture
def flux():
    """A fresh tiny FluxPipeline (2 double + 2 single blocks); disabled again after the test."""
    tiny = build_tiny_pipeline("flux")
    yield tiny
    if get_cache_handle(tiny.pipe) is not None:
        disable_dit_cache(tiny.pipe)


@pytest.fixture
def toy():
    return build_toy_dit()
