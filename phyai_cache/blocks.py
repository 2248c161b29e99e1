"""Finding a transformer's blocks and reading their inputs and outputs.

A cache needs to know three things about a model: which ``nn.ModuleList`` children hold the
transformer blocks (in the order they run), where a block's hidden states (and encoder hidden
states) are among its arguments, and where they are in its return value.

* diffusers models: read from diffusers' own ``TransformerBlockRegistry`` metadata, so there is no
  hand-written table of models here.
* any other model: a :class:`BlockSpec` (or just the list's attribute path) says it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import CacheStateError, DiTCacheConfigError
from .known_blocks import check_no_code_between_blocks, corrected, known_model


@dataclass(frozen=True)
class BlockSpec:
    """How to cache a list of blocks in a model that diffusers does not describe.

    path:
        Dotted attribute path of an ``nn.ModuleList`` of blocks, e.g. ``"layers"`` or
        ``"backbone.double_blocks"``.
    hidden_states_arg:
        The argument carrying the hidden states: a parameter name or a position (default: the
        first argument).
    encoder_hidden_states_arg:
        The argument carrying the text/encoder stream when the block also updates and returns it.
    return_hidden_states_index, return_encoder_hidden_states_index:
        Where those streams are in the block's returned tuple; ``None`` for the hidden index means
        the block returns a bare tensor.
    return_length:
        The length of the returned tuple where it holds more than those streams (phyai's Qwen-Image
        2.1 blocks return ``(hidden, prefix K/V or None)``); on a cached step the other items are
        None, so a call whose blocks must return them (``return_prefix_kv=True``) is never cached
        (:func:`phyai_cache.decision.stores_state`). Default: just long enough for the streams.
    row_args, shared_args:
        For step-level batches whose rows decide separately (serving), a block may run on a subset
        of the rows: arguments named in ``row_args`` hold one entry per batch row and are sliced,
        those in ``shared_args`` (rotary tables) are passed whole. Common names are known
        (:data:`ROW_ARGUMENTS`, :data:`SHARED_ARGUMENTS`); an unnamed tensor whose first dimension
        equals the batch size is ambiguous and refused with an error naming it.
    """

    path: str
    hidden_states_arg: str | int = 0
    encoder_hidden_states_arg: str | int | None = None
    return_hidden_states_index: int | None = None
    return_encoder_hidden_states_index: int | None = None
    return_length: int | None = None
    row_args: tuple[str, ...] = ()
    shared_args: tuple[str, ...] = ()


# Block arguments whose meaning is the same in every DiT family diffusers ships: one entry per batch
# row (timestep embeddings and modulations, text streams and their masks, class labels) or one table
# for the whole batch (rotary embeddings). The names were read from the blocks of every family of the
# support matrix (phyai_cache_lab.testing.families); docs/serving.md lists the few families whose blocks
# take arguments with names too generic to list here (``y``, ``t``, ``mask``, ``context``).
ROW_ARGUMENTS = (
    "temb", "timestep", "attention_mask", "encoder_attention_mask", "modulation", "emb",
    "encoder_hidden_states", "encoder_hidden_states_mask", "encoder_mask", "class_labels", "embedded_timestep",
    "adaln_input", "adaln_noisy", "adaln_clean", "noise_mask", "temb_mod", "temb_mod_img", "temb_mod_txt",
    "temb_mod_context", "conditioning_emb", "global_modulation", "text_embed", "time_embed", "text_v", "text_a",
    "timestep_embed", "cond_mask", "adaln_global_out", "camera_conditions", "plucker_emb",
    "audio_encoder_hidden_states", "temb_audio", "temb_ca_scale_shift", "temb_ca_audio_scale_shift",
    "temb_ca_gate", "temb_ca_audio_gate",
)
SHARED_ARGUMENTS = ("image_rotary_emb", "rotary_emb", "freqs_cis", "rotary_pos_emb", "pos_emb", "position_ids",
                    "video_rotary_emb", "audio_rotary_emb", "ca_video_rotary_emb", "ca_audio_rotary_emb")


BlocksArg = None | str | BlockSpec | Mapping[str, Any] | Sequence[str | BlockSpec | Mapping[str, Any]]


class BlockIO:
    """Reads hidden/encoder states from a block's arguments and builds outputs in its format."""

    def __init__(self, module: torch.nn.Module, spec: BlockSpec) -> None:
        self.hidden_name, self.hidden_pos = _locate_argument(
            module, spec.hidden_states_arg, spec.path, "hidden_states_arg"
        )
        self.encoder_name = self.encoder_pos = None
        self.returns_encoder = spec.return_encoder_hidden_states_index is not None
        if self.returns_encoder:
            if spec.encoder_hidden_states_arg is None:
                raise DiTCacheConfigError(
                    "blocks", spec, "an encoder_hidden_states_arg when return_encoder_hidden_states_index is set"
                )
            self.encoder_name, self.encoder_pos = _locate_argument(
                module, spec.encoder_hidden_states_arg, spec.path, "encoder_hidden_states_arg"
            )
        self.path = spec.path
        self.positional_names = _positional_names(module)  # of the class's forward, self excluded
        declared_shared = set(spec.shared_args) - {self.hidden_name, self.encoder_name}
        self.row_names = ({*ROW_ARGUMENTS, *spec.row_args} - declared_shared
                          | {self.hidden_name, self.encoder_name}) - {None}
        self.shared_names = {*SHARED_ARGUMENTS, *spec.shared_args} - set(spec.row_args)
        self.hidden_index = spec.return_hidden_states_index
        self.encoder_index = spec.return_encoder_hidden_states_index
        self.tuple_length = _tuple_length(spec)
        # diffusers describes some tensor-returning blocks with hidden index 0 (it checks the type at
        # run time), so a bare tensor is accepted when no encoder stream is returned; the format seen
        # on a computed step is the one reproduced on cached steps.
        self.returns_tuple = self.hidden_index is not None

    def hidden_in(self, args: tuple, kwargs: dict) -> torch.Tensor:
        return _argument(args, kwargs, self.hidden_name, self.hidden_pos)

    def encoder_in(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        if not self.returns_encoder:
            return None
        return _argument(args, kwargs, self.encoder_name, self.encoder_pos)

    def observe(self, output: Any) -> None:
        """Remember the output format of a computed call, to reproduce it on cached calls."""
        self.returns_tuple = isinstance(output, tuple)

    def split(self, output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden, encoder) from a block output; checks the output has the declared format."""
        if isinstance(output, torch.Tensor) and self.encoder_index is None:
            self.returns_tuple = False
            return output, None
        if self.hidden_index is None:
            if not isinstance(output, torch.Tensor):
                raise CacheStateError(
                    f"a block declared to return a tensor returned {type(output).__name__}; describe its "
                    "output with BlockSpec(return_hidden_states_index=...)"
                )
            return output, None
        self.returns_tuple = True
        if not isinstance(output, tuple) or len(output) != self.tuple_length:
            raise CacheStateError(
                f"a block returned {type(output).__name__} of length "
                f"{len(output) if isinstance(output, tuple) else '-'}"
                f"; the cache can only reproduce outputs made of the hidden states (index {self.hidden_index})"
                f" and encoder states (index {self.encoder_index})"
            )
        encoder = output[self.encoder_index] if self.encoder_index is not None else None
        return output[self.hidden_index], encoder

    def select_rows(self, args: tuple, kwargs: dict, index: torch.Tensor, batch: int) -> tuple[tuple, dict]:
        """The block's arguments for the batch rows in ``index``: per-row arguments sliced, shared ones
        passed whole. Raises when an argument cannot be told apart (see :class:`BlockSpec`)."""
        rows_args = tuple(self._select(name, value, index, batch) for name, value in zip(self._names(args), args))
        return rows_args, {name: self._select(name, value, index, batch) for name, value in kwargs.items()}

    def check_roles(self, args: tuple, kwargs: dict, batch: int) -> None:
        """Raise before anything runs when an argument could not be sliced to a subset of the rows."""
        for name, value in [*zip(self._names(args), args), *kwargs.items()]:
            if name not in self.row_names and name not in self.shared_names and has_batch_rows(value, batch):
                self._ambiguous(name, batch)

    def _names(self, args: tuple) -> list[str]:
        return [self.positional_names[i] if i < len(self.positional_names) else f"#{i}" for i in range(len(args))]

    def _select(self, name: str, value: Any, index: torch.Tensor, batch: int) -> Any:
        if name in self.row_names and value is not None:
            return _take_rows(value, index, batch, f"{self.path} argument {name!r}")
        if name in self.shared_names or not has_batch_rows(value, batch):
            return value
        self._ambiguous(name, batch)

    def _ambiguous(self, name: str, batch: int) -> None:
        raise CacheStateError(
            f"cannot tell whether argument {name!r} of the blocks in {self.path!r} holds one entry per batch row "
            f"or is shared by all rows (its first dimension equals the batch size {batch}); declare it with "
            f"BlockSpec(path={self.path!r}, row_args=({name!r},)) or shared_args=({name!r},)")

    def make_output(self, hidden: torch.Tensor, encoder: torch.Tensor | None) -> Any:
        if not self.returns_tuple:
            return hidden
        items: list[Any] = [None] * self.tuple_length
        items[self.hidden_index] = hidden
        if self.encoder_index is not None:
            items[self.encoder_index] = encoder
        return tuple(items)


@dataclass
class BlockList:
    """One ``nn.ModuleList`` of blocks that the cache manages, with its I/O description."""

    path: str
    blocks: torch.nn.ModuleList
    io: list[BlockIO]

    def names(self) -> list[str]:
        return [f"{self.path}.{i}" for i in range(len(self.blocks))]


def discover_blocks(model: torch.nn.Module, blocks: BlocksArg = None) -> list[BlockList]:
    """Resolve the block lists of ``model`` in execution order.

    ``blocks=None`` uses what :mod:`phyai_cache.known_blocks` knows of the model's class (phyai's models),
    else diffusers' block registry on the model's direct ``ModuleList`` children.
    Otherwise ``blocks`` is a path, a :class:`BlockSpec`, a mapping of BlockSpec fields, or a list
    of those, one per block list, in the order the model runs them.
    """
    specs = _auto_specs(model) if blocks is None else normalize_specs(blocks)
    check_no_code_between_blocks(model, [spec.path for spec in specs])
    lists = [_resolve_block_list(model, spec) for spec in specs]
    if not lists or sum(len(bl.blocks) for bl in lists) == 0:
        raise DiTCacheConfigError(
            "blocks", blocks, "a spec naming a non-empty nn.ModuleList of transformer blocks",
            hint="candidate lists in this model: " + (", ".join(_module_list_children(model)) or "none"),
        )
    return lists


def _auto_specs(model: torch.nn.Module) -> list[BlockSpec]:
    known = known_model(type(model))
    if known is not None:
        return [BlockSpec(**fields) for fields in known.blocks]
    registry = _diffusers_block_registry()
    specs = []
    for name, child in model.named_children():
        if not isinstance(child, torch.nn.ModuleList) or len(child) == 0:
            continue
        metadata = [_registered_metadata(registry, type(block)) for block in child]
        if any(m is None for m in metadata):
            continue
        first = metadata[0]
        specs.append(corrected(type(child[0]), _spec_from_diffusers(name, first)))
    if not specs:
        candidates = _module_list_children(model)
        raise DiTCacheConfigError(
            "blocks", None, "a block spec for this model, e.g. blocks='layers'",
            hint=f"{type(model).__name__} has no block list that diffusers describes"
                 + (f"; its ModuleList children are: {', '.join(candidates)}" if candidates else ""),
        )
    return specs


def _spec_from_diffusers(path: str, metadata: Any) -> BlockSpec:
    encoder_index = metadata.return_encoder_hidden_states_index
    return BlockSpec(
        path=path,
        hidden_states_arg=getattr(metadata, "hidden_states_argument_name", "hidden_states"),
        encoder_hidden_states_arg=(
            getattr(metadata, "encoder_hidden_states_argument_name", "encoder_hidden_states")
            if encoder_index is not None else None
        ),
        return_hidden_states_index=metadata.return_hidden_states_index,
        return_encoder_hidden_states_index=encoder_index,
    )


def _diffusers_block_registry() -> Any:
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry
    except Exception:  # diffusers missing, or too old to have block metadata
        return None
    return TransformerBlockRegistry


def _registered_metadata(registry: Any, block_class: type) -> Any:
    if registry is None:
        return None
    try:
        return registry.get(block_class)
    except ValueError:
        return None


def normalize_specs(blocks: BlocksArg) -> list[BlockSpec]:
    items = [blocks] if isinstance(blocks, (str, BlockSpec, Mapping)) else blocks
    if not isinstance(items, Sequence) or isinstance(items, (str, bytes)) or not items:
        raise DiTCacheConfigError("blocks", blocks, "a path, a BlockSpec, a mapping or a non-empty list of them")
    specs = []
    for item in items:
        if isinstance(item, BlockSpec):
            specs.append(item)
        elif isinstance(item, str):
            specs.append(BlockSpec(path=item))
        elif isinstance(item, Mapping):
            try:
                specs.append(BlockSpec(**item))
            except TypeError as exc:
                raise DiTCacheConfigError("blocks", dict(item), "BlockSpec fields", hint=str(exc)) from exc
        else:
            raise DiTCacheConfigError("blocks", item, "a path string, a BlockSpec or a mapping")
    return specs


def _resolve_block_list(model: torch.nn.Module, spec: BlockSpec) -> BlockList:
    try:
        blocks = model.get_submodule(spec.path) if spec.path else None
    except AttributeError:
        blocks = None
    if not isinstance(blocks, torch.nn.ModuleList):
        raise DiTCacheConfigError(
            "blocks", spec.path, "the path of an nn.ModuleList of blocks in this model",
            hint="candidates: " + (", ".join(_module_list_children(model)) or "none"),
        )
    return BlockList(path=spec.path, blocks=blocks, io=[BlockIO(block, spec) for block in blocks])


def _module_list_children(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.ModuleList) and name]


def forward_signature(cls: type) -> inspect.Signature | None:
    """The signature of ``cls.forward`` (self included), or None where Python cannot read one.

    The class's forward, not an instance attribute: another library may have wrapped that with a
    ``(*args, **kwargs)`` hook. Cached per class: it is read on hot paths too (a method's probe
    binding a block's arguments on every step).
    """
    if cls not in _FORWARD_SIGNATURES:
        try:
            _FORWARD_SIGNATURES[cls] = inspect.signature(cls.forward)
        except (TypeError, ValueError):
            _FORWARD_SIGNATURES[cls] = None
    return _FORWARD_SIGNATURES[cls]


def forward_parameters(module: torch.nn.Module) -> list[inspect.Parameter]:
    """The parameters of ``module``'s class forward, self excluded (empty where unreadable)."""
    signature = forward_signature(type(module))
    return list(signature.parameters.values())[1:] if signature is not None else []


_FORWARD_SIGNATURES: dict[type, inspect.Signature | None] = {}


def _locate_argument(module: torch.nn.Module, arg: str | int, path: str, field: str) -> tuple[str | None, int | None]:
    """(name, position) of a block argument given by name or position."""
    parameters = forward_parameters(module)
    positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if isinstance(arg, bool) or not isinstance(arg, (str, int)):
        raise DiTCacheConfigError(f"blocks[{path}].{field}", arg, "a parameter name or position")
    if isinstance(arg, int):
        name = positional[arg] if 0 <= arg < len(positional) else None
        return name, arg
    if arg in positional:
        return arg, positional.index(arg)
    if any(p.name == arg and p.kind == p.KEYWORD_ONLY for p in parameters):
        return arg, None
    raise DiTCacheConfigError(
        f"blocks[{path}].{field}", arg,
        f"a parameter of {type(module).__name__}.forward: {', '.join(p.name for p in parameters)}",
    )


def _argument(args: tuple, kwargs: dict, name: str | None, position: int | None) -> Any:
    if name is not None and name in kwargs:
        return kwargs[name]
    if position is not None and position < len(args):
        return args[position]
    raise CacheStateError(f"block called without its '{name or position}' argument")


def check_block_counts(front: int, back: int, total: int, where: str = "") -> None:
    """At least one middle block must remain between the front and back blocks, or nothing could
    ever be skipped. ``where`` adds to the message what the ``total`` blocks are."""
    if front + back < total:
        return
    context = f"for this model ({total} blocks{where}"
    if front >= total:
        raise DiTCacheConfigError("front_blocks", front,
                                  f"1 to {max(total - 1 - back, 1)} {context}, back_blocks={back})")
    raise DiTCacheConfigError("back_blocks", back, f"0 to {max(total - 1 - front, 0)} {context}, front_blocks={front})")


def _positional_names(module: torch.nn.Module) -> list[str]:
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in forward_parameters(module) if p.kind in positional]


