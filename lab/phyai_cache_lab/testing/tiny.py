"""Tiny, random-weight, fully offline diffusers pipelines for cache tests.

Why: caching code hooks into real diffusers pipelines and transformers, so tests
need the *real* pipeline classes (their denoising loops, CFG branches and
``cache_context`` calls), not mocks -- but no weights can be downloaded and the
CPU is small. Each builder here creates the real pipeline class around a
transformer built from a tiny config with seeded random weights, with no
tokenizer, no text encoder and no VAE. Prompts are replaced by random
precomputed embeddings, and ``output_type="latent"`` skips VAE decoding, so
none of the pipelines below needs a VAE (without one they fall back to the
standard 8x spatial / 4x temporal scale factors).

Usage::

    tiny = build_tiny_pipeline("flux")
    out = tiny.pipe(**tiny.call_kwargs(num_inference_steps=4, cfg=True))
    latents = tiny.run(num_inference_steps=4)          # same, returns the tensor
    n = count_transformer_calls(tiny.pipe, **tiny.call_kwargs(cfg=True))  # 2 per step

What each family's call looks like (defaults: resolution 64, 8 text tokens)
---------------------------------------------------------------------------
flux -- ``FluxPipeline`` + ``FluxTransformer2DModel`` (guidance-distilled, like FLUX.1-dev)
    kwargs: prompt_embeds (B, 8, 32), pooled_prompt_embeds (B, 32),
    guidance_scale=3.5 (embedded guidance, one call per step).
    cfg=True: true_cfg_scale=2.0 + negative_prompt_embeds / negative_pooled_prompt_embeds
    -> a second transformer call per step under ``cache_context("uncond")``.
    Transformer receives packed tokens hidden_states (B, (res/16)^2, 16), i.e. 16
    image tokens at res 64, plus txt_ids / img_ids, timestep/1000 and guidance.
    Output (latent): packed (B, (res/16)^2, 16).
    Blocks: ``transformer_blocks`` (2 x FluxTransformerBlock, dual stream) and
    ``single_transformer_blocks`` (2 x FluxSingleTransformerBlock).

wan -- ``WanPipeline`` + ``WanTransformer3DModel``
    kwargs: prompt_embeds (B, 8, 32), num_frames=5, guidance_scale=1.0 (Wan's
    default 5.0 would enable CFG and try to *encode* an empty negative prompt,
    which fails without a text encoder -- so cfg=False must set guidance_scale=1).
    cfg=True: guidance_scale=5.0 + negative_prompt_embeds -> two calls per step.
    Transformer receives 5-D latents (B, 4, 2, res/8, res/8) (2 latent frames),
    patchified (1, 2, 2) inside the model to 2 * (res/16)^2 tokens (32 at res 64).
    Output (latent): (B, 4, 2, res/8, res/8).
    Blocks: ``blocks`` (4 x WanTransformerBlock).

qwenimage -- ``QwenImagePipeline`` + ``QwenImageTransformer2DModel``
    kwargs: prompt_embeds (B, 8, 32), prompt_embeds_mask (B, 8) all ones,
    true_cfg_scale=1.0 (the pipeline default 4.0 only warns without negatives,
    but we set it explicitly so cfg=False is unambiguous).
    cfg=True: true_cfg_scale=4.0 + negative_prompt_embeds + negative_prompt_embeds_mask.
    Quirk: the pipeline turns an all-ones mask into ``None`` before calling the
    transformer, so the transformer sees encoder_hidden_states_mask=None.
    Quirk: ``img_shapes`` is built from the prompt batch only (it ignores
    num_images_per_prompt), so batching is done through the embeddings' batch.
    Transformer receives packed tokens (B, (res/16)^2, 16) plus img_shapes.
    Output (latent): packed (B, (res/16)^2, 16).
    Blocks: ``transformer_blocks`` (4 x QwenImageTransformerBlock, dual stream).

hunyuanvideo -- ``HunyuanVideoPipeline`` + ``HunyuanVideoTransformer3DModel``
    kwargs: prompt_embeds (B, 8, 32), pooled_prompt_embeds (B, 32),
    prompt_attention_mask (B, 8) all ones, num_frames=5, guidance_scale=6.0
    (embedded guidance; the model is guidance-distilled like the released one).
    cfg=True: diffusers 0.42 supports *true* CFG here: true_cfg_scale=2.0 +
    negative_prompt_embeds + negative_pooled_prompt_embeds (+ mask) -> two calls
    per step ("cond" / "uncond" cache contexts). Both negatives are required.
    Quirk: with precomputed embeddings ``num_videos_per_prompt`` is *not* applied
    to the embeddings (only to the latents), so batching must go through the
    embeddings' batch dimension -- which is what ``call_kwargs`` does for all
    families.
    Transformer receives 5-D latents (B, 4, 2, res/8, res/8), patchified (1, 2, 2)
    inside the model to 2 * (res/16)^2 tokens.
    Output (latent): (B, 4, 2, res/8, res/8).
    Blocks: ``transformer_blocks`` (2 x HunyuanVideoTransformerBlock, dual stream)
    and ``single_transformer_blocks`` (2 x HunyuanVideoSingleTransformerBlock);
    the text token refiner (``context_embedder.token_refiner``, 1 layer) is not a
    cacheable block list.

qwenimage21 -- ``QwenImage21Pipeline`` + ``QwenImage21Transformer2DModel`` (Qwen-Image 2.1)
    kwargs: prompt_embeds (B, 8, 32), prompt_embeds_mask (B, 8) all ones,
    true_cfg_scale=1.0 (2.1 is meant to run without guidance).
    cfg=True: true_cfg_scale=4.0 + negative_prompt_embeds (+ mask).
    The pipeline's VAE is 16x and the transformer takes latents unpatched: one
    token per 16x16 pixels, so resolutions must be multiples of 32 (16 tokens at
    res 64, 16 latent channels). Text and image share one sequence in single-stream
    blocks; with ``use_kv_cache=True`` (the default, kept here) the first step
    prefills a KV cache of the text tokens and later steps run the image tokens
    only, so the hidden states change shape between step 0 and step 1.
    Stand-in: ``Qwen3VLProcessor`` cannot be built without torchvision (its video
    processor needs it, and torchvision cannot be installed next to the CPU torch
    here). With precomputed embeddings the pipeline uses the processor only in
    ``__init__``: the chat template's system-prompt length and the image-pad token
    id. ``_TokenizerProcessor`` provides exactly those with a real tiny
    ``Qwen2Tokenizer`` -- the only stand-in in this module.
    Blocks: ``transformer_blocks`` (4 x QwenImage21TransformerBlock), which
    diffusers' block registry does not describe; the library knows them
    (``phyai_cache.known_blocks``), so ``enable_dit_cache`` finds them itself.

cosmos3 -- ``Cosmos3OmniPipeline`` + ``Cosmos3OmniTransformer`` (Cosmos 3, text-to-image)
    kwargs: prompt (a string: the pipeline has no text encoder, the transformer
    embeds token ids itself), num_frames=1, guidance_scale=1.0, no system prompt.
    cfg=True: guidance_scale=6.0 + an empty negative prompt -> "cond" and "uncond"
    calls. One sample per call (the pipeline collapses prompt lists), so
    batch_size must be 1. A real tiny ``Qwen2Tokenizer`` (byte-level vocabulary,
    built in memory) and a tiny ``AutoencoderKLWan`` (8x spatial; the pipeline
    encodes an empty conditioning frame even for text-to-image) are built
    offline; the safety checker is disabled. Scheduler: ``UniPCMultistepScheduler``
    with flow sigmas, as shipped.
    Blocks: ``layers`` (4 x Cosmos3VLTextMoTDecoderLayer, described by diffusers:
    hidden states ``gen_seq``, text stream ``und_seq``).

General notes
-------------
* Resolutions must be multiples of 16 (8x VAE factor times 2x2 patches);
  all four pipelines otherwise resize or reject them.
* All schedulers are ``FlowMatchEulerDiscreteScheduler`` (first order, one
  scheduler step per denoising step). Flux and QwenImage use dynamic shifting
  (mu from the token count); Wan uses shift=5 and HunyuanVideo shift=7. Real Wan
  checkpoints ship UniPC; Euler keeps the step count == transformer call count.
* Determinism: weights are created under ``torch.random.fork_rng`` with
  ``torch.manual_seed(seed)`` (the global RNG state is left untouched), prompts
  come from a private generator seeded with ``prompt_seed``, and every
  ``call_kwargs()`` returns a fresh latent generator seeded with ``seed``.
* The negative "prompt" is one fixed random embedding (like a constant empty
  negative prompt), independent of ``prompt_seed``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

PIPELINE_FAMILIES: tuple[str, ...] = ("flux", "wan", "qwenimage", "hunyuanvideo", "qwenimage21", "cosmos3")

DEFAULT_RESOLUTION = 64
"""Default height == width in pixels: 16 image tokens per frame (8x VAE, 2x2 patches)."""
VIDEO_NUM_FRAMES = 5
"""Pixel frames for video families: (5 - 1) // 4 + 1 = 2 latent frames."""
TEXT_SEQ_LEN = 8
"""Number of text tokens in every random prompt embedding."""
_NEGATIVE_PROMPT_SEED = 2**31 - 1
"""Seed of the fixed negative-prompt embedding (a stand-in for an empty negative prompt)."""

