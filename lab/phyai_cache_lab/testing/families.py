"""Every DiT transformer family of the installed diffusers, tiny and offline, and the support matrix.

Why: the support table (``docs/support.md``) must say, per family, per backend and per strategy,
whether phyai_cache serves it, refuses it at enable time (and why), or fails -- measured, not
claimed. Building ~60 full pipelines would take minutes and needs tokenizers and VAEs for most of
them, so each family here is a transformer built from a tiny config with seeded random weights,
plus the keyword arguments of one call; :func:`denoise` drives it with a minimal CFG denoising loop
(``handle.run()`` around the generation, ``handle.branch()`` around each branch's call, an Euler
step on the latent when the prediction has its shape). Pipeline-level behaviour (the pipeline's own
loop, ``cache_context`` names, KV caches) is tested on the tiny pipelines of
:mod:`phyai_cache_lab.testing.tiny`.

``FAMILIES`` lists the families; ``NOT_BUILT`` the DiT classes that cannot be built or driven here
(with the reason); ``NOT_DIT`` the classes exported from ``diffusers.models.transformers`` that are
not a diffusion transformer denoiser. :func:`unlisted_classes` names the classes a newer diffusers
adds, so a test fails until they are classified.

:func:`run_matrix` runs every installed backend x available strategy on every family and returns
one :class:`Cell` per combination: ``served`` (steps were cached in both branches; the first step,
computed, equals the uncached model's; with every step's inputs equal, a cached step reproduces the
computed one; a second run repeats the first, so nothing carried over; after disabling, the model
is bit-identical to never enabled), ``refused`` (a clear error at enable time, the model untouched)
or ``failed`` (anything else, with what happened). ``support_table.render`` turns it into
``docs/support.md``.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

STEPS = 3
"""Denoising steps of the minimal loop (two CFG branches each: six transformer calls per run)."""
SIGMA_STEP = 0.01
"""Noise-level change per step, as in the first steps of a 100-step schedule: adjacent steps stay
similar enough for a random-weight model to pass a measured threshold below 1 (Cache-DiT's)."""
BRANCHES = ("cond", "uncond")

Inputs = Callable[[torch.Generator], dict[str, Any]]


@dataclass(frozen=True)
class Family:
    """How to build one family's tiny transformer and call it.

    ``inputs(generator)`` returns the keyword arguments of one call; conditioning tensors are drawn
    from ``generator`` (a different seed per CFG branch). The loop replaces ``latent`` (the noisy
    input, a tensor or a list of tensors) and the timestep: ``timestep`` names the argument, which
    receives ``sigma * timestep_scale`` as a per-sample vector, or is a function
    ``(kwargs, sigma) -> None`` that writes it for models with another convention.
    Every family is enabled with ``blocks=None``: the library finds the blocks itself, from diffusers'
    block registry or, where it has none, from :data:`phyai_cache.known_blocks.KNOWN_MODELS`.
    """

    name: str
    model_class: str
    config: Mapping[str, Any]
    inputs: Inputs
    latent: str = "hidden_states"
    timestep: str | Callable[[dict[str, Any], float], None] = "timestep"
    timestep_scale: float = 1000.0
    note: str = ""
    model_inputs: Callable[[torch.nn.Module], dict[str, Any]] | None = None  # inputs the model itself computes

    def build(self, seed: int = 0) -> torch.nn.Module:
        """The transformer with weights drawn from ``seed`` (the global RNG state is left as it was)."""
        import diffusers

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = getattr(diffusers, self.model_class)(**self.config)
            _redraw_zero_parameters(model)
        return model.eval()

    def call_kwargs(self, branch: str = "cond") -> dict[str, Any]:
        """One call's arguments for ``branch``; every branch shares the cond branch's latent."""
        kwargs = self.inputs(torch.Generator("cpu").manual_seed(BRANCHES.index(branch) if branch in BRANCHES else 7))
        if branch != "cond":
            kwargs[self.latent] = self.inputs(torch.Generator("cpu").manual_seed(0))[self.latent]
        return kwargs

    def set_timestep(self, kwargs: dict[str, Any], sigma: float) -> None:
        if callable(self.timestep):
            self.timestep(kwargs, sigma)
            return
        kwargs[self.timestep] = torch.full((_batch_size(kwargs[self.latent]),), sigma * self.timestep_scale)


@dataclass(frozen=True)
class Unlisted:
    """A class that is not in the matrix, and why."""

    model_class: str
    reason: str


def denoise(family: Family, transformer: torch.nn.Module, handle: Any = None, steps: int = STEPS,
            branches: Sequence[str] = BRANCHES, guidance: float = 2.0, frozen: bool = False) -> list[torch.Tensor]:
    """The minimal CFG loop; returns every call's prediction (cond then uncond per step).

    With ``handle``, the generation runs inside ``handle.run()`` and each call inside
    ``handle.branch(name)``; without, the model is called plainly. ``frozen`` repeats the first
    step's inputs at every step (same latent, same noise level), so a cached step must reproduce
    the computed one.
    """
    calls = {branch: family.call_kwargs(branch) for branch in branches}
    if family.model_inputs is not None:
        for kwargs in calls.values():
            kwargs.update(family.model_inputs(transformer))
    latent = calls[branches[0]][family.latent]
    sigmas = [1.0 - i * SIGMA_STEP for i in range(steps + 1)]
    predictions: list[torch.Tensor] = []
    with (handle.run(num_inference_steps=steps) if handle is not None else contextlib.nullcontext()):
        for step in range(steps):
            per_branch = []
            for branch in branches:
                kwargs = dict(calls[branch])
                kwargs[family.latent] = latent
                family.set_timestep(kwargs, sigmas[0] if frozen else sigmas[step])
                with (handle.branch(branch) if handle is not None else contextlib.nullcontext()):
                    with torch.no_grad():
                        output = transformer(**kwargs)
                per_branch.append(_first_tensor(output))
            predictions.extend(per_branch)
            velocity = per_branch[0]
            if len(per_branch) > 1:
                velocity = per_branch[1] + guidance * (per_branch[0] - per_branch[1])
            if not frozen:
                latent = _euler(latent, velocity, sigmas[step + 1] - sigmas[step])
    return predictions


def _redraw_zero_parameters(model: torch.nn.Module) -> None:
    """Give parameters that are initialised to exactly zero small random values.

    Many DiTs zero-initialise their adaLN gates or output projections so that training starts from
    the identity. A trained checkpoint never has them at zero; with them, a block's residual is
    exactly zero, its relative change between steps is 0/0, and no cache could ever measure one.
    """
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.is_floating_point() and parameter.numel() and not parameter.any():
                parameter.normal_(0.0, 0.02)


def _batch_size(latent: Any) -> int:
    if isinstance(latent, (list, tuple)):
        return len(latent)
    return latent.shape[0]


def _first_tensor(output: Any) -> torch.Tensor:
    """The prediction in a model output: the first tensor, looking inside outputs, tuples and lists."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    if isinstance(output, (tuple, list)):
        for item in output:
            if item is not None:
                return _first_tensor(item)
    raise TypeError(f"no tensor in the model output ({type(output).__name__})")


def _euler(latent: Any, velocity: torch.Tensor, dt: float) -> Any:
    """One Euler step when the prediction has the latent's shape; otherwise the latent is kept."""
    if isinstance(latent, list):
        if len(latent) == 1 and velocity.shape == latent[0].shape:
            return [latent[0] + dt * velocity]
        return latent
    if velocity.shape == latent.shape:
        return latent + dt * velocity.to(latent.dtype)
    return latent


# ---------------------------------------------------------------------------
# Helpers for the inputs
# ---------------------------------------------------------------------------


def _r(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator)


def _ones(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.ones(*shape, dtype=dtype)


def _grid_ids(height: int, width: int, axes: int = 3) -> torch.Tensor:
    """(h*w, axes) position ids of an image grid, Flux style: (0, row, col)."""
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    ids = torch.zeros(height * width, axes)
    ids[:, axes - 2], ids[:, axes - 1] = rows.float(), cols.float()
    return ids


# ---------------------------------------------------------------------------
# The families (tiny configs: hidden 16-48, 3-4 blocks, a few dozen tokens)
# ---------------------------------------------------------------------------

FAMILIES: tuple[Family, ...] = ()
"""Filled in below, one entry per family, sorted by name."""

_FAMILIES: list[Family] = []


def _family(**fields: Any) -> None:
    _FAMILIES.append(Family(**fields))


# -- image, flow-matching, MMDiT / Flux style ---------------------------------------------------


def _flux_like(g: torch.Generator, channels: int = 4, text_dim: int = 32, pooled: int | None = None,
               guidance: float | None = None, id_axes: int = 3, batched_ids: bool = False) -> dict[str, Any]:
    img_ids, txt_ids = _grid_ids(4, 4, id_axes), torch.zeros(8, id_axes)
    if id_axes == 4:
        txt_ids[:, 3] = torch.arange(8).float()
    if batched_ids:
        img_ids, txt_ids = img_ids[None], txt_ids[None]
    kwargs = dict(hidden_states=_r(g, 1, 16, channels), encoder_hidden_states=_r(g, 1, 8, text_dim),
                  img_ids=img_ids, txt_ids=txt_ids)
    if pooled is not None:
        kwargs["pooled_projections"] = _r(g, 1, pooled)
    if guidance is not None:
        kwargs["guidance"] = torch.tensor([guidance])
    return kwargs


_family(
    name="flux", model_class="FluxTransformer2DModel",
    config=dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                axes_dims_rope=(4, 6, 6)),
    inputs=lambda g: _flux_like(g, pooled=32, guidance=3.5), timestep_scale=1.0,
)
_family(
    name="flux2", model_class="Flux2Transformer2DModel",
    config=dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=32,
                axes_dims_rope=(4, 4, 4, 4)),
    inputs=lambda g: _flux_like(g, guidance=4.0, id_axes=4, batched_ids=True), timestep_scale=1.0,
)
_family(
    name="chroma", model_class="ChromaTransformer2DModel",
    config=dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8), approximator_num_channels=8,
                approximator_hidden_dim=16, approximator_layers=1),
    inputs=lambda g: _flux_like(g), timestep_scale=1.0,
)
_family(
    name="bria", model_class="BriaTransformer2DModel",
    config=dict(patch_size=1, in_channels=4, num_layers=3, num_single_layers=1, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=None, axes_dims_rope=(0, 4, 4)),
    inputs=lambda g: _flux_like(g), timestep_scale=1.0,
)


