"""diffusers' SeaCache and TextKVCache behind the unified config."""

from __future__ import annotations

import contextlib

import pytest
import torch

from phyai_cache import CacheStateError, DiTCacheConfigError, enable_dit_cache
from phyai_cache.adapters.diffusers.seacache import raw_vision
from phyai_cache.tuning import psnr
from phyai_cache.versions import feature_available, installed_version
from phyai_cache_lab.reference import call_kwargs, latents_to_images, load_pipeline
from phyai_cache_lab.testing import build_tiny_pipeline
from phyai_cache_lab.testing.families import SERVED, family, run_family

pytestmark = pytest.mark.skipif(not feature_available("diffusers", "seacache", installed_version("diffusers")),
                                reason="needs diffusers with SeaCache and TextKVCache")
ON = {"enabled": True, "backend": "diffusers"}


# -- seacache ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["flux", "qwenimage", "wan"])
def test_seacache_caches_on_image_and_video_models(family):
    tiny = build_tiny_pipeline(family)
    plain = tiny.run(num_inference_steps=8)
    handle = enable_dit_cache(tiny.pipe, **ON, strategy="seacache", threshold=10.0, warmup_steps=2,
                              max_consecutive_cached=3)
    output = tiny.run(num_inference_steps=8)
    stats = handle.last_run
    # diffusers' SeaCache caches nothing without the step/sigma context or the latents: it "fails open"
    assert stats.steps_cached > 0, family
    assert [r.reason for r in stats.records[:2]] == ["warmup", "warmup"]
    assert all(r.blocks_computed == 0 for r in stats.records if r.decision == "cached")
    assert all(r.blocks_computed > 0 for r in stats.records if r.decision == "computed")
    streak = longest = 0
    for record in stats.records:
        streak = streak + 1 if record.decision == "cached" else 0
        longest = max(longest, streak)
    assert longest <= 3
    handle.disable()
    assert torch.equal(tiny.run(num_inference_steps=8), plain)
    assert output.shape == plain.shape


def test_seacache_threshold_zero_is_bit_identical_and_each_cached_step_is_below_the_threshold():
    pipe = load_pipeline()
    with torch.no_grad():
        uncached = pipe(**call_kwargs([0, 5], num_inference_steps=20, seed=2)).images
    handle = enable_dit_cache(pipe, **ON, strategy="seacache", threshold=0.0)
    with torch.no_grad():
        same = pipe(**call_kwargs([0, 5], num_inference_steps=20, seed=2)).images
    assert handle.last_run.steps_cached == 0 and torch.equal(same, uncached)
    handle.disable()
    handle = enable_dit_cache(pipe, **ON, strategy="seacache", threshold=0.2, active_steps=[0, 16])
    with torch.no_grad():
        cached = pipe(**call_kwargs([0, 5], num_inference_steps=20, seed=2)).images
    stats = handle.last_run
    handle.disable()
    assert stats.steps_cached > 0
    assert all(r.diff < 0.2 for r in stats.records if r.decision == "cached")
    assert all(r.decision == "computed" for r in stats.records[16:])  # active_steps end -> cache_end_steps
    assert psnr(latents_to_images(cached), latents_to_images(uncached)) > 35


def test_raw_vision_reads_packed_and_unpacked_latents():
    grid = torch.randn(2, 3, 4, 5)  # (B, C, H, W)
    packed = grid.permute(0, 2, 3, 1).reshape(2, 20, 3)
    rows, columns = torch.meshgrid(torch.arange(4), torch.arange(5), indexing="ij")
    ids = torch.stack([torch.zeros(20), rows.flatten().float(), columns.flatten().float()], dim=1)
    for kwargs in ({"hidden_states": packed, "img_ids": ids}, {"hidden_states": packed, "img_shapes": [(1, 4, 5)] * 2}):
        vision = raw_vision(None, (), kwargs)
        assert len(vision) == 2 and all(torch.equal(v[:, 0], g) for v, g in zip(vision, grid))
    assert torch.equal(raw_vision(None, (grid,), {})[1][:, 0], grid[1])
    video = torch.randn(2, 3, 2, 4, 5)
    assert torch.equal(raw_vision(None, (), {"hidden_states": video})[0], video[0])
    ltx = {"hidden_states": video.permute(0, 2, 3, 4, 1).reshape(2, 40, 3), "num_frames": 2, "height": 4, "width": 5}
    assert torch.equal(raw_vision(None, (), ltx)[1], video[1])
    assert raw_vision(None, (), {**ltx, "height": 5, "width": 4}) is not None  # same count: trusted
    assert raw_vision(None, (), {**ltx, "num_frames": 1}) is None  # the grid does not cover the tokens
    assert raw_vision(None, (), {"hidden_states": packed}) is None  # no layout


def test_seacache_caches_ltx_in_a_custom_loop():
    """LTX packs its latents into tokens and passes the grid as num_frames/height/width; the matrix
    run checks the first step against the uncached model and that disabling is bit-identical."""
    (cell,) = run_family(family("ltx"), [("diffusers", "seacache")])
    assert cell.status == SERVED and cell.steps_cached > 0, cell.reason


def test_a_call_without_readable_latents_fails_before_it_runs(flux):
    """diffusers would run every such call in full ("fails open"): a run that could cache nothing."""
    transformer = flux.transformer
    reference = transformer(**_flux_inputs(img_ids=torch.zeros(16, 3))).sample  # ids that form no grid
    handle = enable_dit_cache(transformer, **ON, strategy="seacache", threshold=10.0)
    for broken, message in ((dict(img_ids=torch.zeros(16, 3)), "visual latents"), (dict(timestep=None), "timestep")):
        with pytest.raises(CacheStateError, match=message):
            with handle.run(num_inference_steps=4):
                transformer(**_flux_inputs(**broken))
        assert [(r.reason, r.blocks_computed) for r in handle.last_run.records] == [("raised", 0)]  # before it ran
    handle.disable()
    assert torch.equal(transformer(**_flux_inputs(img_ids=torch.zeros(16, 3))).sample, reference)