_TOKENIZER_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>",
                             "<|image_pad|>", "<|video_pad|>")
_TOKENIZER_VOCAB_SIZE = 256 + len(_TOKENIZER_SPECIAL_TOKENS)
"""The tiny byte-level Qwen2 tokenizer: one token per byte, plus the chat and vision special tokens."""

_RESOLUTION_MULTIPLE = 16
_RESOLUTION_MULTIPLES = {"qwenimage21": 32}  # 16x VAE, and the pipeline rounds down to 32
_MAX_BATCH_SIZE = {"cosmos3": 1}  # Cosmos3OmniPipeline generates one sample per call


@dataclass
class TinyPipeline:
    """A built tiny pipeline plus what tests need to call it.

    ``block_lists`` names the transformer's ``nn.ModuleList`` attributes that
    hold cacheable transformer blocks, in execution order.
    """

    family: str
    pipe: DiffusionPipeline
    block_lists: tuple[str, ...] = ()

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def max_batch_size(self) -> int | None:
        """The largest ``batch_size`` the family's pipeline accepts (``None``: no limit)."""
        return _MAX_BATCH_SIZE.get(self.family)

    def call_kwargs(
        self,
        *,
        batch_size: int = 1,
        num_inference_steps: int = 4,
        cfg: bool = False,
        resolution: int | None = None,
        seed: int = 0,
        prompt_seed: int = 0,
    ) -> dict[str, Any]:
        """Everything needed for ``pipe(**kwargs)``; see the module docstring per family.

        ``cfg=True`` selects the family's two-branch classifier-free guidance, so
        the transformer runs twice per step (once "cond", once "uncond").
        """
        resolution = DEFAULT_RESOLUTION if resolution is None else resolution
        _check_resolution(resolution, _RESOLUTION_MULTIPLES.get(self.family, _RESOLUTION_MULTIPLE))
        if self.max_batch_size is not None and batch_size > self.max_batch_size:
            raise ValueError(f"{self.family}: batch_size must be at most {self.max_batch_size}, got {batch_size}")
        kwargs: dict[str, Any] = {
            "height": resolution,
            "width": resolution,
            "num_inference_steps": num_inference_steps,
            "generator": torch.Generator("cpu").manual_seed(seed),
            "output_type": "latent",
        }
        if self.family in ("wan", "hunyuanvideo"):
            kwargs["num_frames"] = VIDEO_NUM_FRAMES
        if self.family == "cosmos3":
            kwargs.update(num_frames=1, use_system_prompt=False, enable_safety_check=False)
        kwargs.update(_PROMPT_KWARGS[self.family](self.transformer, batch_size, prompt_seed, cfg))
        return kwargs

    def run(self, **call_kwargs: Any) -> torch.Tensor:
        """Call the pipeline with ``call_kwargs(**call_kwargs)`` and return the output latents."""
        return self.pipe(**self.call_kwargs(**call_kwargs), return_dict=False)[0]