def _bria_fibo_inputs(g: torch.Generator) -> dict[str, Any]:
    kwargs = _flux_like(g, channels=8, text_dim=64)
    text = kwargs["encoder_hidden_states"][:, :, :32]
    kwargs["text_encoder_layers"] = [text] * 4
    return kwargs


_family(
    name="bria-fibo", model_class="BriaFiboTransformer2DModel",
    config=dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=64, text_encoder_dim=32, pooled_projection_dim=None,
                axes_dims_rope=(0, 4, 4)),
    inputs=_bria_fibo_inputs, timestep_scale=1.0,
)
_family(
    name="longcat-image", model_class="LongCatImageTransformer2DModel",
    config=dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8)),
    inputs=lambda g: _flux_like(g, guidance=3.5), timestep_scale=1.0,
)
_family(
    name="ovis-image", model_class="OvisImageTransformer2DModel",
    config=dict(patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8)),
    inputs=lambda g: _flux_like(g), timestep_scale=1.0,
)
_family(
    name="sd3", model_class="SD3Transformer2DModel",
    config=dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
                joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
                pos_embed_max_size=8),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 4, 8, 8), encoder_hidden_states=_r(g, 1, 8, 16),
                          pooled_projections=_r(g, 1, 16)),
)
_family(
    name="auraflow", model_class="AuraFlowTransformer2DModel",
    config=dict(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=2, num_single_dit_layers=2,
                attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
                out_channels=4, pos_embed_max_size=64),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 4, 8, 8), encoder_hidden_states=_r(g, 1, 8, 16)),
)
_family(
    name="hidream-image", model_class="HiDreamImageTransformer2DModel",
    config=dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
                num_attention_heads=2, caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=2,
                num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(16, 16),
                llama_layers=(0, 1, 2, 3), force_inference_output=True),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 4, 8, 8), encoder_hidden_states_t5=_r(g, 1, 8, 8),
                          encoder_hidden_states_llama3=_r(g, 4, 1, 8, 4), pooled_embeds=_r(g, 1, 8)),
    timestep="timesteps",
)
_family(
    name="qwenimage", model_class="QwenImageTransformer2DModel",
    config=dict(patch_size=2, in_channels=16, out_channels=4, num_layers=3, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6)),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 16, 16), encoder_hidden_states=_r(g, 1, 8, 32),
                          encoder_hidden_states_mask=_ones(1, 8), img_shapes=[(1, 4, 4)]),
    timestep_scale=1.0,
)


def _qwenimage21_inputs(g: torch.Generator) -> dict[str, Any]:
    text_tokens, image_tokens = 8, 16  # one vision-language slot per 2x2 latent tokens
    img_mask = torch.zeros(1, text_tokens + image_tokens // 4, dtype=torch.bool)
    img_mask[:, text_tokens:] = True
    return dict(hidden_states=_r(g, 1, image_tokens, 16), encoder_hidden_states=_r(g, 1, text_tokens, 32),
                img_shapes=[[(1, 4, 4)]], img_mask=img_mask)


_family(
    name="qwenimage21", model_class="QwenImage21Transformer2DModel",
    config=dict(patch_size=1, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=16,
                num_attention_heads=2, context_in_dim=32, mlp_ratio=2, axes_dims_rope=(4, 6, 6)),
    inputs=_qwenimage21_inputs, timestep_scale=1.0,
)
_family(
    name="nucleusmoe-image", model_class="NucleusMoEImageTransformer2DModel",
    config=dict(patch_size=2, in_channels=16, out_channels=4, num_layers=3, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4), moe_enabled=False,
                capacity_factors=[8.0, 8.0, 8.0]),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 16, 16), encoder_hidden_states=_r(g, 1, 8, 16),
                          encoder_hidden_states_mask=_ones(1, 8, dtype=torch.long), img_shapes=[(1, 4, 4)]),
    timestep_scale=1.0,
)
_family(
    name="prx", model_class="PRXTransformer2DModel",
    config=dict(in_channels=4, patch_size=2, context_in_dim=16, hidden_size=32, mlp_ratio=2.0, num_heads=2, depth=3,
                axes_dim=[8, 8], theta=10_000),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 4, 8, 8), encoder_hidden_states=_r(g, 1, 8, 16)),
    timestep_scale=1.0,
)
_family(
    name="ernie-image", model_class="ErnieImageTransformer2DModel",
    config=dict(hidden_size=16, num_attention_heads=1, num_layers=3, ffn_hidden_size=16, in_channels=16,
                out_channels=16, patch_size=1, text_in_dim=16, rope_theta=256, rope_axes_dim=(8, 4, 4), eps=1e-6,
                qk_layernorm=True),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 16, 4, 4), text_bth=_r(g, 1, 8, 16), text_lens=torch.tensor([8])),
)


# -- image, CogView / GLM / Lumina / Z-Image / Sana / PixArt / DiT ------------------------------

def _cogview_inputs(g: torch.Generator, text_dim: int = 8) -> dict[str, Any]:
    size = torch.tensor([[64.0, 64.0]])
    return dict(hidden_states=_r(g, 1, 4, 8, 8), encoder_hidden_states=_r(g, 1, 8, text_dim), original_size=size,
                target_size=size, crop_coords=torch.zeros(1, 2))


