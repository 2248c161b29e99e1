"""phyai runners that replay CUDA graphs: the decision is taken at ``runner.forward``, before the call.

phyai's Qwen-Image 2.1 runner (``use_cuda_graph=True``) captures one CUDA graph per CFG branch of the
whole transformer at the branch's first call with a stored prefix (step 1) and replays it for every
later step. A replay runs no Python of the model: no transformer forward, no block, so neither the
transformer-level hook nor a block wrapper ever sees those steps, and a decision recorded inside the
graph would be replayed on every step (phyai_cache.graphs). So on such a runner the cache treats
**the runner's forward as the cached call**:

* the lifecycle wraps a small module standing for the runner's forward (:class:`RunnerCall`, with the
  runner forward's own signature, so its latents and timestep are read by position or keyword);
* each ``runner.forward(...)`` of a request is one step of its ``branch``: the whole-call machinery of
  the native engine (``adapters/native/wholecall.py``: ``decide``, the forecast, the per-branch
  output history) decides it before the call;
* **computed**: the runner's own forward runs (eager at step 0, which also stores the prefix K/V;
  capture at the first prefix step; replay after), and its output joins the branch's history as a
  copy, so a later replay that refills the graph's static output never changes what the cache holds;
* **cached**: the forecast of the runner's output, a tensor of its own; the runner is not called, so
  nothing is captured or replayed on that step.

Inside a computed call nothing of the cache runs: the block wrappers see no call (they pass through,
and can be captured), so capture records plain compute only. Only whole-call strategies can serve
such a runner (``options.skip_call``: taylorseer, magcache, easycache); a block-level config is refused
at attach, or for a request's own ``dit_cache`` at that request's validation, naming what works.

A runner whose forward runs a whole sampling loop (pi05's expert runner, captured as one graph) has
no per-step call to decide on: it is refused at attach.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch

from ..blocks import BlocksArg, BlockSpec, normalize_specs
from ..calls import TIMESTEP_ARGUMENTS
from ..config import DiTCacheConfig
from ..decision import Decision
from ..errors import CacheStateError, DiTCacheConfigError
from ..known_blocks import known_model
from ..strategies import all_strategies

TRANSFORMER = "transformer"  # where RunnerCall keeps the runner's transformer (block paths start here)


def captures_graphs(runner: Any) -> bool:
    """Whether ``runner`` replays CUDA graphs of its transformer (phyai's ``use_cuda_graph``)."""
    return bool(getattr(runner, "use_cuda_graph", False))


def whole_call_strategies() -> list[str]:
    """The strategies that can decide before the call (they declare ``options.skip_call``)."""
    return [spec.name for spec in all_strategies() if spec.native is not None and "skip_call" in spec.native.options]


def check_config(config: DiTCacheConfig, runner: Any) -> None:
    """Refuse a config that needs the model's blocks on a runner that replays graphs of them."""
    if not config.enabled or config.options.get("skip_call"):
        return
    raise DiTCacheConfigError(
        "options.skip_call", config.options.get("skip_call", False),
        f"true with strategy {' / '.join(whole_call_strategies())} (or enabled: false)",
        hint=f"{type(runner).__name__} replays a CUDA graph of the whole transformer (use_cuda_graph=True): no "
             f"block runs in Python on a replay, so strategy {config.strategy!r} cannot decide between blocks; "
             "whole-call caching decides before runner.forward and replays or forecasts the call, or build the "
             "runner with use_cuda_graph=False to serve block-level strategies")


def refuse_whole_loop(target: Any) -> None:
    """A clear refusal for a runner (or a scheduler's runner) whose forward runs a whole sampling loop."""
    for runner in (target, getattr(target, "runner", None), getattr(target, "expert_runner", None)):
        if runner is None or not hasattr(runner, "use_cuda_graph") or not callable(getattr(runner, "forward", None)):
            continue
        parameters = forward_parameters(runner)
        if "branch" in parameters or any(name in parameters for name in TIMESTEP_ARGUMENTS):
            continue
        raise DiTCacheConfigError(
            "target", f"<{type(target).__name__} object>", "a phyai runner whose forward runs one denoising step",
            hint=f"{type(runner).__name__}.forward({', '.join(parameters)}) runs a whole sampling loop per call "
                 "(pi05's expert runner captures it as one CUDA graph): the cache decides per denoising step, and "
                 "no step is visible outside such a loop; run this model uncached (fixed schedules inside a "
                 "captured loop are not supported)")


class RunnerCall(torch.nn.Module):
    """The runner's forward as a module, so the lifecycle treats each ``runner.forward`` as one call.

    One subclass per runner class (:meth:`of`) carries the runner forward's signature, which is how
    the library reads a call's latents and timestep (:class:`~phyai_cache.calls.CallSignature`)."""

    _classes: dict[type, type[RunnerCall]] = {}

    def __init__(self, runner: Any, forward: Callable[..., Any]) -> None:
        super().__init__()
        self.transformer = runner.transformer
        self.runner = runner
        self._runner_forward = forward
        self.handle: Any = None  # set by attach once the cache is enabled on this module

    @classmethod
    def of(cls, runner: Any) -> RunnerCall:
        runner_class = type(runner)
        if runner_class not in cls._classes:
            def forward(self: RunnerCall, *args: Any, **kwargs: Any) -> Any:
                return self._call(args, kwargs)

            forward.__signature__ = inspect.signature(runner_class.forward)  # type: ignore[attr-defined]
            cls._classes[runner_class] = type(f"{runner_class.__name__}Call", (cls,), {"forward": forward})
        return cls._classes[runner_class](runner, runner.forward)

    def _call(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        if self.runner.transformer is not self.transformer:
            raise CacheStateError(f"{type(self.runner).__name__}.transformer was replaced after the cache was "
                                  "attached; detach and attach again")
        lifecycle = self.handle._lifecycle if self.handle is not None else None
        current = lifecycle.current_forward() if lifecycle is not None else None
        if current is None:  # outside a request: uncached, as any call outside a run
            return self._runner_forward(*args, **kwargs)
        # decided at the runner: its blocks run eagerly, under capture or not at all (a replay)
        with lifecycle.forward_unseen_by_blocks():
            output = self._runner_forward(*args, **kwargs)
        for call in current.calls:  # every block ran, eagerly or in the replayed graph
            call.blocks_computed = lifecycle.installation.blocks_per_call
            if call.decision is None:  # a run with the cache off decides nothing
                call.take(Decision(False, "disabled"))
        return output


def runner_blocks(runner: Any, blocks: BlocksArg) -> list[BlockSpec]:
    """The block specs of ``runner.transformer`` (``blocks``, or the ones the library knows for its
    class), as paths inside :class:`RunnerCall`."""
    if blocks is None:
        known = known_model(type(runner.transformer))
        if known is None:
            raise DiTCacheConfigError("blocks", None, "the block lists of the runner's transformer",
                                      hint=f"the library does not know {type(runner.transformer).__name__}'s blocks")
        specs = [BlockSpec(**fields) for fields in known.blocks]
    else:
        specs = normalize_specs(blocks)
    return [dataclasses.replace(spec, path=f"{TRANSFORMER}.{spec.path}") for spec in specs]


def forward_parameters(runner: Any) -> list[str]:
    """The parameter names of the runner class's forward, self excluded (the class's: an instance
    attribute may be somebody's ``(*args, **kwargs)`` wrapper)."""
    try:
        return list(inspect.signature(type(runner).forward).parameters)[1:]
    except (AttributeError, TypeError, ValueError):
        return []
