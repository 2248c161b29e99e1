"""Whole-call skipping for the native engine (``options.skip_call``).

Strategies that decide without any block (taylorseer's schedule, MagCache's calibrated ratios,
EasyCache's rate on the call's input) know a step's decision before the transformer is called. A
cached step then returns a forecast of the call's *output* (TaylorSeer of order ``taylorseer_order``
over the outputs of the branch's computed steps) and runs nothing of the model: no patch or text
embedding, no timestep embedding or RoPE table, no block, no output norm or projection, which the
block-level form still runs on every step. The decision goes through the same sequence and the same
per-branch state (``decide`` and the engine's ``_commit``), and a computed step runs every block
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
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ...calls import LATENT_ARGUMENT, CallSignature
from ...decision import cache_gap, cache_key, call_modes, decide
from ...errors import CacheStateError, DiTCacheConfigError
from ...runtime import CallInfo
from .method import StepInputs
from .policy import ResidualHistory

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
    if len(dtypes) > 1:
        raise CacheStateError(f"options.skip_call cannot forecast a transformer output whose tensors differ in "
                              f"dtype ({', '.join(map(str, dtypes))}); use the strategy without skip_call")
    shapes = [item.shape for _, item in tensors]
    flat = torch.cat([item.reshape(-1) for _, item in tensors])

    def rebuild(forecast: torch.Tensor) -> tuple:
        items = list(output)  # non-tensor entries as the last computed call returned them
        for (index, _), shape, piece in zip(tensors, shapes, forecast.split([s.numel() for s in shapes])):
            items[index] = piece.view(shape)
        return tuple(items)

    return flat, rebuild


def check_latent_parameter(model: torch.nn.Module) -> None:
    """A clear :class:`DiTCacheConfigError` (at enable time) when ``model``'s forward has no latents to
    forecast from: a diffusers model without ``hidden_states`` (its first argument is something else).
    Other models take theirs in the first positional parameter (:class:`~phyai_cache.calls.CallSignature`)."""
    signature = CallSignature.of(model)
    if signature.latent == LATENT_ARGUMENT or not _is_diffusers_model(model):
        return
    parameters = list(signature.positions)
    raise DiTCacheConfigError(
        "options.skip_call", True, f"false for {type(model).__name__}",
        hint=f"whole-call skipping forecasts the call's output from its latents, the forward's hidden_states "
             f"argument, and {type(model).__name__}.forward has none (its parameters start "
             f"{', '.join(parameters[:3])}); use the same strategy without skip_call (block-level caching)")


def _is_diffusers_model(model: torch.nn.Module) -> bool:
    try:
        from diffusers import ModelMixin
    except ImportError:
        return False
    return isinstance(model, ModelMixin)


def run_whole_call(engine: ChainInstallation, call: CallInfo, original: Any, args: tuple,
                   kwargs: dict[str, Any]) -> Any:
    """Decide ``call`` before running it; return the forecast output (cached) or run it (computed)."""
    from .chain import Group

    state = engine.runs[call.run]
    plan = state.plan
    signature = engine.lifecycle.target.signature
    hidden = signature.hidden_states(args, kwargs)
    if not isinstance(hidden, torch.Tensor):
        raise CacheStateError(f"options.skip_call needs the transformer call's latents as one tensor (its "
                              f"{signature.latent} argument); got {type(hidden).__name__}")
    cache = engine._branch_cache(state, call)
    key = cache_key(hidden, signature.encoder_hidden_states(args, kwargs), call_modes(args, kwargs))
    group = Group(call, state, cache, chain_input=hidden, key=key)
    method = cache.method
    if method is not None:
        group.inputs = StepInputs(call, hidden)
    gap = cache_gap(group.key, cache.key, cache.output is not None)
    if gap is None and method is not None:
        gap = method.gap(group.inputs)
    measure = None if method is None else functools.partial(method.measure, group.inputs)
    decision = decide(call.step, call.branch, plan.rules, cache, state.shared, group.key, gap=gap,
                      measure=measure, commit=False)
    engine._commit(group, decision)
    if decision.cached:
        call.skipped_call = True
        forecast = cache.output.history.predict(call.step)
        if any(forecast is factor for factor in cache.output.history.factors):
            forecast = forecast.clone()  # plain reuse: the caller must not get (and mutate) our copy
        return cache.output.rebuild(forecast)
    call.scratch = decision  # the block wrappers see a decided call: they run (and count) every block
    output = original(*args, **kwargs)
    tensor, rebuild = split_output(output)
    history = cache.output.history if cache.output is not None else None
    if history is None or (history.factors and history.factors[0].shape != tensor.shape):
        # A new output shape the key did not foresee: what was kept is for another shape.
        cache.output = CallOutput(ResidualHistory(plan.forecast_order), rebuild)
    # A copy: the pipeline owns the output and may change it in place (a cached tensor changed
    # behind the cache's back is how SGLang #33827 corrupted images).
    cache.output.history.update(call.step, tensor.detach().clone())
    cache.output.rebuild = rebuild
    if method is not None:
        method.computed(group.inputs, tensor)
    call.run.note_cache_bytes(state.nbytes())
    return output