_family(
    name="cogview3plus", model_class="CogView3PlusTransformer2DModel",
    config=dict(patch_size=2, in_channels=4, num_layers=3, attention_head_dim=4, num_attention_heads=2, out_channels=4,
                text_embed_dim=8, time_embed_dim=8, condition_dim=2, pos_embed_max_size=8, sample_size=8),
    inputs=_cogview_inputs,
)
_family(
    name="cogview4", model_class="CogView4Transformer2DModel",
    config=dict(patch_size=2, in_channels=4, num_layers=3, attention_head_dim=4, num_attention_heads=4, out_channels=4,
                text_embed_dim=8, time_embed_dim=8, condition_dim=4),
    inputs=_cogview_inputs,
)


def _glm_inputs(g: torch.Generator) -> dict[str, Any]:
    return dict(hidden_states=_r(g, 1, 4, 8, 8), encoder_hidden_states=_r(g, 1, 8, 32),
                prior_token_id=torch.randint(0, 64, (1,), generator=g),
                prior_token_drop=torch.zeros(1, dtype=torch.bool),
                target_size=torch.tensor([[8.0, 8.0]]), crop_coords=torch.zeros(1, 2))


_family(
    name="glm-image", model_class="GlmImageTransformer2DModel",
    config=dict(patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
                text_embed_dim=32, time_embed_dim=16, condition_dim=8, prior_vq_quantizer_codebook_size=64),
    inputs=_glm_inputs,
)
_family(
    name="lumina-next", model_class="LuminaNextDiT2DModel",
    config=dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=24, num_layers=3, num_attention_heads=3,
                num_kv_heads=1, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5, learn_sigma=False, qk_norm=True,
                cross_attention_dim=32, scaling_factor=1.0),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 4, 8, 8), encoder_hidden_states=_r(g, 1, 8, 32),
                          encoder_mask=_ones(1, 8), image_rotary_emb=_r(g, 16, 16, 4), cross_attention_kwargs={}),
    timestep_scale=1.0,
)
_family(
    name="lumina2", model_class="Lumina2Transformer2DModel",
    config=dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=24, num_layers=2, num_refiner_layers=1,
                num_attention_heads=3, num_kv_heads=1, multiple_of=2, ffn_dim_multiplier=None, norm_eps=1e-5,
                scaling_factor=1.0, axes_dim_rope=(4, 2, 2), axes_lens=(64, 64, 64), cap_feat_dim=32),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 4, 8, 8), encoder_hidden_states=_r(g, 1, 8, 32),
                          encoder_attention_mask=_ones(1, 8, dtype=torch.bool)),
    timestep_scale=1.0,
)
_family(
    name="z-image", model_class="ZImageTransformer2DModel",
    config=dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
                n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
                axes_dims=[8, 4, 4], axes_lens=[64, 32, 32]),
    inputs=lambda g: dict(x=[_r(g, 4, 1, 8, 8)], cap_feats=[_r(g, 8, 16)]),
    latent="x", timestep="t", timestep_scale=1.0,
)
_family(
    name="sana", model_class="SanaTransformer2DModel",
    config=dict(patch_size=1, in_channels=4, out_channels=4, num_layers=3, num_attention_heads=2, attention_head_dim=4,
                num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
                sample_size=8),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 4, 8, 8), encoder_hidden_states=_r(g, 1, 8, 8)),
)
_family(
    name="pixart", model_class="PixArtTransformer2DModel",
    config=dict(sample_size=8, num_layers=3, patch_size=2, attention_head_dim=4, num_attention_heads=2, in_channels=4,
                cross_attention_dim=8, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
                num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                use_additional_conditions=False, caption_channels=8),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 4, 8, 8), encoder_hidden_states=_r(g, 1, 8, 8),
                          added_cond_kwargs={"aspect_ratio": None, "resolution": None}),
)
_family(
    name="dit", model_class="DiTTransformer2DModel",
    config=dict(in_channels=4, out_channels=8, activation_fn="gelu-approximate", num_attention_heads=2,
                attention_head_dim=8, attention_bias=True, num_layers=3, norm_type="ada_norm_zero",
                num_embeds_ada_norm=8, patch_size=2, sample_size=8),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 4, 8, 8), class_labels=torch.randint(0, 8, (1,), generator=g)),
)
_family(
    name="transformer-2d", model_class="Transformer2DModel",
    config=dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3,
                sample_size=8, patch_size=2, norm_type="ada_norm_zero", num_embeds_ada_norm=8,
                activation_fn="gelu-approximate", attention_bias=True),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 4, 8, 8), class_labels=torch.randint(0, 8, (1,), generator=g)),
    note="the patched (DiT-style) configuration of the generic Transformer2DModel",
)
_family(
    name="hunyuandit", model_class="HunyuanDiT2DModel",
    config=dict(sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=2,
                cross_attention_dim=8, cross_attention_dim_t5=8, pooled_projection_dim=4, hidden_size=16, text_len=4,
                text_len_t5=4, activation_fn="gelu-approximate"),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 4, 8, 8), encoder_hidden_states=_r(g, 1, 4, 8),
                          text_embedding_mask=_ones(1, 4), encoder_hidden_states_t5=_r(g, 1, 4, 8),
                          text_embedding_mask_t5=_ones(1, 4),
                          image_meta_size=torch.tensor([[1024.0, 1024.0, 16.0, 16.0, 0.0, 0.0]]),
                          style=torch.zeros(1, dtype=torch.long),
                          image_rotary_emb=[torch.ones(16, 8), torch.zeros(16, 8)]),
)
_family(
    name="omnigen", model_class="OmniGenTransformer2DModel",
    config=dict(hidden_size=16, num_attention_heads=4, num_key_value_heads=4, intermediate_size=32, num_layers=3,
                pad_token_id=0, vocab_size=100, in_channels=4, time_step_dim=4,
                rope_scaling={"long_factor": [1, 2], "short_factor": [1, 2]}),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 4, 8, 8), input_ids=torch.randint(1, 100, (1, 8), generator=g),
                          input_img_latents=[], input_image_sizes={},
                          attention_mask=_ones(1, 8 + 1 + 16, 8 + 1 + 16),
                          position_ids=torch.arange(8 + 1 + 16)[None]),
    timestep_scale=1.0,
)
_family(
    name="prior", model_class="PriorTransformer",
    config=dict(num_attention_heads=2, attention_head_dim=4, num_layers=3, embedding_dim=8, num_embeddings=7,
                additional_embeddings=4),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 8), proj_embedding=_r(g, 1, 8), encoder_hidden_states=_r(g, 1, 7, 8)),
    note="unCLIP / Kandinsky 2 prior: a diffusion transformer over CLIP image embeddings",
)


# -- video: Wan family ----------------------------------------------------------------------------

_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=32, ffn_dim=32, num_layers=3, cross_attn_norm=True, rope_max_seq_len=32)


def _wan_inputs(g: torch.Generator, channels: int = 4, **extra: Any) -> dict[str, Any]:
    return dict(hidden_states=_r(g, 1, channels, 2, 8, 8), encoder_hidden_states=_r(g, 1, 8, 16), **extra)


_family(name="wan", model_class="WanTransformer3DModel", config=dict(_WAN, qk_norm="rms_norm_across_heads"),
        inputs=_wan_inputs)
_family(name="skyreels-v2", model_class="SkyReelsV2Transformer3DModel",
        config=dict(_WAN, qk_norm="rms_norm_across_heads"), inputs=_wan_inputs)
_family(name="chronoedit", model_class="ChronoEditTransformer3DModel",
        config=dict(_WAN, qk_norm="rms_norm_across_heads", rope_temporal_skip_len=8), inputs=_wan_inputs)
_family(
    name="wan-vace", model_class="WanVACETransformer3DModel",
    config=dict(_WAN, num_layers=4, qk_norm="rms_norm_across_heads", vace_layers=[0, 2], vace_in_channels=12),
    inputs=lambda g: _wan_inputs(g, control_hidden_states=_r(g, 1, 12, 2, 8, 8)),
)


