"""What Cache-DiT needs of a model's block lists: one chain, called the way its wrapper calls blocks.

:class:`ChainSpec` is the chain the adapter hands Cache-DiT (several lists only for models known to run
them back to back) with its ``ForwardPattern``; everything here is checked in ``prepare``, before
anything changes, against the blocks found by :func:`phyai_cache.blocks.discover_blocks`.
"""

from __future__ import annotations

import dataclasses

import torch

from ...blocks import BlockList
from ...errors import DiTCacheConfigError

# Models whose forward runs several block lists back to back with the same arguments and nothing in
# between (checked in their diffusers source), so the lists can be cached as one chain. Cache-DiT
# itself does this for Flux ("dummy blocks"); for any other model several lists are refused rather
# than silently skipping the model's own code between them.
_BACK_TO_BACK_LISTS: dict[str, tuple[str, ...]] = {
    "FluxTransformer2DModel": ("transformer_blocks", "single_transformer_blocks"),
    "HunyuanVideoTransformer3DModel": ("transformer_blocks", "single_transformer_blocks"),
}

# Models whose forward does more with a block list than call each block with the same arguments,
# found by the support matrix (lab/phyai_cache_lab/testing/families.py) with the cache-dit version below.
# For the whole forward call cache-dit puts a one-element list holding its wrapper where the block
# list was: the model's loop calls the wrapper once, with the first block's arguments, and whatever
# else the forward reads from the list sees the wrapper, so the first call raises (or, for per-block
# arguments, could compute something else). Kept as data: such uses hide in helper methods and in
# branches that never run (SD3 reads block.context_pre_only, Flux len(blocks) for ControlNet only),
# so reading the forward's source would refuse models that work and miss models that do not.
_FORWARD_USES_BLOCKS: dict[str, tuple[tuple[str, ...], str]] = {
    "AceStepTransformer1DModel": (("layers",), "reads self.layers[0].self_attn.processor"),
    "DiTTransformer2DModel": (("transformer_blocks",), "reads self.transformer_blocks[0].norm1"),
    "Transformer2DModel": (("transformer_blocks",), "reads self.transformer_blocks[0].norm1 (patched inputs)"),
    "QwenImage21Transformer2DModel": (("transformer_blocks",), "reads block.attn.processor of every block"),
    "HunyuanDiT2DModel": (("blocks",), "passes each block of the second half its own skip connection (skip=)"),
}
_FORWARD_USES_BLOCKS_SEEN = "1.5.3"


@dataclasses.dataclass(frozen=True)
class ChainSpec:
    """The blocks Cache-DiT caches as one unit, and how they are called."""

    lists: tuple[BlockList, ...]
    pattern: str  # ForwardPattern member name

    @property
    def paths(self) -> list[str]:
        return [block_list.path for block_list in self.lists]

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [block for block_list in self.lists for block in block_list.blocks]

    def __len__(self) -> int:
        return sum(len(block_list.blocks) for block_list in self.lists)

    @classmethod
    def from_lists(cls, transformer: torch.nn.Module, lists: list[BlockList]) -> ChainSpec:
        patterns = [_forward_pattern(block_list) for block_list in lists]
        if any("." in block_list.path for block_list in lists):
            raise DiTCacheConfigError(
                "blocks", [bl.path for bl in lists], "block lists that are direct children of the transformer",
                hint="cache-dit swaps the lists by attribute name on the transformer; use backend 'native'")
        if len(lists) > 1:
            _check_back_to_back(transformer, lists, patterns)
        _check_forward_only_calls_blocks(transformer, lists)
        return cls(tuple(lists), patterns[0])