def build_tiny_pipeline(
    family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **transformer_overrides: Any
) -> TinyPipeline:
    """Build the tiny pipeline for ``family`` with weights drawn from ``seed``.

    ``transformer_overrides`` replace entries of the family's tiny transformer
    config (e.g. ``num_layers=6``, which means ``num_hidden_layers`` for cosmos3);
    the global torch RNG state is not changed.
    """
    if family not in PIPELINE_FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {PIPELINE_FAMILIES}")
    aliases = _OVERRIDE_ALIASES.get(family, {})
    overrides = {aliases.get(name, name): value for name, value in transformer_overrides.items()}
    config = {**_TRANSFORMER_CONFIGS[family], **overrides}
    transformer = _cast(_build_transformer(family, config, seed), dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _PIPELINE_BUILDERS[family](transformer)
    pipe.set_progress_bar_config(disable=True)
    return TinyPipeline(family=family, pipe=pipe, block_lists=_BLOCK_LISTS[family])


def count_transformer_calls(pipe: DiffusionPipeline, **kwargs: Any) -> int:
    """Run ``pipe(**kwargs)`` and return how many times ``pipe.transformer`` was called.

    Counts module invocations with a forward pre-hook, so it also works when a
    cache library has replaced ``transformer.forward``; the hook is removed in a
    ``finally`` so the pipeline is left as it was.
    """
    calls = 0

    def _count(module: torch.nn.Module, args: tuple) -> None:
        nonlocal calls
        calls += 1

    handle = pipe.transformer.register_forward_pre_hook(_count)
    try:
        pipe(**kwargs)
    finally:
        handle.remove()
    return calls


# ---------------------------------------------------------------------------
# Transformer configs and construction
# ---------------------------------------------------------------------------

# hidden size 32 = 2 heads x 16; rope axes (4, 6, 6) sum to the head dim.
_TRANSFORMER_CONFIGS: dict[str, dict[str, Any]] = {
    "flux": dict(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ),
    "wan": dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=4,
        rope_max_seq_len=32,
    ),
    "qwenimage": dict(
        patch_size=2,
        in_channels=16,  # 4 latent channels packed 2x2
        out_channels=4,
        num_layers=4,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
    ),
    "hunyuanvideo": dict(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=32,
        pooled_projection_dim=32,
        rope_axes_dim=(4, 6, 6),
    ),
    "qwenimage21": dict(
        patch_size=1,
        in_channels=16,  # latent channels, unpatched
        out_channels=16,
        num_layers=4,
        attention_head_dim=16,
        num_attention_heads=2,
        context_in_dim=32,
        mlp_ratio=2,
        axes_dims_rope=(4, 6, 6),
    ),
    "cosmos3": dict(
        head_dim=16,
        hidden_size=32,
        intermediate_size=64,
        latent_channel=4,
        latent_patch_size=2,
        patch_latent_dim=16,  # 2 x 2 x latent_channel
        num_attention_heads=2,
        num_key_value_heads=1,
        num_hidden_layers=4,
        vocab_size=_TOKENIZER_VOCAB_SIZE,
        rope_axes_dim=(4, 2, 2),  # sums to head_dim / 2
    ),
}

