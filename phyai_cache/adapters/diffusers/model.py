"""What the diffusers hooks need from a model, checked before anything is applied.

diffusers' block caches (FirstBlockCache, MagCache) pick the blocks themselves: every direct
``nn.ModuleList`` child whose *name* is one of diffusers' block identifiers, in registration order,
described by ``TransformerBlockRegistry``. Several models pass diffusers' own apply step and then fail
at the first forward (measured on 0.42.1, see docs/backend-diffusers.md); the structural ones are
detected here so enabling fails instead, with the target untouched.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ...calls import CallSignature
from ...errors import CacheStateError, DiTCacheConfigError

NATIVE_HINT = "backend 'native' serves fbcache/dbcache/taylorseer on any block list"


def require_cache_mixin(transformer: torch.nn.Module) -> None:
    """diffusers' caches are enabled, scoped and reset through CacheMixin; models without it are refused."""
    from diffusers.models.cache_utils import CacheMixin

    if not isinstance(transformer, CacheMixin):
        raise DiTCacheConfigError(
            "target", f"<{type(transformer).__name__}>",
            "a diffusers model with CacheMixin (enable_cache / disable_cache / _reset_stateful_cache)",
            hint=f"{type(transformer).__name__} does not inherit diffusers' CacheMixin (SD3, PixArt, Sana and "
                 f"AuraFlow transformers do not); {NATIVE_HINT}",
        )


def diffusers_block_lists(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]]:
    """The block lists diffusers' FirstBlockCache and MagCache hook, in their order."""
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS

    return [(name, child) for name, child in transformer.named_children()
            if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(child, torch.nn.ModuleList)]


def check_block_cache(transformer: torch.nn.Module, strategy: str) -> list[str]:
    """Refuse models on which diffusers' FirstBlockCache / MagCache would fail; returns the block names."""
    blocks = [(f"{name}.{i}", block) for name, blocks in diffusers_block_lists(transformer)
              for i, block in enumerate(blocks)]
    model = type(transformer).__name__
    minimum = 2 if strategy == "fbcache" else 1  # diffusers' FBC pops a head and a tail block
    if len(blocks) < minimum:
        raise DiTCacheConfigError(
            "target", f"<{model}>", f"a model with at least {minimum} blocks in diffusers-named block lists",
            hint=f"diffusers' {strategy} hooks direct ModuleList children named blocks / transformer_blocks / "
                 f"single_transformer_blocks / layers / ...; {model} has {len(blocks)}; {NATIVE_HINT}",
        )
    metadata = [_block_metadata(name, block, model) for name, block in blocks]
    if strategy in _HEAD_TAIL_FAILURES:
        _check_head_and_tail_streams(blocks, metadata, model, strategy)
    if strategy != "seacache":  # SeaCache looks arguments up by the names the registry declares
        _check_argument_names(blocks, metadata, model, strategy)
    return [name for name, _ in blocks]


def _block_metadata(name: str, block: torch.nn.Module, model: str) -> Any:
    from diffusers.hooks._helpers import TransformerBlockRegistry

    try:
        return TransformerBlockRegistry.get(type(block))
    except ValueError:
        raise DiTCacheConfigError(
            "target", f"<{model}>", "a model whose block classes diffusers' TransformerBlockRegistry describes",
            hint=f"{name} is a {type(block).__name__}, which this diffusers release does not register; {NATIVE_HINT}",
        ) from None


# The caches that store the residual from the first block's input to the last block's output: a head
# and a tail that return different streams break them (Flux2: a double-stream head on the image
# tokens, a single-stream tail on text + image tokens).
_HEAD_TAIL_FAILURES = {
    # FBC's tail subtracts the head output it stored: a TypeError, or silently the wrong thing; a tail
    # without encoder output breaks SD3-style lists.
    "fbcache": "diffusers' FirstBlockCache fails on it (diffusers #14280)",
    # SeaCache records the residual only when the tail's output matches the head's input (shape and
    # streams): it never does, so every step it would cache runs in full ("fails open").
    "seacache": "diffusers' SeaCache never records a residual between them, so it would cache no step",
}