def _anyflow_timestep(kwargs: dict[str, Any], sigma: float) -> None:
    frames = kwargs["hidden_states"].shape[1]
    kwargs["timestep"] = torch.full((1, frames), sigma * 1000.0)
    kwargs["r_timestep"] = torch.full((1, frames), sigma * 500.0)


_family(
    name="anyflow", model_class="AnyFlowTransformer3DModel",
    config=dict(_WAN, gate_value=0.25, deltatime_type="r"),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 2, 4, 8, 8), encoder_hidden_states=_r(g, 1, 8, 16)),
    timestep=_anyflow_timestep,
)
_family(
    name="anyflow-far", model_class="AnyFlowFARTransformer3DModel",
    config=dict(_WAN, compressed_patch_size=(1, 4, 4), full_chunk_limit=3, gate_value=0.25, deltatime_type="r"),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 2, 4, 4, 4), encoder_hidden_states=_r(g, 1, 8, 16),
                          chunk_partition=[1, 1]),
    timestep=_anyflow_timestep,
)


def _helios_inputs(g: torch.Generator) -> dict[str, Any]:
    frames = 2
    return dict(hidden_states=_r(g, 1, 4, frames, 8, 8), encoder_hidden_states=_r(g, 1, 8, 16),
                indices_hidden_states=_ones(1, frames), indices_latents_history_short=_ones(1, frames - 1),
                indices_latents_history_mid=_ones(1, frames - 1),
                indices_latents_history_long=_ones(1, 4 * (frames - 1)),
                latents_history_short=_r(g, 1, 4, frames - 1, 8, 8), latents_history_mid=_r(g, 1, 4, frames - 1, 8, 8),
                latents_history_long=_r(g, 1, 4, 4 * (frames - 1), 8, 8))


_family(
    name="helios", model_class="HeliosTransformer3DModel",
    config=dict({k: v for k, v in _WAN.items() if k != "rope_max_seq_len"}, freq_dim=256,
                qk_norm="rms_norm_across_heads", rope_dim=(4, 4, 4),
                has_multi_term_memory_patch=True, guidance_cross_attn=True, zero_history_timestep=True,
                is_amplify_history=False),
    inputs=_helios_inputs,
)


# -- video: CogVideoX, Mochi, LTX, Allegro, Latte, EasyAnimate, Cosmos, Sana-Video, HunyuanVideo ----

_family(
    name="cogvideox", model_class="CogVideoXTransformer3DModel",
    config=dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
                text_embed_dim=8, num_layers=3, sample_width=8, sample_height=8, sample_frames=8, patch_size=2,
                temporal_compression_ratio=4, max_text_seq_length=8),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 2, 4, 8, 8), encoder_hidden_states=_r(g, 1, 8, 8)),
)
_family(
    name="consisid", model_class="ConsisIDTransformer3DModel",
    config=dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
                text_embed_dim=8, num_layers=3, sample_width=8, sample_height=8, sample_frames=8, patch_size=2,
                temporal_compression_ratio=4, max_text_seq_length=8, cross_attn_interval=1, is_kps=False,
                is_train_face=True, cross_attn_dim_head=1, cross_attn_num_heads=1, LFE_id_dim=2, LFE_vit_dim=2,
                LFE_depth=5, LFE_dim_head=8, LFE_num_heads=2, LFE_num_id_token=1, LFE_num_querie=1,
                LFE_output_dim=10, LFE_ff_mult=1, LFE_num_scale=1),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 1, 4, 8, 8), encoder_hidden_states=_r(g, 1, 8, 8),
                          id_vit_hidden=[_ones(1, 2, 2)], id_cond=_ones(1, 2)),
)
_family(
    name="mochi", model_class="MochiTransformer3DModel",
    config=dict(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=3, pooled_projection_dim=16,
                in_channels=4, out_channels=None, qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4,
                activation_fn="swiglu", max_sequence_length=16),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 4, 2, 8, 8), encoder_hidden_states=_r(g, 1, 8, 16),
                          encoder_attention_mask=_ones(1, 8, dtype=torch.bool)),
)
_family(
    name="ltx", model_class="LTXVideoTransformer3DModel",
    config=dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                num_layers=3, qk_norm="rms_norm_across_heads", caption_channels=16),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 2 * 4 * 4, 4), encoder_hidden_states=_r(g, 1, 8, 16),
                          encoder_attention_mask=_ones(1, 8, dtype=torch.bool), num_frames=2, height=4, width=4),
)
_family(
    name="ltx2", model_class="LTX2VideoTransformer3DModel",
    config=dict(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2,
                attention_head_dim=8, cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4,
                audio_num_attention_heads=2, audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=3,
                qk_norm="rms_norm_across_heads", caption_channels=16, rope_double_precision=False),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 2 * 4 * 4, 4), audio_hidden_states=_r(g, 1, 5, 4),
                          encoder_hidden_states=_r(g, 1, 8, 16), audio_encoder_hidden_states=_r(g, 1, 8, 16),
                          encoder_attention_mask=_ones(1, 8, dtype=torch.bool), num_frames=2, height=4, width=4,
                          audio_num_frames=5, fps=25.0),
)
_family(
    name="allegro", model_class="AllegroTransformer3DModel",
    config=dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=3,
                cross_attention_dim=16, sample_width=8, sample_height=8, sample_frames=8, caption_channels=8),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 4, 2, 8, 8), encoder_hidden_states=_r(g, 1, 8, 8)),
)
_family(
    name="latte", model_class="LatteTransformer3DModel",
    config=dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=4, num_attention_heads=2,
                caption_channels=8, in_channels=4, cross_attention_dim=8, out_channels=8, attention_bias=True,
                activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                norm_elementwise_affine=False, norm_eps=1e-6, video_length=2),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 4, 2, 8, 8), encoder_hidden_states=_r(g, 1, 8, 8),
                          enable_temporal_attentions=True),
)
_family(
    name="easyanimate", model_class="EasyAnimateTransformer3DModel",
    config=dict(attention_head_dim=16, num_attention_heads=2, in_channels=4, mmdit_layers=3, num_layers=3,
                out_channels=4, patch_size=2, sample_height=60, sample_width=90, text_embed_dim=16, time_embed_dim=8,
                time_position_encoding_type="3d_rope", timestep_activation_fn="silu"),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 4, 2, 8, 8), encoder_hidden_states=_r(g, 1, 8, 16)),
)
_family(
    name="cosmos", model_class="CosmosTransformer3DModel",
    config=dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=3, mlp_ratio=2,
                text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2),
                rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=False, extra_pos_embed_type="learnable"),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 4, 1, 8, 8), encoder_hidden_states=_r(g, 1, 8, 16),
                          attention_mask=_ones(1, 8), fps=30),
    note="Cosmos 1 / Predict2 / Predict2.5 share this transformer class; built with concat_padding_mask=False "
         "because resizing the padding mask needs torchvision, which cannot be installed here",
)
_family(
    name="sana-video", model_class="SanaVideoTransformer3DModel",
    config=dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=3,
                num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=24, caption_channels=16,
                mlp_ratio=2.5, sample_size=8, patch_size=(1, 2, 2), rope_max_seq_len=32),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 4, 2, 8, 8), encoder_hidden_states=_r(g, 1, 8, 16)),
)
_family(
    name="hunyuanvideo", model_class="HunyuanVideoTransformer3DModel",
    config=dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2,
                num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
                text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4)),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 4, 1, 4, 4), encoder_hidden_states=_r(g, 1, 8, 16),
                          pooled_projections=_r(g, 1, 8), encoder_attention_mask=_ones(1, 8),
                          guidance=torch.tensor([6000.0])),
)