def _take_rows(value: Any, index: torch.Tensor, batch: int, what: str) -> Any:
    if isinstance(value, (tuple, list)):
        return type(value)(_take_rows(item, index, batch, what) for item in value)
    if not isinstance(value, torch.Tensor):
        return value
    if value.dim() == 0 or value.shape[0] != batch:
        if value.dim() > 0 and value.shape[0] == 1:
            return value  # broadcast over the batch: the same for every row
        raise CacheStateError(f"{what} has {value.shape[0] if value.dim() else 0} rows where the batch has {batch}")
    return value.index_select(0, index)


def has_batch_rows(value: Any, batch: int) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() > 0 and value.shape[0] == batch and batch > 1
    if isinstance(value, (tuple, list)):
        return any(has_batch_rows(item, batch) for item in value)
    if isinstance(value, Mapping):
        return any(has_batch_rows(item, batch) for item in value.values())
    return False


def _tuple_length(spec: BlockSpec) -> int:
    indices = [i for i in (spec.return_hidden_states_index, spec.return_encoder_hidden_states_index) if i is not None]
    needed = max(indices) + 1 if indices else 0
    if spec.return_length is not None and spec.return_length < needed:
        raise DiTCacheConfigError("blocks", spec, f"a return_length of at least {needed} (the streams' indices)")
    return spec.return_length if spec.return_length is not None else needed