_OVERRIDE_ALIASES: dict[str, dict[str, str]] = {"cosmos3": {"num_layers": "num_hidden_layers"}}



_BLOCK_LISTS: dict[str, tuple[str, ...]] = {
    "qwenimage21": ("transformer_blocks",),
    "cosmos3": ("layers",),
    "flux": ("transformer_blocks", "single_transformer_blocks"),
    "wan": ("blocks",),
    "qwenimage": ("transformer_blocks",),
    "hunyuanvideo": ("transformer_blocks", "single_transformer_blocks"),
}


def family_available(family: str) -> bool:
    """Whether the installed diffusers has ``family``'s transformer (Qwen-Image 2.1 and Cosmos3 are
    newer than the releases the compatibility CI pins)."""
    import diffusers

    return hasattr(diffusers, _TRANSFORMER_NAMES[family])


def available_families() -> tuple[str, ...]:
    return tuple(f for f in PIPELINE_FAMILIES if family_available(f))


def _transformer_class(family: str) -> type:
    import diffusers

    return getattr(diffusers, _TRANSFORMER_NAMES[family])


_TRANSFORMER_NAMES = {
    "qwenimage21": "QwenImage21Transformer2DModel",
    "cosmos3": "Cosmos3OmniTransformer",
    "flux": "FluxTransformer2DModel",
    "wan": "WanTransformer3DModel",
    "qwenimage": "QwenImageTransformer2DModel",
    "hunyuanvideo": "HunyuanVideoTransformer3DModel",
}