def _forward_pattern(block_list: BlockList) -> str:
    """Cache-DiT's ForwardPattern for a list, from our block description (diffusers' registry).

    Cache-DiT calls every block as ``block(hidden_states, encoder_hidden_states, *args, **kwargs)``
    (patterns 0-2) or ``block(hidden_states, *args, **kwargs)`` (pattern 3), so the streams must be
    the first positional parameters of the block.
    """
    io = block_list.io[0]
    if io.hidden_pos != 0:
        raise DiTCacheConfigError(
            "blocks", block_list.path, "blocks whose hidden states are their first argument",
            hint="cache-dit passes hidden states positionally; use backend 'native' for this model")
    if io.returns_encoder:
        if io.encoder_pos != 1:
            raise DiTCacheConfigError(
                "blocks", block_list.path, "blocks whose encoder hidden states are their second argument",
                hint="cache-dit passes the encoder stream positionally; use backend 'native' for this model")
        _check_stream_names(block_list)
        return "Pattern_0" if io.hidden_index < io.encoder_index else "Pattern_1"
    positional = io.positional_names
    if len(positional) > 1 and positional[1] == "encoder_hidden_states":
        return "Pattern_2"  # takes the encoder stream, returns hidden states only (e.g. Wan)
    return "Pattern_3"


def _check_stream_names(block_list: BlockList) -> None:
    """Refuse two-stream blocks with an ``encoder_hidden_states`` parameter that is not their second stream.

    The model calls cache-dit's wrapper where it called a block, and the wrapper takes the streams as
    ``forward(hidden_states, encoder_hidden_states, *args, **kwargs)``: a keyword argument binds by
    that name. LTX-2 passes ``audio_hidden_states=`` (its second stream) and ``encoder_hidden_states=``
    (the text), so the text would become the second stream and the audio is passed twice.
    """
    io = block_list.io[0]
    positional = io.positional_names
    if io.encoder_name != "encoder_hidden_states" and "encoder_hidden_states" in positional:
        raise DiTCacheConfigError(
            "blocks", block_list.path,
            "two-stream blocks whose parameter named encoder_hidden_states is their second stream",
            hint=f"the second stream of {type(block_list.blocks[0]).__name__} is {io.encoder_name!r} and "
                 "encoder_hidden_states is another argument; cache-dit binds a keyword encoder_hidden_states "
                 "as the second stream; use backend='native', which serves this model")


def _check_back_to_back(transformer: torch.nn.Module, lists: list[BlockList], patterns: list[str]) -> None:
    model = type(transformer).__name__
    paths = tuple(block_list.path for block_list in lists)
    if _BACK_TO_BACK_LISTS.get(model) != paths:
        raise DiTCacheConfigError(
            "blocks", list(paths), "a single block list for this model on backend 'cache_dit'",
            hint=f"cache-dit caches one chain of blocks; {model} is not known to run {' and '.join(paths)} back to "
                 "back with nothing in between, so skipping them as one unit could skip the model's own code; "
                 "use backend 'native' (a residual per list) or pass blocks= with one list")
    if len(set(patterns)) != 1:
        raise DiTCacheConfigError(
            "blocks", list(paths), "block lists with the same inputs and outputs",
            hint=f"their cache-dit forward patterns differ ({', '.join(patterns)}); this diffusers version's "
                 f"{model} needs backend 'native'")


def _check_forward_only_calls_blocks(transformer: torch.nn.Module, lists: list[BlockList]) -> None:
    """Refuse the models of _FORWARD_USES_BLOCKS: their first call would fail under cache-dit."""
    model = type(transformer).__name__
    paths, what = _FORWARD_USES_BLOCKS.get(model, ((), ""))
    chosen = [block_list.path for block_list in lists if block_list.path in paths]
    if chosen:
        raise DiTCacheConfigError(
            "target", model,
            "a model whose forward only calls the blocks of its cached list, all with the same arguments",
            hint=f"cache-dit puts one wrapper module in place of {' and '.join(chosen)} for the whole call, and "
                 f"{model}.forward {what} (fails at the first call with cache-dit {_FORWARD_USES_BLOCKS_SEEN}); "
                 "use backend='native', which serves this model")
