"""Tests for the tiny offline pipelines that every cache test is built on.

They check the properties cache tests rely on: determinism, prompts and
resolutions that really change what the transformer sees, and CFG that really
calls the transformer twice per step.
"""

from __future__ import annotations

import pytest
import torch

from phyai_cache.blocks import discover_blocks
from phyai_cache_lab.testing import PIPELINE_FAMILIES, TinyPipeline, build_tiny_pipeline, count_transformer_calls

STEPS = 3


@pytest.fixture(scope="module", params=PIPELINE_FAMILIES)
def tiny(request: pytest.FixtureRequest) -> TinyPipeline:
    return build_tiny_pipeline(request.param)


def _transformer_batch_sizes(tiny: TinyPipeline, **call_kwargs) -> list[int]:
    """Batch dimension of hidden_states at every transformer call."""
    sizes: list[int] = []

    def record(module, args, kwargs) -> None:
        sizes.append(kwargs["hidden_states"].shape[0])

    handle = tiny.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        tiny.run(**call_kwargs)
    finally:
        handle.remove()
    return sizes


def test_runs_and_is_deterministic(tiny: TinyPipeline) -> None:
    first = tiny.run(num_inference_steps=STEPS)
    second = tiny.run(num_inference_steps=STEPS)
    assert first.isfinite().all()
    assert torch.equal(first, second)


def test_seed_and_prompt_seed_change_output(tiny: TinyPipeline) -> None:
    base = tiny.run(num_inference_steps=STEPS)
    assert not torch.equal(base, tiny.run(num_inference_steps=STEPS, prompt_seed=1))
    assert not torch.equal(base, tiny.run(num_inference_steps=STEPS, seed=1))


def test_batch_size_reaches_transformer(tiny: TinyPipeline) -> None:
    if tiny.max_batch_size == 1:
        with pytest.raises(ValueError, match="batch_size must be at most 1"):
            tiny.call_kwargs(batch_size=2)
        return
    out = tiny.run(num_inference_steps=STEPS, batch_size=2)
    assert out.shape[0] == 2
    assert _transformer_batch_sizes(tiny, num_inference_steps=STEPS, batch_size=2) == [2] * STEPS


def test_resolution_changes_output_shape(tiny: TinyPipeline) -> None:
    small = tiny.run(num_inference_steps=STEPS)
    large = tiny.run(num_inference_steps=STEPS, resolution=96)
    assert small.shape != large.shape
    assert large.numel() > small.numel()


def test_cfg_doubles_transformer_calls(tiny: TinyPipeline) -> None:
    plain = count_transformer_calls(tiny.pipe, **tiny.call_kwargs(num_inference_steps=STEPS))
    guided = count_transformer_calls(tiny.pipe, **tiny.call_kwargs(num_inference_steps=STEPS, cfg=True))
    assert plain == STEPS
    assert guided == 2 * STEPS
    assert not tiny.transformer._forward_pre_hooks  # counter removed


def test_cfg_changes_output(tiny: TinyPipeline) -> None:
    assert not torch.equal(tiny.run(num_inference_steps=STEPS), tiny.run(num_inference_steps=STEPS, cfg=True))


def test_block_lists_have_enough_blocks(tiny: TinyPipeline) -> None:
    blocks = [len(getattr(tiny.transformer, name)) for name in tiny.block_lists]
    assert all(n > 0 for n in blocks)
    assert sum(blocks) >= 4


@pytest.mark.parametrize("family", PIPELINE_FAMILIES)
def test_same_seed_same_weights(family: str) -> None:
    state = torch.random.get_rng_state()
    a = build_tiny_pipeline(family, seed=7).transformer.state_dict()
    b = build_tiny_pipeline(family, seed=7).transformer.state_dict()
    c = build_tiny_pipeline(family, seed=8).transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched


@pytest.mark.parametrize("family", PIPELINE_FAMILIES)
def test_transformer_overrides(family: str) -> None:
    tiny = build_tiny_pipeline(family, num_layers=3)
    first_list = getattr(tiny.transformer, tiny.block_lists[0])
    assert len(first_list) == 3


def test_rejects_unknown_family_and_bad_resolution() -> None:
    with pytest.raises(ValueError, match="unknown family"):
        build_tiny_pipeline("sdxl")
    with pytest.raises(ValueError, match="multiple of 16"):
        build_tiny_pipeline("flux").call_kwargs(resolution=40)
    with pytest.raises(ValueError, match="multiple of 32"):  # Qwen-Image 2.1: 16x VAE, rounded to 32
        build_tiny_pipeline("qwenimage21").call_kwargs(resolution=80)


def test_phyai_families_are_the_real_pipeline_classes() -> None:
    """Qwen-Image 2.1 and Cosmos3 run diffusers' own pipelines; only Qwen-Image 2.1's processor is a
    stand-in (Qwen3VLProcessor needs torchvision), holding the real tokenizer."""
    from diffusers import Cosmos3OmniPipeline, QwenImage21Pipeline
    from transformers import Qwen2Tokenizer

    qwen, cosmos = build_tiny_pipeline("qwenimage21"), build_tiny_pipeline("cosmos3")
    assert type(qwen.pipe) is QwenImage21Pipeline and type(cosmos.pipe) is Cosmos3OmniPipeline
    assert isinstance(qwen.pipe.processor.tokenizer, Qwen2Tokenizer)
    assert isinstance(cosmos.pipe.text_tokenizer, Qwen2Tokenizer)
    # diffusers' registry does not describe Qwen-Image 2.1's blocks; the library knows them (known_blocks)
    assert [bl.path for bl in discover_blocks(qwen.transformer)] == ["transformer_blocks"]