def _build_transformer(family: str, config: dict[str, Any], seed: int) -> torch.nn.Module:
    """Construct the transformer with weights that depend only on ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = _transformer_class(family)(**config)
    return transformer.eval()


def _cast(transformer: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast to ``dtype`` like ``from_pretrained(torch_dtype=...)`` would.

    Modules listed in ``_keep_in_fp32_modules`` (e.g. Wan's norms and time
    embedder) stay float32, as in real checkpoints; casting tensors directly
    also avoids ``ModelMixin.to``'s warning about exactly that.
    """
    keep_fp32 = set(getattr(transformer, "_keep_in_fp32_modules", None) or ())
    for name, tensor in [*transformer.named_parameters(), *transformer.named_buffers()]:
        if tensor.is_floating_point() and not keep_fp32.intersection(name.split(".")):
            tensor.data = tensor.data.to(dtype)
    return transformer


# ---------------------------------------------------------------------------
# Pipelines (no tokenizer, text encoder or VAE)
# ---------------------------------------------------------------------------


def _flow_match_scheduler(**config: Any):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**config)


def _dynamic_shift_scheduler():
    """Flux / QwenImage style: the shift (mu) is computed from the image token count."""
    return _flow_match_scheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )


def _build_flux(transformer: torch.nn.Module):
    from diffusers import FluxPipeline

    return FluxPipeline(
        scheduler=_dynamic_shift_scheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )


def _build_wan(transformer: torch.nn.Module):
    from diffusers import WanPipeline

    return WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, scheduler=_flow_match_scheduler(shift=5.0), transformer=transformer
    )


def _build_qwenimage(transformer: torch.nn.Module):
    from diffusers import QwenImagePipeline

    return QwenImagePipeline(
        scheduler=_dynamic_shift_scheduler(), vae=None, text_encoder=None, tokenizer=None, transformer=transformer
    )


def _build_hunyuanvideo(transformer: torch.nn.Module):
    from diffusers import HunyuanVideoPipeline

    return HunyuanVideoPipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
        vae=None,
        scheduler=_flow_match_scheduler(shift=7.0),
        text_encoder_2=None,
        tokenizer_2=None,
    )


