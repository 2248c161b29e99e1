"""Disabled means identical: importing, or enabling a disabled config, changes nothing."""

from __future__ import annotations

import importlib
import subprocess
import sys

import torch
from snapshots import target_fingerprint

from phyai_cache import DiTCacheConfig, disable_dit_cache, enable_dit_cache
from phyai_cache_lab.testing import build_tiny_pipeline


def _run(tiny, **kwargs):
    return tiny.run(**kwargs)


def test_import_changes_nothing():
    """A fresh interpreter: the pipeline's output is the same with or without the import."""
    script = (
        "import torch, sys\n"
        "from phyai_cache_lab.testing.tiny import build_tiny_pipeline\n"
        "t = build_tiny_pipeline('flux')\n"
        "before = t.run(num_inference_steps=3)\n"
        "mods = set(sys.modules)\n"
        "import phyai_cache\n"
        "after = t.run(num_inference_steps=3)\n"
        "assert torch.equal(before, after)\n"
        "import diffusers\n"
        "assert diffusers.FluxPipeline.__call__.__module__.startswith('diffusers')\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_enable_with_default_config_is_a_no_op(flux):
    reference = flux.run(num_inference_steps=4)
    fingerprint = target_fingerprint(flux.pipe)
    handle = enable_dit_cache(flux.pipe, DiTCacheConfig())
    assert not handle.enabled and handle.backend is None
    assert target_fingerprint(flux.pipe) == fingerprint
    assert torch.equal(flux.run(num_inference_steps=4), reference)
    with handle.run(), handle.branch("cond"):  # no-op scopes, so custom loops need no special case
        pass
    assert handle.last_run is None


def test_disabled_config_with_settings_warns(flux, caplog):
    enable_dit_cache(flux.pipe, threshold=0.5)
    assert "enabled=False" in caplog.text


def test_enabled_but_never_hitting_is_bit_identical(flux):
    """threshold 0 never caches; the wrappers alone must not change a single bit."""
    reference = flux.run(num_inference_steps=6, cfg=True)
    handle = enable_dit_cache(flux.pipe, enabled=True, threshold=0.0, warmup_steps=0)
    assert torch.equal(flux.run(num_inference_steps=6, cfg=True), reference)
    assert handle.last_run.steps_cached == 0


def test_enabling_keeps_seed_dtype_device_and_arguments(flux):
    tiny = build_tiny_pipeline("flux")
    kwargs = tiny.call_kwargs(num_inference_steps=4)
    snapshot = {k: v for k, v in kwargs.items() if k != "generator"}
    dtype, device = tiny.pipe.transformer.dtype, tiny.pipe.transformer.device
    rng_state = torch.get_rng_state()
    enable_dit_cache(tiny.pipe, enabled=True, threshold=0.0)
    tiny.pipe(**kwargs)
    assert kwargs.keys() == {**snapshot, "generator": None}.keys()
    for key, value in snapshot.items():
        assert kwargs[key] is value
    assert tiny.pipe.transformer.dtype == dtype and tiny.pipe.transformer.device == device
    assert torch.equal(torch.get_rng_state(), rng_state)
    disable_dit_cache(tiny.pipe)


def test_disable_restores_exactly(flux):
    reference = flux.run(num_inference_steps=5)
    fingerprint = target_fingerprint(flux.pipe)
    pipeline_class = type(flux.pipe)
    enable_dit_cache(flux.pipe, enabled=True, threshold=10.0, warmup_steps=1)
    assert type(flux.pipe) is not pipeline_class  # its own subclass while cached
    assert not torch.equal(flux.run(num_inference_steps=5), reference)
    disable_dit_cache(flux.pipe)
    assert type(flux.pipe) is pipeline_class
    assert target_fingerprint(flux.pipe) == fingerprint
    assert torch.equal(flux.run(num_inference_steps=5), reference)


def test_other_instances_of_the_class_are_untouched():
    cached, plain = build_tiny_pipeline("flux"), build_tiny_pipeline("flux")
    reference = plain.run(num_inference_steps=5)
    enable_dit_cache(cached.pipe, enabled=True, threshold=10.0, warmup_steps=1)
    assert type(plain.pipe).__call__ is importlib.import_module("diffusers").FluxPipeline.__call__
    assert torch.equal(plain.run(num_inference_steps=5), reference)
    assert not torch.equal(cached.run(num_inference_steps=5), reference)
    disable_dit_cache(cached.pipe)


def test_import_needs_no_backend_library():
    """phyai deployments without diffusers or cache-dit still get the native engine."""
    script = ("import sys, phyai_cache\n"
              "assert not {'diffusers', 'cache_dit'} & set(sys.modules), sorted(sys.modules)\n"
              "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
