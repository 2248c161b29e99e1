"""What the diffusers hooks need from a model, checked before anything is applied.

diffusers' block caches (FirstBlockCache, MagCache) pick the blocks themselves: every direct
``nn.ModuleList`` child whose *name* is one of diffusers' block identifiers, in registration order,
described by ``TransformerBlockRegistry``. Several models pass diffusers' own apply step and then fail
at the first forward (measured on 0.42.1, see docs/backend-diffusers.md); the structural ones are
detected here so enabling fails instead, with the target untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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


@dataclass(frozen=True)
class BlockHooks:
    """What a diffusers block-level cache (its hooks skip whole blocks) needs of the model's blocks.

    min_blocks:
        Blocks it needs in diffusers-named block lists (FirstBlockCache pops a head and a tail block).
    head_tail_failure:
        When it stores the residual from the first block's input to the last block's output, what goes
        wrong if the head and the tail return different streams (Flux2: a double-stream head on the
        image tokens, a single-stream tail on text + image tokens); None when that does not matter.
    literal_arguments:
        The block arguments its hooks look up by these literal names rather than by the names
        diffusers' block registry declares (Kandinsky5 and Cosmos3 declare others); blocks that do not
        return the encoder stream are not checked for ``encoder_hidden_states``.
    """

    min_blocks: int = 1
    head_tail_failure: str | None = None
    literal_arguments: tuple[str, ...] = ()


def check_block_cache(transformer: torch.nn.Module, strategy: str, needs: BlockHooks) -> list[str]:
    """Refuse models on which a diffusers block-level cache would fail; returns the block names."""
    blocks = [(f"{name}.{i}", block) for name, blocks in diffusers_block_lists(transformer)
              for i, block in enumerate(blocks)]
    model = type(transformer).__name__
    if len(blocks) < needs.min_blocks:
        raise DiTCacheConfigError(
            "target", f"<{model}>", f"a model with at least {needs.min_blocks} blocks in diffusers-named block lists",
            hint=f"diffusers' {strategy} hooks direct ModuleList children named blocks / transformer_blocks / "
                 f"single_transformer_blocks / layers / ...; {model} has {len(blocks)}; {NATIVE_HINT}",
        )
    metadata = [_block_metadata(name, block, model) for name, block in blocks]
    if needs.head_tail_failure is not None:
        _check_head_and_tail_streams(blocks, metadata, model, needs.head_tail_failure)
    if needs.literal_arguments:
        _check_argument_names(blocks, metadata, model, strategy, needs.literal_arguments)
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


def _check_head_and_tail_streams(blocks: list[tuple[str, torch.nn.Module]], metadata: list[Any], model: str,
                                 failure: str) -> None:
    head_has_encoder = metadata[0].return_encoder_hidden_states_index is not None
    tail_has_encoder = metadata[-1].return_encoder_hidden_states_index is not None
    if head_has_encoder != tail_has_encoder:
        raise DiTCacheConfigError(
            "target", f"<{model}>", "a model whose first and last blocks return the same streams",
            hint=f"{blocks[0][0]} {'returns' if head_has_encoder else 'does not return'} encoder states but "
                 f"{blocks[-1][0]} {'does' if tail_has_encoder else 'does not'}; {failure}; {NATIVE_HINT}",
        )


_DECLARED_NAME = {"hidden_states": "hidden_states_argument_name",
                  "encoder_hidden_states": "encoder_hidden_states_argument_name"}


def _check_argument_names(blocks: list[tuple[str, torch.nn.Module]], metadata: list[Any], model: str,
                          strategy: str, literals: tuple[str, ...]) -> None:
    for (name, block), meta in zip(blocks, metadata):
        for literal in literals:
            if literal == "encoder_hidden_states" and meta.return_encoder_hidden_states_index is None:
                continue
            declared = getattr(meta, _DECLARED_NAME[literal], literal)
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