def _tiny_tokenizer():
    """A real ``Qwen2Tokenizer`` with a byte-level vocabulary and no merges, built in memory."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {char: index for index, char in enumerate(sorted(ByteLevel.alphabet()))}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(_TOKENIZER_SPECIAL_TOKENS)})
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for part in m['content'] %}{{ part['text'] }}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    assert len(tokenizer) == _TOKENIZER_VOCAB_SIZE, len(tokenizer)
    return tokenizer


class _TokenizerProcessor:
    """Stand-in for ``Qwen3VLProcessor`` (which needs torchvision): the real tokenizer, and the
    processor's ``apply_chat_template``, which returns one token list per conversation."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> list[list[int]]:
        return [self.tokenizer.apply_chat_template(conversation, **kwargs)]


def _build_qwenimage21(transformer: torch.nn.Module):
    from diffusers import QwenImage21Pipeline

    return QwenImage21Pipeline(
        scheduler=_dynamic_shift_scheduler(),
        vae=None,
        text_encoder=None,
        processor=_TokenizerProcessor(_tiny_tokenizer()),
        transformer=transformer,
    )


def _build_cosmos3(transformer: torch.nn.Module):
    from diffusers import AutoencoderKLWan, Cosmos3OmniPipeline, UniPCMultistepScheduler

    channels = transformer.config.latent_channel
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, False, False], latents_mean=[0.0] * channels, latents_std=[1.0] * channels,
        scale_factor_spatial=8, scale_factor_temporal=4,
    ).eval()
    scheduler = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=5.0)
    return Cosmos3OmniPipeline(transformer=transformer, text_tokenizer=_tiny_tokenizer(), vae=vae,
                               scheduler=scheduler, enable_safety_checker=False)


_PIPELINE_BUILDERS: dict[str, Callable[[torch.nn.Module], Any]] = {
    "qwenimage21": _build_qwenimage21,
    "cosmos3": _build_cosmos3,
    "flux": _build_flux,
    "wan": _build_wan,
    "qwenimage": _build_qwenimage,
    "hunyuanvideo": _build_hunyuanvideo,
}


# ---------------------------------------------------------------------------
# Random prompt embeddings and per-family call kwargs
# ---------------------------------------------------------------------------


def _check_resolution(resolution: int, multiple: int = _RESOLUTION_MULTIPLE) -> None:
    if resolution <= 0 or resolution % multiple:
        raise ValueError(f"resolution must be a positive multiple of {multiple}, got {resolution}")


@dataclass
class _Prompt:
    """Random stand-ins for text-encoder outputs: token embeddings, pooled vector, mask."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None
    mask: torch.Tensor


def _random_prompt(
    transformer: torch.nn.Module, batch_size: int, seed: int, text_dim: int, pooled_dim: int | None
) -> _Prompt:
    """Draw one "prompt" per batch row from a private generator (global RNG untouched)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    embeds = torch.randn(batch_size, TEXT_SEQ_LEN, text_dim, generator=generator)
    pooled = None if pooled_dim is None else torch.randn(batch_size, pooled_dim, generator=generator)
    dtype = transformer.dtype
    return _Prompt(
        embeds=embeds.to(dtype),
        pooled=None if pooled is None else pooled.to(dtype),
        mask=torch.ones(batch_size, TEXT_SEQ_LEN, dtype=torch.long),
    )


def _prompt_pair(
    transformer: torch.nn.Module, batch_size: int, prompt_seed: int, text_dim: int, pooled_dim: int | None
) -> tuple[_Prompt, _Prompt]:
    """The positive prompt (from ``prompt_seed``) and the fixed negative prompt."""
    positive = _random_prompt(transformer, batch_size, prompt_seed, text_dim, pooled_dim)
    negative = _random_prompt(transformer, batch_size, _NEGATIVE_PROMPT_SEED, text_dim, pooled_dim)
    return positive, negative


