"""Fast checks that the shipped reference model loads, is deterministic and still draws digits.

These guard the benchmark's default workload: if the weights, the pipeline
wiring (scale factor, timestep convention, packing) or the classifier drift,
every cache-quality number built on top of them becomes meaningless.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from phyai_cache_lab import reference as ref
from phyai_cache_lab.reference.assets import CLASSIFIER_FILE, load_tensors
from phyai_cache_lab.reference.imaging import upsample_digits

REPO_ROOT = Path(__file__).resolve().parents[2]
DIGITS = list(range(10))


@pytest.fixture(scope="module")
def pipe() -> FluxPipeline:
    return ref.load_pipeline()


def test_pipeline_is_a_stock_flux_pipeline(pipe):
    assert type(pipe) is FluxPipeline
    assert type(pipe.transformer) is FluxTransformer2DModel
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.text_encoder is None and pipe.tokenizer is None
    assert pipe.vae_scale_factor == 1
    assert pipe.transformer.dtype == torch.float32
    assert not pipe.scheduler.config.use_dynamic_shifting


def test_metadata_describes_training():
    meta = ref.load_metadata()
    assert meta["image_size"] == 16
    assert meta["training"]["steps"] > 0
    assert meta["transformer_config"]["in_channels"] == 4


def test_call_kwargs_shapes_and_fresh_generator():
    kwargs = ref.call_kwargs([3, 1, 4], num_inference_steps=7, seed=5)
    assert kwargs["prompt_embeds"].shape == (3, 4, 64)
    assert kwargs["pooled_prompt_embeds"].shape == (3, 64)
    assert kwargs["output_type"] == "latent" and kwargs["height"] == kwargs["width"] == 16
    assert "true_cfg_scale" not in kwargs and "negative_prompt_embeds" not in kwargs
    again = ref.call_kwargs([3, 1, 4], num_inference_steps=7, seed=5)
    assert kwargs["generator"] is not again["generator"]
    assert torch.equal(torch.randn(4, generator=kwargs["generator"]), torch.randn(4, generator=again["generator"]))


def test_cfg_kwargs_use_the_null_class():
    kwargs = ref.call_kwargs([0, 9], cfg_scale=2.0)
    assert kwargs["true_cfg_scale"] == 2.0
    null = ref.class_embeddings([0, 9], null=True)
    assert torch.equal(kwargs["negative_prompt_embeds"], null["prompt_embeds"])
    assert torch.equal(kwargs["negative_pooled_prompt_embeds"], null["pooled_prompt_embeds"])
    assert kwargs["negative_prompt_embeds"].shape == kwargs["prompt_embeds"].shape
    assert not torch.equal(null["prompt_embeds"][0], kwargs["prompt_embeds"][0])


def test_invalid_labels_are_rejected():
    with pytest.raises(ValueError):
        ref.call_kwargs([10])
    with pytest.raises(ValueError):
        ref.class_embeddings([-1])


def test_packing_matches_diffusers():
    x = torch.randn(2, 1, 16, 16)
    packed = ref.pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 1, 16, 16))
    assert torch.equal(ref.unpack_latents(packed), x)
    assert torch.equal(ref.latent_image_ids(), FluxPipeline._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32))


def test_generation_shapes_and_range(pipe):
    latents = pipe(**ref.call_kwargs([2, 7], num_inference_steps=4, seed=1)).images
    assert latents.shape == (2, 64, 4)
    images = ref.latents_to_images(latents)
    assert images.shape == (2, 1, 16, 16)
    assert images.min() >= 0.0 and images.max() <= 1.0


def test_generation_is_deterministic_per_seed(pipe):
    a = ref.generate(pipe, [5, 8], num_inference_steps=6, seed=11)
    b = ref.generate(pipe, [5, 8], num_inference_steps=6, seed=11)
    c = ref.generate(pipe, [5, 8], num_inference_steps=6, seed=12)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_samples_are_recognisable_digits(pipe):
    classifier = ref.load_classifier()
    scores = [ref.agreement(ref.generate(pipe, DIGITS, 20, seed), DIGITS, classifier) for seed in (0, 1)]
    assert sum(scores) / len(scores) >= 0.9


def test_true_cfg_runs_and_recognisable(pipe):
    images = ref.generate(pipe, DIGITS, num_inference_steps=10, seed=0, cfg_scale=2.0)
    assert images.shape == (10, 1, 16, 16)
    assert ref.agreement(images, DIGITS) >= 0.9


def test_classifier_recognises_real_class_means():
    means = load_tensors(CLASSIFIER_FILE)["class_means"]  # (10, 8, 8) real digits, 0..16
    assert means.shape == (10, 8, 8) and means.max() <= 16.0
    assert ref.classify(upsample_digits(means)).tolist() == DIGITS
    assert ref.agreement(upsample_digits(means), DIGITS) == 1.0


def test_classifier_is_near_chance_on_noise():
    noise = torch.rand(200, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    predicted = ref.classify(noise)
    assert predicted.shape == (200,)
    assert ref.agreement(noise, torch.randint(0, 10, (200,), generator=torch.Generator().manual_seed(1))) < 0.5


def test_runtime_does_not_import_sklearn():
    code = (
        "import sys, torch\n"
        "from phyai_cache_lab import reference as r\n"
        "r.load_classifier(); r.load_pipeline(); r.class_embeddings([1])\n"
        "assert 'sklearn' not in sys.modules, 'sklearn imported at runtime'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, env=env, timeout=120)


def test_weight_files_are_small():
    total = sum(p.stat().st_size for p in ref.WEIGHTS_DIR.iterdir() if p.is_file())
    assert total < 8_000_000
