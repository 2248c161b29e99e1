"""Whole-call skipping for the native engine (``options.skip_call``).

Strategies that decide without any block (taylorseer's schedule, MagCache's calibrated ratios,
EasyCache's rate on the call's input) know a step's decision before the transformer is called. A
cached step then returns a forecast of the call's *output* (TaylorSeer of order ``taylorseer_order``
over the outputs of the branch's computed steps) and runs nothing of the model: no patch or text
embedding, no timestep embedding or RoPE table, no block, no output norm or projection, which the
block-level form still runs on every step. The decision goes through the same sequence and the same
per-branch state (``decide`` and ``Group.commit``), and a computed step runs every block
(counted like any computed step).

The call's latents are its ``hidden_states`` argument (diffusers' name for them) or, for a model of
one's own, its forward's first parameter; a diffusers model whose forward has no ``hidden_states``
(Cosmos3's packed lists of vision, sound and action tokens, Z-Image's list ``x``) is refused at
enable time. What a cached output is valid for is the one cache key of every backend
(``decision.cache_key``): the latents' and text stream's shapes plus the call's modes
(``decision.call_modes``, e.g. Qwen-Image 2.1's ``kv_cache_mode``), so a step whose mode differs from
the last computed step's computes (``shape_changed``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ...blocks import ROW_ARGUMENTS, SHARED_ARGUMENTS, forward_parameters, has_batch_rows
from ...decision import cache_gap, cache_key, call_modes, decide
from ...errors import CacheStateError
from ...runtime import CallInfo, TransformerCall
from .groups import Group
from .history import ResidualHistory
from .method import StepInputs

if TYPE_CHECKING:
    from .chain import ChainInstallation


@dataclass
class CallOutput:
    """The call's output over computed steps, and how to rebuild the container the model returns
    (tensor, tuple or output dataclass) around a forecast."""

    history: ResidualHistory
    rebuild: Callable[[torch.Tensor], Any]


def split_output(output: Any) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """The tensor to forecast from a transformer output, and how to rebuild the output from a forecast.

    A tuple's tensors are all forecast, as one flat tensor (the forecast is elementwise): phyai's
    Cosmos3 policy returns ``(video, action)`` and the action is what a robot executes; reusing it
    from the last computed step while the video is forecast would be silently stale."""
    if isinstance(output, torch.Tensor):
        return output, lambda tensor: tensor
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return _split_tuple(output)
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor) and dataclasses.is_dataclass(output):
        return sample, lambda tensor: dataclasses.replace(output, sample=tensor)
    raise CacheStateError(f"options.skip_call cannot forecast a transformer output of type {type(output).__name__}: "
                          "it needs a tensor, a tuple starting with one, or an output dataclass with .sample")


def _split_tuple(output: tuple) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    tensors = [(i, item) for i, item in enumerate(output) if isinstance(item, torch.Tensor)]
    if len(tensors) == 1:
        rest = output[1:]
        return output[0], lambda tensor: (tensor, *rest)
    dtypes = {item.dtype for _, item in tensors}
    batches = {item.shape[0] if item.dim() else None for _, item in tensors}
    if len(dtypes) > 1 or len(batches) > 1 or None in batches:
        raise CacheStateError("options.skip_call cannot forecast a transformer output whose tensors differ in dtype "
                              "or batch size; use the strategy without skip_call")
    # One row per batch row (rows stay in dimension 0, so step-level batches can cut and merge them).
    shapes = [item.shape[1:] for _, item in tensors]
    flat = torch.cat([item.reshape(item.shape[0], -1) for _, item in tensors], dim=1)

    def rebuild(forecast: torch.Tensor) -> tuple:
        items = list(output)  # non-tensor entries as the last computed call returned them
        pieces = forecast.split([math.prod(shape) for shape in shapes], dim=1)
        for (index, _), shape, piece in zip(tensors, shapes, pieces):
            items[index] = piece.reshape(forecast.shape[0], *shape)
        return tuple(items)

    return flat, rebuild


def run_whole_call(engine: ChainInstallation, call: CallInfo, original: Any, args: tuple,
                   kwargs: dict[str, Any]) -> Any:
    """Decide ``call`` before running it; return the forecast output (cached) or run it (computed)."""
    group = decide_ahead(engine, call, args, kwargs)
    group.commit(group.decision)
    if group.decision.cached:
        return group.cache.output.rebuild(forecast(group))
    call.decided = group.decision  # the block wrappers see a decided call: they run (and count) every block
    output = original(*args, **kwargs)
    tensor, rebuild = split_output(output)
    keep_output(engine, group, tensor, rebuild)
    return output


def decide_ahead(engine: ChainInstallation, call: CallInfo, args: tuple, kwargs: dict[str, Any]) -> Group:
    """The (uncommitted) decision of ``call``'s rows, taken from the call's arguments before it runs."""
    state = engine.runs[call.run]
    signature = engine.lifecycle.target.signature
    hidden = signature.hidden_states(args, kwargs)
    if not isinstance(hidden, torch.Tensor):
        raise CacheStateError(f"options.skip_call needs the transformer call's latents as one tensor (its "
                              f"{signature.latent} argument); got {type(hidden).__name__}")
    encoder = signature.encoder_hidden_states(args, kwargs)
    group = Group(call, state, state.branch_cache(call), ahead=True, position=engine.position(state, call))
    group.chain_input, encoder = group.rows(hidden), group.rows(encoder) if isinstance(encoder, torch.Tensor) else None
    group.key = cache_key(group.chain_input, encoder, call_modes(args, kwargs))
    cache, method = group.cache, group.cache.method
    if method is not None:
        group.inputs = StepInputs(call, group.chain_input)
    gap = cache_gap(group.key, cache.key, cache.output is not None)
    if gap is None and method is not None:
        gap = method.gap(group.inputs)
    measure = None if method is None else functools.partial(method.measure, group.inputs)
    group.decision = decide(call.step, call.branch, state.rules, cache, state.shared, group.key, gap=gap,
                            measure=measure, commit=False)
    return group


def forecast(group: Group) -> torch.Tensor:
    """A cached step's output rows: the forecast over the branch's computed calls."""
    group.call.skipped_call = True
    history = group.cache.output.history
    value = history.predict(group.call.step, group.position)
    if any(value is factor for factor in history.factors):
        value = value.clone()  # plain reuse: the caller must not get (and mutate) our copy
    return value


def keep_output(engine: ChainInstallation, group: Group, tensor: torch.Tensor, rebuild: Callable) -> None:
    """After a computed call: keep the group's output rows (what cached steps forecast from)."""
    cache, setup = group.cache, group.state.setup
    history = cache.output.history if cache.output is not None else None
    if history is None or (history.factors and history.factors[0].shape != tensor.shape):
        # A new output shape the key did not foresee: what was kept is for another shape.
        cache.output = CallOutput(setup.forecaster.history(), rebuild)
    # A copy: the pipeline owns the output and may change it in place (a cached tensor changed
    # behind the cache's back is how SGLang #33827 corrupted images).
    cache.output.history.update(group.call.step, tensor.detach().clone(), group.position)
    cache.output.rebuild = rebuild
    if cache.method is not None:
        cache.method.computed(group.inputs, tensor)
    group.call.run.note_cache_bytes(group.state.nbytes())