def _framepack_inputs(g: torch.Generator) -> dict[str, Any]:
    frames = 3
    return dict(hidden_states=_r(g, 1, 4, frames, 4, 4), encoder_hidden_states=_r(g, 1, 8, 16),
                pooled_projections=_r(g, 1, 8), encoder_attention_mask=_ones(1, 8), guidance=torch.tensor([6000.0]),
                image_embeds=_r(g, 1, 8, 16), indices_latents=_ones(frames),
                latents_clean=_r(g, 1, 4, frames - 1, 4, 4), indices_latents_clean=_ones(frames - 1),
                latents_history_2x=_r(g, 1, 4, frames - 1, 4, 4), indices_latents_history_2x=_ones(frames - 1),
                latents_history_4x=_r(g, 1, 4, 4 * (frames - 1), 4, 4),
                indices_latents_history_4x=_ones(4 * (frames - 1)))


_family(
    name="hunyuanvideo-framepack", model_class="HunyuanVideoFramepackTransformer3DModel",
    config=dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2,
                num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
                text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), image_condition_type=None,
                has_image_proj=True, image_proj_dim=16, has_clean_x_embedder=True),
    inputs=_framepack_inputs,
)
_family(
    name="hunyuanvideo15", model_class="HunyuanVideo15Transformer3DModel",
    config=dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=3,
                num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16,
                text_embed_2_dim=8, image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v"),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 4, 1, 8, 8), encoder_hidden_states=_r(g, 1, 6, 16),
                          encoder_hidden_states_2=_r(g, 1, 4, 8), encoder_attention_mask=_ones(1, 6),
                          encoder_attention_mask_2=_ones(1, 4), image_embeds=torch.zeros(1, 3, 12)),
)
_family(
    name="motif-video", model_class="MotifVideoTransformer3DModel",
    config=dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2,
                num_single_layers=2, num_decoder_layers=0, mlp_ratio=2.0, patch_size=1, patch_size_t=1,
                qk_norm="rms_norm", norm_type="layer_norm", text_embed_dim=16, image_embed_dim=4, rope_theta=256.0,
                rope_axes_dim=(4, 4, 4), enable_text_cross_attention_dual=False,
                enable_text_cross_attention_single=False),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 9, 1, 4, 4), encoder_hidden_states=_r(g, 1, 8, 16)),
)
_family(
    name="joyimage-edit", model_class="JoyImageEditTransformer3DModel",
    config=dict(patch_size=[1, 2, 2], in_channels=16, hidden_size=32, num_attention_heads=2, text_dim=16, num_layers=3,
                rope_dim_list=[4, 6, 6], theta=256),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 16, 1, 4, 4), encoder_hidden_states=_r(g, 1, 8, 16)),
    timestep_scale=1.0,
)
_family(
    name="joyimage-edit-plus", model_class="JoyImageEditPlusTransformer3DModel",
    config=dict(patch_size=[1, 2, 2], in_channels=16, hidden_size=32, num_attention_heads=2, text_dim=16, num_layers=3,
                rope_dim_list=[4, 6, 6], theta=256),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 2, 16, 1, 2, 2), encoder_hidden_states=_r(g, 1, 8, 16),
                          shape_list=[[(1, 1, 1), (1, 1, 1)]]),
    timestep_scale=1.0,
)


# -- audio ----------------------------------------------------------------------------------------


def _ace_step_timestep(kwargs: dict[str, Any], sigma: float) -> None:
    kwargs["timestep"] = kwargs["timestep_r"] = torch.full((1,), sigma)


_family(
    name="ace-step", model_class="AceStepTransformer1DModel",
    config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, in_channels=24, audio_acoustic_hidden_dim=8, patch_size=2, rope_theta=10000.0,
                sliding_window=16),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 8, 8), encoder_hidden_states=_r(g, 1, 8, 32),
                          context_latents=_r(g, 1, 8, 16)),
    timestep=_ace_step_timestep,
)
_family(
    name="longcat-audio-dit", model_class="LongCatAudioDiTTransformer",
    config=dict(dit_dim=32, dit_depth=3, dit_heads=2, dit_text_dim=16, latent_dim=8, text_conv=False),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 16, 8), encoder_hidden_states=_r(g, 1, 8, 16),
                          encoder_attention_mask=_ones(1, 8, dtype=torch.bool),
                          attention_mask=_ones(1, 16, dtype=torch.bool)),
    timestep_scale=1.0,
)
_family(
    name="minimax-music3", model_class="MiniMaxMusic3Transformer1DModel",
    config=dict(in_channels=8, condition_dim=16, num_layers=3, num_attention_heads=2, attention_head_dim=8,
                ff_inner_dim=32, rotary_dim=4, fourier_embedding_dim=8),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 8, 16), encoder_hidden_states=_r(g, 1, 16, 16)),
    timestep_scale=1.0,
)
_family(
    name="stable-audio3", model_class="StableAudio3DiTModel",
    config=dict(io_channels=8, patch_size=1, embed_dim=32, depth=3, num_heads=4, cond_token_dim=16, global_cond_dim=12,
                local_add_cond_dim=5, timestep_features_dim=16, ff_mult=2, num_memory_tokens=3,
                use_differential_attention=False),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 8, 16), encoder_hidden_states=_r(g, 1, 4, 16),
                          global_hidden_states=_r(g, 1, 12)),
    timestep_scale=1.0,
)

# -- families with their own call conventions ---------------------------------------------------

_family(
    name="flux3", model_class="Flux3Transformer2DModel",
    config=dict(in_channels=4, cond_in_channels=4, num_layers=1, num_single_layers=3, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, timestep_channels=32, mlp_ratio=2.0,
                axes_dims_rope=(4, 4, 4, 4)),
    inputs=lambda g: _flux_like(g, id_axes=4),
    timestep_scale=1.0,
)
_family(
    name="bria-fibo2", model_class="BriaFibo2Transformer2DModel",
    config=dict(in_channels=4, patch_size=2, dim=32, n_layers=3, n_refiner_layers=1, n_heads=2, cap_feat_dim=16,
                injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=4, max_num_gist_tokens=8,
                gist_step=4, gist_min_text_len=4, gist_max_text_len=16, axes_dims=(8, 4, 4), axes_lens=(64, 32, 32)),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 4, 8, 8), encoder_hidden_states=_r(g, 1, 2, 8, 16)),
    timestep_scale=1.0,
)
_family(
    name="kandinsky5", model_class="Kandinsky5Transformer3DModel",
    config=dict(in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
                model_dim=48, ff_dim=64, num_text_blocks=1, num_visual_blocks=3, axes_dims=(4, 4, 4)),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 2, 4, 4, 4), encoder_hidden_states=_r(g, 1, 8, 16),
                          pooled_projections=_r(g, 1, 8),
                          visual_rope_pos=[torch.arange(2), torch.arange(2), torch.arange(2)],
                          text_rope_pos=torch.arange(8)),
)
_family(
    name="kandinsky6", model_class="Kandinsky6Transformer3DModel",
    config=dict(in_visual_dim=4, out_visual_dim=4, in_text_dim=8, in_text_dim2=8, time_dim=16, patch_size=(1, 2, 2),
                model_dim=48, ff_dim=64, num_text_blocks=1, num_visual_blocks=3, axes_dims=(4, 4, 4),
                visual_cond=False, in_audio_dim=4, out_audio_dim=4),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 2, 4, 4, 4), encoder_hidden_states=_r(g, 1, 8, 8),
                          pooled_projections=_r(g, 1, 8)),
    note="fused video/audio blocks: the audio stream is declared as the second stream (None without audio)",
)
_family(
    name="kandinsky6-sr", model_class="Kandinsky6SRTransformer3DModel",
    config=dict(in_visual_dim=4, out_visual_dim=4, time_dim=16, patch_size=(1, 1, 1), model_dim=48, ff_dim=64,
                num_visual_blocks=3, axes_dims=(4, 4, 4)),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 1, 8, 8, 9)),
    note="super-resolution stage of Kandinsky 6",
)
_family(
    name="hunyuanimage", model_class="HunyuanImageTransformer2DModel",
    config=dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                num_single_layers=2, num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=16, rope_axes_dim=(4, 4)),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 4, 4, 4), encoder_hidden_states=_r(g, 1, 8, 16),
                          encoder_attention_mask=_ones(1, 8)),
)