def test_seacache_refuses_a_model_whose_first_and_last_blocks_differ():
    """Flux2: a double-stream head on the image tokens, a single-stream tail on text + image tokens;
    diffusers' SeaCache never records a residual there and would cache no step."""
    from diffusers import Flux2Transformer2DModel

    from phyai_cache_lab.testing.families import target_fingerprint

    flux2 = Flux2Transformer2DModel(in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                    num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=16,
                                    axes_dims_rope=(4, 4, 4, 4))
    before = target_fingerprint(flux2)
    with pytest.raises(DiTCacheConfigError, match="never records a residual") as info:
        enable_dit_cache(flux2, **ON, strategy="seacache")
    assert info.value.field == "target" and "same streams" in info.value.allowed and "native" in str(info.value)
    assert target_fingerprint(flux2) == before


def _flux_inputs(**overrides) -> dict:
    """One call of the tiny Flux transformer (16 tokens in a 4 x 4 grid)."""
    generator = torch.Generator().manual_seed(0)
    rows, columns = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    inputs = dict(hidden_states=torch.randn(1, 16, 16, generator=generator),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=generator),
                  pooled_projections=torch.randn(1, 32, generator=generator), timestep=torch.tensor([0.5]),
                  img_ids=torch.stack([torch.zeros(16), rows.flatten(), columns.flatten()], dim=1).float(),
                  txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]))
    return {**inputs, **overrides}


def test_seacache_needs_the_step_count_in_a_custom_loop():
    tiny = build_tiny_pipeline("flux")
    handle = enable_dit_cache(tiny.transformer, **ON, strategy="seacache")
    with pytest.raises(CacheStateError, match="num_inference_steps"):
        with handle.run():
            pass
    handle.disable()


@pytest.mark.parametrize("settings, field, message", [
    (dict(strategy="seacache", separate_cfg=False), "separate_cfg", "per CFG branch"),
    (dict(strategy="seacache", taylorseer_order=2), "taylorseer_order", "0 or 1"),
    (dict(strategy="seacache", options={"power_exp": 0}), "options.power_exp", "> 0"),
    (dict(strategy="seacache", options={"raw_vision_callback": "mine"}), "options.raw_vision_callback",
     "phyai_cache supplies it"),
    (dict(strategy="seacache", options={"retention_steps": 3}), "options.retention_steps", "warmup_steps"),
    (dict(strategy="textkv", options={"foo": 1}), "options.foo", "no options"),
    (dict(strategy="textkv"), "target", "NucleusMoEImageTransformerBlock"),
])
def test_bad_settings_are_refused_before_anything_changes(flux, settings, field, message):
    before = dict(vars(flux.transformer))
    with pytest.raises(DiTCacheConfigError, match=message) as info:
        enable_dit_cache(flux.pipe, **ON, **settings)
    assert info.value.field == field
    assert dict(vars(flux.transformer)) == before


# -- textkv --------------------------------------------------------------------------------------


@pytest.fixture
def nucleus():
    from diffusers import NucleusMoEImageTransformer2DModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return NucleusMoEImageTransformer2DModel(
            patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, axes_dims_rope=(4, 6, 6), moe_enabled=False).eval()


def _nucleus_loop(model, handle=None, steps=3):
    x = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = {"cond": torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1)),
               "uncond": torch.zeros(2, 5, 32)}
    outputs = []
    run = handle.run(num_inference_steps=steps) if handle is not None else contextlib.nullcontext()
    with run, torch.no_grad():
        for i in range(steps):
            for branch, prompt in prompts.items():
                scope = handle.branch(branch) if handle is not None else contextlib.nullcontext()
                with scope:
                    outputs.append(model(hidden_states=x, img_shapes=[(1, 4, 4)] * 2, encoder_hidden_states=prompt,
                                         timestep=torch.full((2,), 1 - i / steps), return_dict=False)[0])
    return outputs


def test_textkv_is_exact_and_projects_each_prompts_text_once(nucleus):
    uncached = _nucleus_loop(nucleus)
    projections = []
    hook = nucleus.transformer_blocks[0].attn.add_k_proj.register_forward_hook(lambda *_: projections.append(1))
    handle = enable_dit_cache(nucleus, **ON, strategy="textkv")
    try:
        cached = _nucleus_loop(nucleus, handle, steps=3)
    finally:
        hook.remove()
    assert all(torch.equal(a, b) for a, b in zip(uncached, cached))
    assert len(projections) == 2  # once per branch's prompt, not once per call (6 calls)
    stats = handle.last_run
    assert [(r.decision, r.reason) for r in stats.records] == [("computed", "exact")] * 6
    handle.disable()
    assert "_phyai_cache_handle" not in vars(nucleus)
    again = _nucleus_loop(nucleus)
    assert all(torch.equal(a, b) for a, b in zip(uncached, again))


def test_textkv_state_does_not_leak_into_the_next_run(nucleus):
    handle = enable_dit_cache(nucleus, **ON, strategy="textkv")
    _nucleus_loop(nucleus, handle, steps=2)
    projections = []
    hook = nucleus.transformer_blocks[0].attn.add_k_proj.register_forward_hook(lambda *_: projections.append(1))
    try:
        _nucleus_loop(nucleus, handle, steps=2)
    finally:
        hook.remove()
    assert len(projections) == 2  # a new run computes its prompts' K/V again
    handle.disable()