def _flux_prompt_kwargs(transformer, batch_size: int, prompt_seed: int, cfg: bool) -> dict[str, Any]:
    config = transformer.config
    pos, neg = _prompt_pair(
        transformer, batch_size, prompt_seed, config.joint_attention_dim, config.pooled_projection_dim
    )
    kwargs: dict[str, Any] = {
        "prompt_embeds": pos.embeds,
        "pooled_prompt_embeds": pos.pooled,
        "guidance_scale": 3.5,
        "true_cfg_scale": 1.0,
    }
    if cfg:
        kwargs.update(
            true_cfg_scale=2.0, negative_prompt_embeds=neg.embeds, negative_pooled_prompt_embeds=neg.pooled
        )
    return kwargs


def _wan_prompt_kwargs(transformer, batch_size: int, prompt_seed: int, cfg: bool) -> dict[str, Any]:
    pos, neg = _prompt_pair(transformer, batch_size, prompt_seed, transformer.config.text_dim, None)
    kwargs: dict[str, Any] = {"prompt_embeds": pos.embeds, "guidance_scale": 1.0}
    if cfg:
        kwargs.update(guidance_scale=5.0, negative_prompt_embeds=neg.embeds)
    return kwargs


def _qwenimage_prompt_kwargs(transformer, batch_size: int, prompt_seed: int, cfg: bool) -> dict[str, Any]:
    pos, neg = _prompt_pair(transformer, batch_size, prompt_seed, transformer.config.joint_attention_dim, None)
    kwargs: dict[str, Any] = {"prompt_embeds": pos.embeds, "prompt_embeds_mask": pos.mask, "true_cfg_scale": 1.0}
    if cfg:
        kwargs.update(true_cfg_scale=4.0, negative_prompt_embeds=neg.embeds, negative_prompt_embeds_mask=neg.mask)
    return kwargs


def _hunyuanvideo_prompt_kwargs(transformer, batch_size: int, prompt_seed: int, cfg: bool) -> dict[str, Any]:
    config = transformer.config
    pos, neg = _prompt_pair(transformer, batch_size, prompt_seed, config.text_embed_dim, config.pooled_projection_dim)
    kwargs: dict[str, Any] = {
        "prompt_embeds": pos.embeds,
        "pooled_prompt_embeds": pos.pooled,
        "prompt_attention_mask": pos.mask,
        "guidance_scale": 6.0,
        "true_cfg_scale": 1.0,
    }
    if cfg:
        kwargs.update(
            true_cfg_scale=2.0,
            negative_prompt_embeds=neg.embeds,
            negative_pooled_prompt_embeds=neg.pooled,
            negative_prompt_attention_mask=neg.mask,
        )
    return kwargs


def _qwenimage21_prompt_kwargs(transformer, batch_size: int, prompt_seed: int, cfg: bool) -> dict[str, Any]:
    pos, neg = _prompt_pair(transformer, batch_size, prompt_seed, transformer.config.context_in_dim, None)
    kwargs: dict[str, Any] = {"prompt_embeds": pos.embeds, "prompt_embeds_mask": pos.mask, "true_cfg_scale": 1.0}
    if cfg:
        kwargs.update(true_cfg_scale=4.0, negative_prompt_embeds=neg.embeds, negative_prompt_embeds_mask=neg.mask)
    return kwargs


def _cosmos3_prompt_kwargs(transformer, batch_size: int, prompt_seed: int, cfg: bool) -> dict[str, Any]:
    # Token ids, not embeddings: the transformer embeds them. The "prompt" differs per prompt_seed.
    kwargs: dict[str, Any] = {"prompt": f"a tiny picture, number {prompt_seed}", "guidance_scale": 1.0}
    if cfg:
        kwargs.update(guidance_scale=6.0, negative_prompt="")
    return kwargs


_PROMPT_KWARGS: dict[str, Callable[[Any, int, int, bool], dict[str, Any]]] = {
    "qwenimage21": _qwenimage21_prompt_kwargs,
    "cosmos3": _cosmos3_prompt_kwargs,
    "flux": _flux_prompt_kwargs,
    "wan": _wan_prompt_kwargs,
    "qwenimage": _qwenimage_prompt_kwargs,
    "hunyuanvideo": _hunyuanvideo_prompt_kwargs,
}