def _ideogram4_inputs(g: torch.Generator) -> dict[str, Any]:
    from diffusers.models.transformers.transformer_ideogram4 import (
        IMAGE_POSITION_OFFSET,
        LLM_TOKEN_INDICATOR,
        OUTPUT_IMAGE_INDICATOR,
    )

    text, image = 4, 4
    hidden = torch.zeros(1, text + image, 16)
    hidden[:, text:] = _r(g, 1, image, 16)
    encoder = torch.zeros(1, text + image, 24)
    encoder[:, :text] = _r(g, 1, text, 24)
    position_ids = torch.zeros(1, text + image, 3, dtype=torch.long)
    position_ids[:, :text] = torch.arange(text)[:, None]
    position_ids[:, text:, 0] = IMAGE_POSITION_OFFSET
    position_ids[:, text:, 1] = torch.tensor([0, 0, 1, 1]) + IMAGE_POSITION_OFFSET
    position_ids[:, text:, 2] = torch.tensor([0, 1, 0, 1]) + IMAGE_POSITION_OFFSET
    indicator = torch.full((1, text + image), OUTPUT_IMAGE_INDICATOR, dtype=torch.long)
    indicator[:, :text] = LLM_TOKEN_INDICATOR
    return dict(hidden_states=hidden, encoder_hidden_states=encoder, position_ids=position_ids,
                segment_ids=torch.ones(1, text + image, dtype=torch.long), indicator=indicator)


_family(
    name="ideogram4", model_class="Ideogram4Transformer2DModel",
    config=dict(in_channels=16, num_layers=3, attention_head_dim=8, num_attention_heads=4, intermediate_size=32,
                adaln_dim=16, llm_features_dim=24, rope_theta=10_000, mrope_section=(2, 1, 1), norm_eps=1e-5),
    inputs=_ideogram4_inputs, timestep_scale=1.0,
)


def _krea2_inputs(g: torch.Generator) -> dict[str, Any]:
    text, grid = 4, 2
    position_ids = torch.zeros(text + grid * grid, 3)
    position_ids[text:, 1] = torch.arange(grid).repeat_interleave(grid).float()
    position_ids[text:, 2] = torch.arange(grid).repeat(grid).float()
    return dict(hidden_states=_r(g, 1, grid * grid, 16), encoder_hidden_states=_r(g, 1, text, 3, 16),
                position_ids=position_ids, encoder_attention_mask=_ones(1, text, dtype=torch.bool))


_family(
    name="krea2", model_class="Krea2Transformer2DModel",
    config=dict(in_channels=16, num_layers=3, attention_head_dim=8, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=32, timestep_embed_dim=8, text_hidden_dim=16, num_text_layers=3,
                text_num_attention_heads=2, text_num_key_value_heads=1, text_intermediate_size=16,
                num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 2, 2), rope_theta=1000.0,
                norm_eps=1e-5),
    inputs=_krea2_inputs, timestep_scale=1.0,
)


def _minimax_h3_inputs(g: torch.Generator) -> dict[str, Any]:
    text, audio, video = 4, 6, 8
    length = text + audio + video
    text_indices, audio_indices = torch.arange(text), torch.arange(text, text + audio)
    video_indices = torch.arange(text + audio, length)
    tags = torch.zeros(length, dtype=torch.long)
    tags[text_indices], tags[audio_indices] = 1, 2
    timestep_indices = torch.zeros(length, dtype=torch.long)
    timestep_indices[audio_indices] = 1
    position_ids = torch.zeros(length, 3)
    position_ids[:, 0] = torch.arange(length).float()
    position_ids[video_indices, 1] = (torch.arange(video) % 4).float()
    position_ids[video_indices, 2] = (torch.arange(video) % 2).float()
    return dict(hidden_states=_r(g, 1, video, 16), audio_hidden_states=_r(g, 1, audio, 6),
                encoder_hidden_states=_r(g, 1, text, 8), timestep_indices=timestep_indices, token_tags=tags,
                position_ids=position_ids, video_indices=video_indices, audio_indices=audio_indices,
                text_indices=text_indices)


def _minimax_h3_timestep(kwargs: dict[str, Any], sigma: float) -> None:
    kwargs["timestep"] = torch.tensor([sigma, sigma])  # video and audio noise levels


_family(
    name="minimax-h3", model_class="MiniMaxH3Transformer3DModel",
    config=dict(num_attention_heads=2, attention_head_dim=16, hidden_size=24, num_layers=3, num_refiner_layers=1,
                ffn_dim=32, in_channels=4, audio_in_channels=6, patch_size=(1, 2, 2), text_dim=8, freq_dim=8,
                time_embed_hidden_dim=24, time_embed_dim=16, rope_freq_dim=2),
    inputs=_minimax_h3_inputs, timestep=_minimax_h3_timestep,
)


def _cosmos3_inputs(g: torch.Generator) -> dict[str, Any]:
    text, patches = 6, 16  # a (1, 4, 1, 8, 8) latent in 2x2 patches
    vision = torch.arange(text, text + patches)
    return dict(input_ids=torch.randint(0, 64, (text,), generator=g), text_indexes=torch.arange(text),
                position_ids=torch.arange(text + patches).repeat(3, 1), und_len=text,
                sequence_length=text + patches, vision_tokens=[_r(g, 1, 4, 1, 8, 8)], vision_token_shapes=[(1, 4, 4)],
                vision_sequence_indexes=vision, vision_mse_loss_indexes=vision,
                vision_noisy_frame_indexes=[torch.tensor([0])])


def _cosmos3_timestep(kwargs: dict[str, Any], sigma: float) -> None:
    kwargs["vision_timesteps"] = torch.full((kwargs["vision_sequence_indexes"].numel(),), sigma * 1000.0)


_family(
    name="cosmos3", model_class="Cosmos3OmniTransformer",
    config=dict(head_dim=16, hidden_size=32, intermediate_size=64, latent_channel=4, latent_patch_size=2,
                num_attention_heads=2, num_hidden_layers=3, num_key_value_heads=1, patch_latent_dim=16, vocab_size=64,
                rope_axes_dim=(4, 2, 2)),
    inputs=_cosmos3_inputs, latent="vision_tokens", timestep=_cosmos3_timestep,
)
_family(
    name="stable-audio", model_class="StableAudioDiTModel",
    config=dict(sample_size=16, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
                num_key_value_attention_heads=1, out_channels=4, cross_attention_dim=16, time_proj_dim=16,
                global_states_input_dim=16, cross_attention_input_dim=16),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 4, 16), encoder_hidden_states=_r(g, 1, 8, 16),
                          global_hidden_states=_r(g, 1, 1, 16)),
    timestep_scale=1.0,
)
_family(
    name="t5-film", model_class="T5FilmDecoder",
    config=dict(input_dims=8, targets_length=16, d_model=32, num_layers=3, num_heads=2, d_kv=16, d_ff=64,
                dropout_rate=0.0),
    inputs=lambda g: dict(encodings_and_masks=[(_r(g, 1, 8, 32), _ones(1, 8, dtype=torch.bool))],
                          decoder_input_tokens=_r(g, 1, 16, 8)),
    latent="decoder_input_tokens", timestep="decoder_noise_time", timestep_scale=1.0,
    note="spectrogram diffusion decoder (T5 with FiLM conditioning)",
)


