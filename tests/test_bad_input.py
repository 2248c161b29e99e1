"""Bad input fails with a clear error before anything changes: the target is left exactly as it was."""

from __future__ import annotations

import pytest
import torch
from snapshots import target_fingerprint
from torch import nn

import phyai_cache._patch as patch_module
import phyai_cache.lifecycle as lifecycle_module
from phyai_cache import BackendUnavailableError, DiTCacheConfigError, enable_dit_cache

ON = {"enabled": True}


@pytest.fixture
def untouched(flux):
    """Yields the pipeline; afterwards asserts fingerprint and output are unchanged."""
    reference = flux.run(num_inference_steps=4)
    fingerprint = target_fingerprint(flux.pipe)
    yield flux.pipe
    assert target_fingerprint(flux.pipe) == fingerprint
    assert torch.equal(flux.run(num_inference_steps=4), reference)


@pytest.mark.parametrize(
    "settings, error, field",
    [
        (dict(strategy="fora"), DiTCacheConfigError, "strategy"),
        (dict(backend="xformers"), DiTCacheConfigError, "backend"),
        (dict(threshold="high"), DiTCacheConfigError, "threshold"),
        (dict(threshold=-1.0), DiTCacheConfigError, "threshold"),
        (dict(threshold=float("nan")), DiTCacheConfigError, "threshold"),
        (dict(warmup_steps=2.5), DiTCacheConfigError, "warmup_steps"),
        (dict(active_steps=(4, 4)), DiTCacheConfigError, "active_steps"),
        (dict(strategy="dbcache", front_blocks=4), DiTCacheConfigError, "front_blocks"),
        (dict(strategy="dbcache", front_blocks=2, back_blocks=2), DiTCacheConfigError, "back_blocks"),
        (dict(strategy="dbcache", front_blocks=9), DiTCacheConfigError, "front_blocks"),
        (dict(taylorseer_order=7), DiTCacheConfigError, "taylorseer_order"),
        (dict(compute_mask="10x"), DiTCacheConfigError, "compute_mask"),
        (dict(options={"foo": 1}), DiTCacheConfigError, "options.foo"),
        (dict(thresh=0.2), DiTCacheConfigError, "thresh"),
    ],
)
def test_bad_config_leaves_pipeline_untouched(untouched, settings, error, field):
    with pytest.raises(error) as info:
        enable_dit_cache(untouched, **ON, **settings)
    assert info.value.field == field
    assert field in str(info.value)


def test_block_counts_are_checked_against_the_model(untouched):
    with pytest.raises(DiTCacheConfigError) as info:
        enable_dit_cache(untouched, **ON, strategy="dbcache", front_blocks=4)
    assert "4 blocks" in str(info.value) and "1 to 2" in str(info.value)  # default back_blocks=1


def test_unavailable_strategy_or_backend_names_alternatives(untouched):
    with pytest.raises(BackendUnavailableError, match="'pab' is not available on backend 'native'") as info:
        enable_dit_cache(untouched, **ON, strategy="pab", backend="native")
    assert "can serve 'pab' here" in str(info.value) or "no installed backend can serve 'pab'" in str(info.value)


def test_unknown_yaml_key_has_did_you_mean(untouched, tmp_path):
    path = tmp_path / "cache.yaml"
    path.write_text("dit_cache:\n  enabled: true\n  warmup_step: 3\n")
    with pytest.raises(DiTCacheConfigError, match="did you mean 'warmup_steps'"):
        enable_dit_cache(untouched, path)


def test_unsupported_targets():
    with pytest.raises(DiTCacheConfigError) as info:
        enable_dit_cache(object(), **ON)
    assert info.value.field == "target"

    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(2, 2)
            self.stages = nn.ModuleList([nn.Linear(2, 2)])

    model = NoBlocks()
    before = target_fingerprint(model)
    with pytest.raises(DiTCacheConfigError, match="stages") as info:
        enable_dit_cache(model, **ON)
    assert info.value.field == "blocks"
    with pytest.raises(DiTCacheConfigError, match="candidates: stages"):
        enable_dit_cache(model, **ON, blocks="stage")
    with pytest.raises(DiTCacheConfigError, match="hidden_states_arg"):
        enable_dit_cache(model, **ON, blocks={"path": "stages", "hidden_states_arg": "x"})
    with pytest.raises(DiTCacheConfigError, match="front_blocks"):
        enable_dit_cache(model, **ON, blocks="stages")  # one block: nothing left to cache
    assert target_fingerprint(model) == before


def test_failure_half_way_through_install_is_rolled_back(untouched, monkeypatch):
    """Simulated failure (a patch that raises on the third block): earlier patches are undone."""
    real_patch = patch_module.InstancePatch
    calls = []

    def failing_patch(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise RuntimeError("simulated failure while patching")
        return real_patch(*args, **kwargs)

    monkeypatch.setattr(patch_module, "InstancePatch", failing_patch)
    with pytest.raises(RuntimeError, match="simulated"):
        enable_dit_cache(untouched, **ON)


def test_failure_while_wrapping_the_pipeline_is_rolled_back(untouched, monkeypatch):
    """Simulated failure in the lifecycle's pipeline wrapper: block patches are undone too."""

    def failing_swap(*args, **kwargs):
        raise RuntimeError("simulated class swap failure")

    monkeypatch.setattr(lifecycle_module, "ClassSwap", failing_swap)
    with pytest.raises(RuntimeError, match="simulated"):
        enable_dit_cache(untouched, **ON)
