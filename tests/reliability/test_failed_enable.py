"""A failed enable leaves the target untouched, on every backend x strategy: an unsupported model, a
bad Fn/Bn, a missing backend. Compared: instance dicts and forwards of every submodule, hook
counts, the pipeline class, and a forward output."""

from __future__ import annotations

import pytest
import torch
from combos import combo_id, served_combinations, settings_for
from snapshots import target_fingerprint
from torch import nn

import phyai_cache.registry as registry
from phyai_cache import BackendUnavailableError, DiTCacheConfigError, enable_dit_cache
from phyai_cache_lab.testing import build_tiny_pipeline

COMBOS = served_combinations()
REFUSALS = (DiTCacheConfigError, BackendUnavailableError)


class NotADiT(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.heads = nn.ModuleList([nn.Linear(4, 4)])

    def forward(self, x):
        return self.heads[0](self.stem(x))


@pytest.fixture
def flux_untouched():
    tiny = build_tiny_pipeline("flux")
    reference = tiny.run(num_inference_steps=3, cfg=True)
    fingerprint = target_fingerprint(tiny.pipe)
    yield tiny
    assert target_fingerprint(tiny.pipe) == fingerprint
    assert torch.equal(tiny.run(num_inference_steps=3, cfg=True), reference)


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_unsupported_model(combo):
    model = NotADiT()
    x = torch.randn(2, 4)
    expected, fingerprint = model(x), target_fingerprint(model)
    with pytest.raises(REFUSALS):
        enable_dit_cache(model, **settings_for(*combo))
    assert target_fingerprint(model) == fingerprint
    assert torch.equal(model(x), expected)


@pytest.mark.parametrize("combo", [c for c in COMBOS if c[1] == "dbcache"], ids=combo_id)
def test_bad_front_and_back_blocks(combo, flux_untouched):
    """The tiny Flux model has 4 blocks: Fn=3 + Bn=2 leaves nothing to cache."""
    with pytest.raises(DiTCacheConfigError, match="front_blocks|back_blocks"):
        enable_dit_cache(flux_untouched.pipe, **dict(settings_for(*combo), front_blocks=3, back_blocks=2))


@pytest.mark.parametrize("combo", [c for c in COMBOS if c[0] != "native"], ids=combo_id)
def test_missing_backend(combo, flux_untouched, monkeypatch):
    """Simulated uninstall (the package cannot be removed from this test environment)."""
    backend = registry.registered_backends()[combo[0]]
    monkeypatch.setattr(type(backend), "version", lambda self: None)
    with pytest.raises(BackendUnavailableError, match="not installed"):
        enable_dit_cache(flux_untouched.pipe, **settings_for(*combo))