_family(
    name="wan-animate", model_class="WanAnimateTransformer3DModel",
    config=dict(_WAN, num_layers=4, in_channels=12, latent_channels=4, qk_norm="rms_norm_across_heads", image_dim=16,
                motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16}, motion_encoder_size=16,
                motion_style_dim=8, motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16,
                face_encoder_num_heads=2, inject_face_latents_blocks=2),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 12, 2, 8, 8), encoder_hidden_states=_r(g, 1, 8, 16),
                          encoder_hidden_states_image=_r(g, 1, 4, 16), pose_hidden_states=_r(g, 1, 4, 1, 8, 8),
                          face_pixel_values=_r(g, 1, 3, 1, 16, 16)),
)


def _sana_wm_inputs(g: torch.Generator) -> dict[str, Any]:
    frames = 2
    c2w = torch.eye(4).repeat(1, frames, 1, 1)
    c2w[..., 2, 3] = torch.arange(frames, dtype=torch.float32) * 0.1
    intrinsics = torch.tensor([4.0, 4.0, 2.0, 2.0]).expand(1, frames, 4)
    return dict(hidden_states=_r(g, 1, 4, frames, 4, 4), encoder_hidden_states=_r(g, 1, 1, 8, 8),
                encoder_attention_mask=_ones(1, 8, dtype=torch.long),
                camera_conditions=torch.cat([c2w.flatten(start_dim=-2), intrinsics], dim=-1),
                chunk_plucker=_r(g, 1, 8, frames, 4, 4))


def _sana_wm_timestep(kwargs: dict[str, Any], sigma: float) -> None:
    kwargs["timestep"] = torch.full((1, 1, kwargs["hidden_states"].shape[2]), sigma * 1000.0)


_family(
    name="sana-wm", model_class="SanaWMTransformer3DModel",
    config=dict(in_channels=4, num_layers=3, hidden_size=32, num_attention_heads=2, patch_size=(1, 1, 1),
                softmax_every_n=2, linear_head_dim=16, t_kernel_size=3, conv_kernel_size=4, caption_channels=8,
                mlp_ratio=2.0, chunk_plucker_channels=8, chunk_plucker_post_attn_blocks=3),
    inputs=_sana_wm_inputs, timestep=_sana_wm_timestep,
    note="camera-controlled world model (UCPE camera conditions and Plucker rays)",
)


_family(
    name="sana-wm-refiner", model_class="SanaWMLTX2RefinerTransformer3DModel",
    config=dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=4,
                audio_cross_attention_dim=8, num_layers=3, caption_channels=16, rope_double_precision=False),
    inputs=lambda g: dict(hidden_states=_r(g, 1, 2 * 4 * 4, 4), encoder_hidden_states=_r(g, 1, 8, 16)),
    timestep=lambda kwargs, sigma: kwargs.__setitem__("timestep", torch.full(kwargs["hidden_states"].shape[:2],
                                                                              sigma * 1000.0)),
    model_inputs=lambda model: dict(video_rotary_emb=model.build_rotary_emb_for_absolute_positions(
        1, [0, 1], 4, 4, torch.device("cpu"), 24.0)),
    note="SANA-WM's LTX-2 refiner, called without its sliding-window KV cache (kv_cache_mode=None)",
)

FAMILIES = tuple(sorted(_FAMILIES, key=lambda f: f.name))

NOT_BUILT: tuple[Unlisted, ...] = (
    Unlisted("RFD4ProteinaTransformer",
             "protein-structure denoiser: every call needs the featurized topology and conditioning dict "
             "(token types, bond graph, chirality frames, molecule ids, ... about 20 tensors) that the "
             "RFD4-Proteina pipeline builds with AtomWorks, which is not installed here"),
    Unlisted("WanAnimate2Transformer3DModel",
             "each denoising loop must first run a reference pass (kv_cache_mode='extract') that fills a "
             "KV cache the generation calls read through flex attention; no diffusers pipeline drives this "
             "model, so there is no loop to reproduce"),
)
"""DiT classes that are not in the matrix because they cannot be built or driven offline here."""

NOT_DIT: tuple[Unlisted, ...] = (
    Unlisted("DreamLiteTransformer2DModel", "a spatial transformer layer inside DreamLite's UNet, not a denoiser"),
    Unlisted("DualTransformer2DModel", "two Transformer2DModel layers mixed inside Versatile Diffusion's UNet"),
    Unlisted("MiniMaxMusic3RVQDepthDecoder",
             "an autoregressive RVQ depth decoder (no timestep): not a diffusion model"),
    Unlisted("TransformerTemporalModel", "temporal attention layers inside video UNets, not a denoiser"),
)
"""Classes exported from ``diffusers.models.transformers`` that are not a DiT denoiser."""


def family(name: str) -> Family:
    for candidate in FAMILIES:
        if candidate.name == name:
            return candidate
    raise ValueError(f"unknown family {name!r}; expected one of {[f.name for f in FAMILIES]}")


def exported_transformer_classes() -> list[str]:
    """Every model class ``diffusers.models.transformers`` exports."""
    import diffusers.models.transformers as transformers

    return sorted(name for name in dir(transformers) if not name.startswith("_")
                  and isinstance(getattr(transformers, name), type)
                  and issubclass(getattr(transformers, name), torch.nn.Module))


def unlisted_classes() -> list[str]:
    """Exported classes that are neither a family nor classified in NOT_BUILT / NOT_DIT."""
    known = {f.model_class for f in FAMILIES} | {u.model_class for u in (*NOT_BUILT, *NOT_DIT)}
    return [name for name in exported_transformer_classes() if name not in known]


# ---------------------------------------------------------------------------
# The matrix
# ---------------------------------------------------------------------------

HIT_SETTINGS: dict[tuple[str, str], dict[str, Any]] = {
    ("native", "fbcache"): dict(threshold=10.0, warmup_steps=1),
    ("native", "dbcache"): dict(threshold=10.0, warmup_steps=1, front_blocks=1, back_blocks=1),
    ("native", "taylorseer"): dict(warmup_steps=1, cache_interval=2, taylorseer_order=1),
    ("diffusers", "fbcache"): dict(threshold=10.0, warmup_steps=1),
    ("diffusers", "pab"): dict(options={"spatial_attention_timestep_skip_range": [-1, 1001]}),
    ("diffusers", "fastercache"): dict(options={"spatial_attention_timestep_skip_range": [-1, 1001]}),
    ("diffusers", "taylorseer"): dict(warmup_steps=1, cache_interval=2),
    ("diffusers", "magcache"): dict(threshold=10.0, warmup_steps=1, options={"mag_ratios": [1.0] * STEPS}),
    ("native", "magcache"): dict(threshold=10.0, warmup_steps=1, options={"mag_ratios": [1.0] * STEPS}),
    ("cache_dit", "fbcache"): dict(threshold=0.95, warmup_steps=1),
    ("cache_dit", "dbcache"): dict(threshold=0.95, warmup_steps=1, front_blocks=1, back_blocks=1),
}
"""Settings that make a random-weight model hit the cache within ``STEPS`` steps (random weights
show little step-to-step redundancy), where they differ from the strategy's declared ``hit_settings``
(used otherwise). MagCache gets flat ratios: it needs calibrated ones per model.
Cache-DiT stays below threshold 1, where it would cache without measuring."""

SERVED, REFUSED, FAILED = "served", "refused", "failed"


@dataclass(frozen=True)
class Cell:
    """The outcome of one family x backend x strategy."""

    family: str
    backend: str
    strategy: str
    status: str
    reason: str = ""
    steps_cached: int = 0
    steps_total: int = 0
    short_reason: str = ""  # refusals: the setting refused and what is allowed, without the model's name


@dataclass
class Matrix:
    combos: list[tuple[str, str]]
    cells: list[Cell] = field(default_factory=list)
    unbuildable: list[Unlisted] = field(default_factory=list)  # families that raised when built or called

    def cell(self, family: str, backend: str, strategy: str) -> Cell:
        for cell in self.cells:
            if (cell.family, cell.backend, cell.strategy) == (family, backend, strategy):
                return cell
        raise KeyError((family, backend, strategy))


