"""How the native engine runs one config on one model: the roles of the block positions and the rules.

A config becomes a :class:`RunSetup` once per distinct config (the handle's at enable time, a
request's or an override's when it opens): the strategy's declaration and options are checked, the
block chain is cut into front, middle and back positions (:class:`ChainLayout`), and the step rules
and the strategy's own statistic are picked. Nothing here touches the model; every problem is a
clear error naming the field.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ...blocks import BlockIO, BlockList, check_block_counts
from ...calls import LATENT_ARGUMENT, CallSignature
from ...config import DiTCacheConfig
from ...decision import StepRules
from ...errors import BackendUnavailableError, CacheStateError, DiTCacheConfigError
from ...known_blocks import known_model
from ...runtime import RunState
from ...strategies import get_strategy
from ...strategies._options import validate as validate_options
from .history import Forecaster
from .method import Method


class ChainLayout:
    """The role of every block position for a given number of front and back blocks.

    With ``front_blocks=0`` (scheduled strategies) nothing runs before the decision, which is then
    taken when the chain starts.
    """

    def __init__(self, lists: list[BlockList], front_blocks: int, back_blocks: int) -> None:
        self.modules: list[torch.nn.Module] = []
        self.io: list[BlockIO] = []
        self.names: list[str] = []
        self.list_starts: set[int] = set()  # the first position of every block list
        list_of_position: list[int] = []
        for list_index, block_list in enumerate(lists):
            self.list_starts.add(len(self.modules))
            self.modules.extend(block_list.blocks)
            self.io.extend(block_list.io)
            self.names.extend(block_list.names())
            list_of_position.extend([list_index] * len(block_list.blocks))

        self.front_blocks = front_blocks
        self.back_blocks = back_blocks
        self.decider = front_blocks - 1
        self.middle = range(front_blocks, len(self.modules) - back_blocks)
        self.segment_start: dict[int, int] = {}
        self.segment_end: dict[int, int] = {}
        for position in self.middle:
            list_index = list_of_position[position]
            previous = list_of_position[position - 1] if position - 1 in self.middle else None
            following = list_of_position[position + 1] if position + 1 in self.middle else None
            if previous != list_index:
                self.segment_start[position] = len(self.segment_start)
            if following != list_index:
                self.segment_end[position] = len(self.segment_start) - 1
        self.num_segments = len(self.segment_start)

    def __len__(self) -> int:
        return len(self.modules)

    def is_middle(self, position: int) -> bool:
        return position in self.middle


@dataclass(frozen=True)
class RunSetup:
    """What a run with one config needs: its rules, the roles of the blocks, its method and options."""

    config: DiTCacheConfig
    enabled: bool
    layout: ChainLayout
    rules: StepRules | None = None
    measured: bool = True
    forecaster: Forecaster = Forecaster()  # taylorseer_order and options.forecast / forecast_axis
    separate_cfg: bool = True
    method: type[Method] | None = None  # the strategy's own statistic (NativeSpec.statistic)
    options: Mapping[str, Any] = field(default_factory=dict)  # checked against NativeSpec.options
    verify: float | None = None  # options.verify: the verified forecaster's tolerance
    skip_call: bool = False  # options.skip_call: cached steps skip the whole transformer call
    # options.streams == "worst" on a model with token streams (known_blocks.KnownModel.tail_streams):
    # the call arguments whose tokens follow the main ones; each stream is measured on its own.
    streams: tuple[str, ...] = ()


def run_setup(lists: list[BlockList], config: DiTCacheConfig, model: torch.nn.Module | None = None) -> RunSetup:
    """How the native engine runs ``config`` on ``model`` with these block lists; raises a clear
    error naming the field when it cannot (the handle's config, a request's or an override's)."""
    total = sum(len(block_list.blocks) for block_list in lists)
    if not config.enabled:
        return RunSetup(config, enabled=False, layout=ChainLayout(lists, 0, 0))
    if config.backend not in ("auto", "native"):
        raise DiTCacheConfigError("backend", config.backend, "'native' or 'auto' for a run on the native engine",
                                  hint="requests, step-level batches and per-call overrides are served by the native "
                                       "engine the cache was enabled with")
    spec = get_strategy(config.strategy)
    if spec.native is None:
        raise BackendUnavailableError(f"strategy {spec.name!r} is not available on backend 'native': "
                                      f"{spec.why_not('native')}")
    options = validate_options(spec.name, "native", spec.native.options, config.options)
    method = _method_class(spec.native.statistic) if spec.native.statistic else None
    if method is not None:
        options = method.prepare_options(options, type(model).__name__ if model is not None else None)
        method.check_blocks(options, lists[0].blocks[0] if lists and lists[0].blocks else None)
    verify, skip_call = options.get("verify"), bool(options.get("skip_call", False))
    if skip_call and (spec.native.measured or verify is not None or (method and not method.decides_before_call)):
        raise DiTCacheConfigError(
            "options.skip_call", True, f"false for strategy {spec.name!r}" + (" with options.verify" if verify else ""),
            hint="a whole call can be skipped only when the decision is known before it (taylorseer, magcache, "
                 "easycache); front blocks, a verified forecaster or teacache's modulated input need the call to run")
    if skip_call and model is not None:
        check_latent_parameter(model)
    known = known_model(type(model)) if model is not None else None
    streams = known.tail_streams if known and spec.native.measured and options.get("streams") != "pooled" else ()
    # Without a measure on the front blocks nothing runs before the decision and the whole chain is
    # approximated; a verified forecaster needs one front block to check its forecast against.
    front, back = (config.front_blocks, config.back_blocks) if spec.native.measured else (1 if verify else 0, 0)
    check_block_counts(front, back, total)
    rules = _Calibrating(config) if options.get("calibrate") else StepRules(config)
    return RunSetup(config, enabled=True, layout=ChainLayout(lists, front, back), rules=rules,
                    measured=spec.native.measured, forecaster=Forecaster.of(config.taylorseer_order, options),
                    separate_cfg=config.separate_cfg is not False,  # "auto" -> separate: always correct
                    method=method, options=options, verify=verify, skip_call=skip_call, streams=streams)


def scheduled_rules(setup: RunSetup, run: RunState) -> StepRules | None:
    """options.schedule: the run's steps to compute, calibrated for its step count (``phyai-cache tune``
    searches them), as a compute mask; None (the setup's own rules) when the run's step count has no
    schedule, which is warned once per run: the interval then decides."""
    schedules = setup.options.get("schedule") if setup.enabled else None
    if not schedules:
        return None
    steps = run.stats.num_inference_steps
    computed = schedules.get(steps)
    if computed is None:
        run.warn_once("schedule_missing", f"phyai_cache: options.schedule has schedules for {sorted(schedules)} steps, "
                                          f"not for this run's {steps}; cache_interval="
                                          f"{setup.config.cache_interval} decides instead")
        return None
    mask = [1 if step in computed else 0 for step in range(steps)]
    return StepRules(setup.config.replace(compute_mask=mask, cache_interval=None, warmup_steps=0))


class _Calibrating(StepRules):
    """``options.calibrate``: every step computes, so the strategy's statistic sees an uncached run."""

    def must_compute(self, step: int) -> str | None:
        return "calibrate"


def _method_class(path: str) -> type[Method]:
    module, name = path.split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def check_shared_layout(setups: list[RunSetup]) -> None:
    """Per-batch decisions: refuse a batch whose cached requests cut the chain differently."""
    # whole-call requests decide before the call, whatever the layout of the others
    layouts = {(s.layout.front_blocks, s.layout.back_blocks) for s in setups if s.enabled and not s.skip_call}
    if len(layouts) > 1:
        raise CacheStateError(
            f"per-batch decisions need every cached request of a batch to use the same front/back blocks "
            f"(got {sorted(layouts)}); use per-row decisions or batch such requests separately")


def check_latent_parameter(model: torch.nn.Module) -> None:
    """``options.skip_call``: a clear :class:`DiTCacheConfigError` (at enable time) when ``model``'s
    forward has no latents to forecast from (:mod:`.wholecall`): a diffusers model without
    ``hidden_states`` (its first argument is something else). Other models take theirs in the first
    positional parameter (:class:`~phyai_cache.calls.CallSignature`)."""
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