# -- step-level batches: whole-call skipping per row ---------------------------------------------

# Transformer-call arguments with one entry per batch row, or shared by all rows, by diffusers'
# names (the blocks' names and the call's own: pooled text, guidance, Qwen-Image's per-row shapes).
CALL_ROW_ARGUMENTS = frozenset({*ROW_ARGUMENTS, "hidden_states", "pooled_projections", "guidance", "img_shapes",
                                "txt_seq_lens"})
CALL_SHARED_ARGUMENTS = frozenset({*SHARED_ARGUMENTS, "img_ids", "txt_ids"})


def run_whole_call_rows(engine: ChainInstallation, forward: TransformerCall, ahead: list[CallInfo], original: Any,
                        args: tuple, kwargs: dict[str, Any]) -> Any:
    """A step-level batch in which the ``ahead`` calls skip whole calls (``options.skip_call``).

    They decide on their own rows before the call. If every row of the batch skips, nothing runs; if
    some do, the transformer runs only on the rows that compute (embeddings included) and the others
    take their forecast. When the call's arguments cannot be cut to those rows (an argument whose
    first dimension is the batch size under a name not known to be per row or shared), the call runs
    on every row, the skipping rows pass through every block without computing, and their output is
    replaced by the forecast: the same result, only the model's prologue and epilogue run for them.
    """
    groups = [decide_ahead(engine, call, args, kwargs) for call in ahead]
    everyone = len(groups) == len(forward.calls) and all(g.decision.cached for g in groups)
    for group in groups:  # per batch (what peers do): a row skips the call only if every row does
        cached = group.decision.cached and (forward.per_row or everyone)
        group.commit(group.decision if cached or not group.decision.cached
                     else group.decision.overruled("batch_computes"))
        group.call.decided = group.decision  # the block wrappers see a decided call
    skipping = [g for g in groups if g.decision.cached]
    computing = [g for g in groups if not g.decision.cached]
    if not skipping:
        output = original(*args, **kwargs)
        _keep_rows(engine, computing, output)
        return output
    forecasts = {id(g.call): forecast(g) for g in skipping}
    if len(skipping) == len(forward.calls):
        return skipping[0].cache.output.rebuild(torch.cat([forecasts[id(c)] for c in forward.calls]))
    batch = sum(c.rows.stop - c.rows.start for c in forward.calls)
    running = [c for c in forward.calls if id(c) not in forecasts]
    index = torch.tensor([r for c in running for r in range(c.rows.start, c.rows.stop)],
                         device=skipping[0].chain_input.device)
    latent = engine.lifecycle.target.signature.latent
    subset = call_rows(engine.lifecycle.target.transformer, args, kwargs, index, batch, CALL_ROW_ARGUMENTS | {latent})
    if subset is None:
        output = original(*args, **kwargs)  # the skipping rows pass through every block (Group.ahead)
        _keep_rows(engine, computing, output)
        tensor, rebuild = split_output(output)
        skipped = torch.tensor([r for g in skipping for r in range(g.call.rows.start, g.call.rows.stop)],
                               device=tensor.device)
        return rebuild(tensor.index_copy(0, skipped, torch.cat([forecasts[id(g.call)] for g in skipping])))
    tensor, rebuild = _run_rows(engine, forward, running, computing, original, subset)
    pieces, offset = [], 0
    for call in forward.calls:
        if id(call) in forecasts:
            pieces.append(forecasts[id(call)])
        else:
            size = call.rows.stop - call.rows.start
            pieces.append(tensor[offset:offset + size])
            offset += size
    return rebuild(torch.cat(pieces))