def served_combinations() -> list[tuple[str, str]]:
    """(backend, strategy) pairs this installation offers, in registry order."""
    from phyai_cache import list_backends

    return [(report.name, strategy) for report in list_backends() if report.installed
            for strategy in report.available_strategies]


def run_matrix(families: Sequence[Family] = None, combos: Sequence[tuple[str, str]] = None) -> Matrix:
    """Run every combination on every family, one thread (decisions must not depend on threading)."""
    families = FAMILIES if families is None else families
    matrix = Matrix(list(served_combinations() if combos is None else combos))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _quiet_logs():
            for fam in families:
                try:
                    cells = run_family(fam, matrix.combos)
                except _Unbuildable as error:
                    matrix.unbuildable.append(Unlisted(fam.model_class, str(error)))
                    continue
                matrix.cells.extend(cells)
    finally:
        torch.set_num_threads(threads)
    return matrix


class _Unbuildable(Exception):
    pass


def run_family(fam: Family, combos: Sequence[tuple[str, str]]) -> list[Cell]:
    try:
        transformer = fam.build()
        reference = denoise(fam, transformer)
    except Exception as error:  # the family itself does not run here: not a cache result
        raise _Unbuildable(f"{type(error).__name__}: {_clean(str(error))}") from error
    if not all(bool(prediction.isfinite().all()) for prediction in reference):
        raise _Unbuildable("the tiny model's uncached output is not finite")
    before = target_fingerprint(transformer)
    cells = []
    for backend, strategy in combos:
        cells.append(_run_cell(fam, transformer, reference, before, backend, strategy))
    return cells


def _run_cell(fam: Family, transformer: torch.nn.Module, reference: list[torch.Tensor], before: Any,
              backend: str, strategy: str) -> Cell:
    from phyai_cache import PhyaiCacheError, disable_dit_cache, enable_dit_cache

    def cell(status: str, reason: str = "", stats: Any = None, short: str = "") -> Cell:
        return Cell(fam.name, backend, strategy, status, reason,
                    stats.steps_cached if stats else 0, stats.steps_total if stats else 0, short)

    from phyai_cache.strategies import get_strategy

    hits = HIT_SETTINGS.get((backend, strategy), get_strategy(strategy).hit_settings)
    settings = dict(enabled=True, backend=backend, strategy=strategy, **hits)
    try:
        handle = enable_dit_cache(transformer, **settings)
    except PhyaiCacheError as error:
        if target_fingerprint(transformer) != before:
            return cell(FAILED, f"refused, but the model was changed: {_clean(str(error))}")
        return cell(REFUSED, f"{type(error).__name__}: {_clean(str(error))}", short=_short_reason(error))
    except Exception as error:
        _force_disable(transformer)
        return cell(FAILED, f"enable raised {type(error).__name__}: {_clean(str(error))}")
    try:
        first = denoise(fam, transformer, handle)
        stats = handle.last_run
        problem = _check_run(stats) or _check_first_step(first, reference)
        if problem is None:
            second = denoise(fam, transformer, handle)
            if not all(torch.equal(a, b) for a, b in zip(first, second)):
                problem = "a second run differs from the first (state carried over between runs)"
        if problem is None:
            problem = _check_replay(denoise(fam, transformer, handle, frozen=True), handle.last_run)
    except Exception as error:
        problem = f"raised while running: {type(error).__name__}: {_clean(str(error))}"
        stats = handle.last_run
    finally:
        disable_dit_cache(transformer)
    if problem is None:
        after = denoise(fam, transformer)
        if target_fingerprint(transformer) != before or not all(torch.equal(a, b) for a, b in zip(after, reference)):
            problem = "after disable_dit_cache the model differs from never enabled"
    return cell(SERVED, "", stats) if problem is None else cell(FAILED, problem, stats)


REPLAY_TOLERANCE = 1e-4
"""Largest relative L1 error of a cached call whose inputs equal the computed call's."""


def _check_replay(predictions: list[torch.Tensor], stats: Any) -> str | None:
    """With every step's inputs equal to the first step's, each cached call must reproduce the first
    call of its branch (up to rounding). A larger error means model code between the cached blocks
    that still runs on a cached step and adds its contribution a second time (or a wrong residual)."""
    first: dict[str, torch.Tensor] = {}
    worst, where = 0.0, None
    for record, prediction in zip(stats.records, predictions):
        if record.branch not in first:
            first[record.branch] = prediction
        elif record.decision == "cached":
            error = _relative_l1(prediction, first[record.branch])
            if error > worst:
                worst, where = error, (record.step, record.branch)
    if where is not None and worst > REPLAY_TOLERANCE:
        return (f"a cached step with inputs identical to the computed one differs from it (relative L1 "
                f"{worst:.2g} at step {where[0]}, branch {where[1]!r}): the cache does not reproduce this model")
    return None


def _relative_l1(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).abs().sum() / reference.abs().sum().clamp_min(1e-12))


def _check_first_step(predictions: list[torch.Tensor], reference: list[torch.Tensor]) -> str | None:
    """The first step is computed in every branch and sees the uncached run's inputs: it must give
    the uncached outputs. A difference means the cache changed the model itself, not just reused."""
    for branch, (value, expected) in enumerate(zip(predictions[: len(BRANCHES)], reference)):
        error = _relative_l1(value, expected)
        if error > REPLAY_TOLERANCE:
            return (f"the first step (computed, same inputs as uncached) differs from the uncached model "
                    f"(relative L1 {error:.2g}, branch {BRANCHES[branch]!r}): enabling changed what the model computes")
    return None


def _short_reason(error: Exception) -> str:
    """What was refused, in words that do not name the model: ``field: allowed`` for config errors,
    the first clause for an unavailable backend."""
    field_name, allowed = getattr(error, "field", None), getattr(error, "allowed", None)
    if field_name is not None and allowed is not None:
        allowed = re.sub(r"\b\d+ to \d+ for this model.*", "fewer than the model's blocks", _clean(str(allowed)))
        return f"{field_name}: {allowed}"
    return _clean(str(error)).split(" (")[0].split(";")[0]


def _check_run(stats: Any) -> str | None:
    if stats is None:
        return "no run was recorded"
    if stats.branches != list(BRANCHES):
        return f"branches recorded as {stats.branches}, expected {list(BRANCHES)}"
    for branch in BRANCHES:
        steps = [r.step for r in stats.records if r.branch == branch]
        if steps != list(range(STEPS)):
            return f"branch {branch!r} recorded steps {steps}, expected {list(range(STEPS))}"
    # textkv is exact: it reuses the text stream's keys and values and never approximates a step.
    if stats.steps_cached == 0 and {r.reason for r in stats.records} != {"exact"}:
        return "enabled and ran, but cached no step: " + ", ".join(sorted({r.reason for r in stats.records}))
    return None


def _force_disable(transformer: torch.nn.Module) -> None:
    from phyai_cache import disable_dit_cache

    with contextlib.suppress(Exception):
        disable_dit_cache(transformer)


def _clean(message: str, limit: int = 400) -> str:
    """One line, no memory addresses (the table must be reproducible), at most ``limit`` characters."""
    message = re.sub(r" at 0x[0-9a-fA-F]+", "", " ".join(message.split()))
    return message if len(message) <= limit else message[: limit - 3] + "..."


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """Refusals and fallbacks log warnings by design; the matrix records them instead."""
    names = ("phyai_cache", "diffusers", "cache_dit")
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def target_fingerprint(module: torch.nn.Module) -> list[tuple[Any, ...]]:
    """Everything a cache could leave behind on a model: per submodule, its instance attributes,
    instance-level forward, hooks and diffusers hook registry."""
    rows = []
    for name, sub in module.named_modules():
        rows.append((name, type(sub), tuple(sorted(sub.__dict__)), sub.__dict__.get("forward"),
                     len(sub._forward_hooks), len(sub._forward_pre_hooks), getattr(sub, "_diffusers_hook", None)))
    return rows