def _check_head_and_tail_streams(blocks: list[tuple[str, torch.nn.Module]], metadata: list[Any], model: str,
                                 strategy: str) -> None:
    head_has_encoder = metadata[0].return_encoder_hidden_states_index is not None
    tail_has_encoder = metadata[-1].return_encoder_hidden_states_index is not None
    if head_has_encoder != tail_has_encoder:
        raise DiTCacheConfigError(
            "target", f"<{model}>", "a model whose first and last blocks return the same streams",
            hint=f"{blocks[0][0]} {'returns' if head_has_encoder else 'does not return'} encoder states but "
                 f"{blocks[-1][0]} {'does' if tail_has_encoder else 'does not'}; {_HEAD_TAIL_FAILURES[strategy]}; "
                 f"{NATIVE_HINT}",
        )


def _check_argument_names(blocks: list[tuple[str, torch.nn.Module]], metadata: list[Any], model: str,
                          strategy: str) -> None:
    # FirstBlockCache looks the arguments up by the literal names hidden_states/encoder_hidden_states
    # (MagCache: only the encoder one), not by the names the block registry declares (Kandinsky5, Cosmos3).
    for (name, block), meta in zip(blocks, metadata):
        expected = []
        if strategy == "fbcache":
            expected.append(("hidden_states", getattr(meta, "hidden_states_argument_name", "hidden_states")))
        if meta.return_encoder_hidden_states_index is not None:
            expected.append(("encoder_hidden_states",
                             getattr(meta, "encoder_hidden_states_argument_name", "encoder_hidden_states")))
        for literal, declared in expected:
            if declared != literal:
                raise DiTCacheConfigError(
                    "target", f"<{model}>", f"blocks whose argument is named {literal!r}",
                    hint=f"{name} ({type(block).__name__}) takes {declared!r}; diffusers' {strategy} looks up "
                         f"{literal!r} and fails; {NATIVE_HINT}",
                )


def attention_classes() -> tuple[type, ...]:
    """The module classes diffusers' PAB and FasterCache hook (as in diffusers.hooks._common)."""
    try:
        from diffusers.hooks._common import _ATTENTION_CLASSES
    except ImportError:  # diffusers < 0.35 kept the tuple in each hook module
        from diffusers.models.attention_processor import Attention

        return (Attention,)
    try:
        from diffusers.models.attention import AttentionModuleMixin
    except ImportError:
        return tuple(_ATTENTION_CLASSES)
    return (*_ATTENTION_CLASSES, AttentionModuleMixin)


def attention_module_names(transformer: torch.nn.Module) -> list[str]:
    classes = attention_classes()
    return [name for name, module in transformer.named_modules() if name and isinstance(module, classes)]


class TimestepReader:
    """The current timestep in diffusers' 0..1000 units, for PAB's and FasterCache's timestep ranges.

    Pipelines: the pipeline's ``_current_timestep`` (what ``pipe.current_timestep`` returns). A bare
    transformer in a custom loop: the call's timestep argument (:data:`phyai_cache.calls.TIMESTEP_ARGUMENTS`,
    by position or keyword). Flux- and
    QwenImage-style transformers take ``t / 1000`` there; a timestep argument whose values are all
    <= 1 is therefore read as normalized and multiplied by 1000.
    """

    def __init__(self, transformer: torch.nn.Module, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.signature = CallSignature.of(transformer)

    def require(self, args: tuple, kwargs: dict[str, Any] | None, strategy: str) -> float:
        """:meth:`read`, or an error when the call carries no timestep: the cache's timestep ranges
        (PAB, FasterCache) or its sigma (SeaCache) would never be met, and it would compute every step."""
        timestep = self.read(args, kwargs)
        if math.isnan(timestep):
            raise CacheStateError(
                f"{strategy} on backend 'diffusers' needs each call's timestep and this call has none (no "
                f"pipeline timestep, no {self.signature.describe_timestep()}), so it would cache no step: pass "
                "the timestep to the transformer, or enable the cache on its pipeline")
        return timestep

    def read(self, args: tuple, kwargs: dict[str, Any] | None) -> float:
        if self.pipeline is not None:
            value = getattr(self.pipeline, "__dict__", {}).get("_current_timestep")
            if value is not None:
                return _first_float(value)
        value = self.signature.timestep_value(args, kwargs)
        if value is None:
            return math.nan
        if isinstance(value, torch.Tensor) and value.numel() and bool((value.abs() <= 1).all()):
            return _first_float(value) * 1000.0
        first = _first_float(value)
        return first * 1000.0 if abs(first) <= 1 else first


def _first_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.reshape(-1)[0]) if value.numel() else math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