def _run_rows(engine: ChainInstallation, forward: TransformerCall, running: list[CallInfo], computing: list[Group],
              original: Any, subset: tuple[tuple, dict]) -> tuple[torch.Tensor, Callable]:
    """Run the transformer on the rows of ``running`` only: their row ranges are renumbered for the call."""
    all_calls, rows = forward.calls, [c.rows for c in running]
    start = 0
    for call in running:
        size = call.rows.stop - call.rows.start
        call.rows, start = slice(start, start + size), start + size
    forward.calls = running
    try:
        output = original(*subset[0], **subset[1])
        _keep_rows(engine, computing, output)
    finally:
        forward.calls = all_calls
        for call, old in zip(running, rows):
            call.rows = old
    return split_output(output)


def _keep_rows(engine: ChainInstallation, computing: list[Group], output: Any) -> None:
    tensor, rebuild = split_output(output)
    for group in computing:
        keep_output(engine, group, group.rows(tensor), rebuild)


def call_rows(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any], index: torch.Tensor, batch: int,
              row_names: frozenset[str]) -> tuple[tuple, dict] | None:
    """The transformer call's arguments cut to the rows in ``index``, or None when an argument cannot
    be told per row or shared (the caller then runs every row)."""
    names = [p.name for p in forward_parameters(model)]
    positional = [names[i] if i < len(names) else f"#{i}" for i in range(len(args))]
    cut = [_call_argument(name, value, index, batch, row_names)
           for name, value in [*zip(positional, args), *kwargs.items()]]
    if any(value is _UNKNOWN for value in cut):
        return None
    return tuple(cut[:len(args)]), dict(zip(kwargs, cut[len(args):]))


_UNKNOWN = object()


def _call_argument(name: str, value: Any, index: torch.Tensor, batch: int, row_names: frozenset[str]) -> Any:
    if name in CALL_SHARED_ARGUMENTS or not has_batch_rows(value, batch) and not _is_row_list(value, batch):
        return value
    if name not in row_names:
        return _UNKNOWN
    if isinstance(value, torch.Tensor):
        return value.index_select(0, index.to(value.device))
    if _is_row_list(value, batch):
        return type(value)(value[i] for i in index.tolist())
    return _UNKNOWN


def _is_row_list(value: Any, batch: int) -> bool:
    """A list or tuple with one item per batch row (e.g. Qwen-Image's img_shapes)."""
    return isinstance(value, (list, tuple)) and batch > 1 and len(value) == batch
