"""The native block-cache engine: Fn front blocks decide, middle blocks are reused, Bn back blocks run.

All block lists of the model form one *chain* in execution order. Position ``p`` plays one role:

* front (``p < Fn``): always runs; after the last front block the step's decision is taken;
* middle: runs on computed steps; on cached steps it is skipped;
* back (the last ``Bn`` positions): always runs, on top of the approximated state.

The middle part is cut into *segments*, one per block list it touches. On a computed step each
segment stores its residual (its last block's output minus its first block's input, for the hidden
and, where the blocks return it, the encoder stream). On a cached step the first middle block of a
segment returns its input plus that residual and the other middle blocks return their inputs
unchanged, in the block's own output format. Keeping one residual per segment, instead of one for
the whole chain, keeps the model's own code between two block lists (for example a concatenation
of text and image tokens) correct on cached steps.

Step-level batches (serving): one transformer forward may carry rows of several runs (requests)
and CFG branches, each with its own config. Every group of rows of one (run, branch) is decided on
its own rows, with its own run's rules, and follows its own layout; at each block position only the
groups that must run it are gathered, run, and scattered back, and the others take their cached
residual. A forward of one run (no batch) is one group covering the whole batch and never gathers.

Every block is patched at the instance level (``block.forward``); the decision runs in Python
around the blocks, never inside them, so blocks can be compiled regionally.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..._patch import UndoStack
from ...blocks import BlockIO, BlockList, check_block_counts
from ...config import DiTCacheConfig
from ...decision import (
    Decision,
    SharedDecisions,
    StepRules,
    cache_gap,
    cache_key,
    call_modes,
    decide,
    record,
    relative_l1,
    relative_l1_groups,
)
from ...errors import CacheStateError, DiTCacheConfigError
from ...known_blocks import known_model
from ...runtime import CallInfo, CallSource, RunState, RunStates, TransformerCall
from ...strategies import get_strategy
from ...graphs import refuse_capture
from ..base import Installation
from .method import Method, StepInputs
from .policy import DEFAULT_FORECAST_AXIS, BranchCache, Forecaster, forecast_position
from .wholecall import check_latent_parameter, run_whole_call, run_whole_call_rows


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


_MAX_PLANS = 256  # distinct run configs whose plans are kept


@dataclass(frozen=True)
class RunPlan:
    """What one run needs from its config: its rules, the roles of the blocks, its method."""

    config: DiTCacheConfig
    enabled: bool
    layout: ChainLayout
    rules: StepRules | None = None
    measured: bool = True
    forecaster: Forecaster = Forecaster()  # taylorseer_order and options.forecast / forecast_axis
    separate_cfg: bool = True
    method: type[Method] | None = None  # the strategy's own statistic (NativeMethod.method)
    options: Mapping[str, Any] = field(default_factory=dict)  # checked against NativeMethod.options
    verify: float | None = None  # options.verify: the verified forecaster's tolerance
    skip_call: bool = False  # options.skip_call: cached steps skip the whole transformer call
    # options.streams == "worst" on a model with token streams (known_blocks.KnownModel.tail_streams):
    # the call arguments whose tokens follow the main ones; each stream is measured on its own.
    streams: tuple[str, ...] = ()


@dataclass
class NativeRunState:
    """Per-run state: the run's plan, one cache per branch, and the shared CFG decisions."""

    plan: RunPlan
    shared: SharedDecisions
    branches: dict[str, BranchCache] = field(default_factory=dict)
    rules: StepRules | None = None  # the plan's, or its calibrated schedule for this run's step count

    def __post_init__(self) -> None:
        if self.rules is None:
            self.rules = self.plan.rules

    def nbytes(self) -> int:
        return sum(cache.nbytes() for cache in list(self.branches.values()))  # list(): one C call, thread-safe


@dataclass
class Group:
    """The rows of one (run, branch) in one transformer forward, while its blocks run."""

    call: CallInfo
    state: NativeRunState
    cache: BranchCache | None  # None when the run's cache is disabled
    decision: Decision | None = None
    skip: bool | None = None  # None until the decision is committed
    chain_input: torch.Tensor | None = None
    key: tuple | None = None
    residual: torch.Tensor | None = None  # the front residual, kept as reference if computed
    inputs: StepInputs | None = None  # what the strategy's own statistic looks at (NativeMethod.method)
    segment_inputs: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    # Decided before the transformer call (options.skip_call): it runs every block, or, when it skips
    # the call but its rows are in it anyway, none (its rows pass through; the call's output for them
    # is replaced by the forecast, wholecall.run_whole_call_rows).
    ahead: bool = False
    position: float | None = None  # where the call lies on the forecaster's axis (its time or step)

    @property
    def layout(self) -> ChainLayout:
        return self.state.plan.layout

    def rows(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        whole = self.call.rows == slice(None)
        return tensor if tensor is None or whole else tensor[self.call.rows]

    def runs_block(self, position: int) -> bool:
        return not (self.skip and (self.ahead or self.layout.is_middle(position)))

    @property
    def refreshes(self) -> bool:
        """Computes this step and keeps what it computes (a disabled run keeps nothing)."""
        return self.skip is False and self.cache is not None


@dataclass
class Forward:
    """The engine's working state for one transformer forward."""

    groups: list[Group]
    per_row: bool
    batched: bool
    next_position: int = 0
    batch: int = 0
    _indices: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)

    def index_of(self, groups: list[Group], device: torch.device) -> torch.Tensor:
        """The batch rows of ``groups`` as an index tensor (made once per distinct group set)."""
        key = tuple(id(g) for g in groups)
        index = self._indices.get(key)
        if index is None:
            rows = [r for g in groups for r in range(*g.call.rows.indices(self.batch))]
            index = self._indices[key] = torch.tensor(rows, dtype=torch.long, device=device)
        return index


@dataclass
class _Work:
    """What the wrapper does with one block call: run it on all rows, on some, or on none."""

    running: list[Group]
    reused: Any = None  # the block's output when no row runs it
    index: torch.Tensor | None = None  # the rows that run it when only some do
    subset: tuple[tuple, dict] | None = None
    inputs: tuple[torch.Tensor, torch.Tensor | None] | None = None


class ChainInstallation(Installation):
    """The native engine applied to one transformer."""

    serves_requests = True

    def __init__(self, lists: list[BlockList], config: DiTCacheConfig, lifecycle: CallSource) -> None:
        self.lists = lists
        self.lifecycle = lifecycle
        self.parallel = lifecycle.target.parallel  # multi-rank: reduce the statistic, share CFG decisions
        self._plans: dict[DiTCacheConfig, RunPlan] = {}
        self.plan = self.plan_for(config)  # the handle's own config, checked at prepare time
        self.layout = self.plan.layout
        self.blocks_per_call = len(self.layout)
        self.runs: RunStates[NativeRunState] = RunStates()
        self._undo = UndoStack()
        try:
            for position, module in enumerate(self.layout.modules):
                self._undo.patch(module, "forward", self._wrap(position, module.forward, self.layout.io[position]))
        except BaseException:
            self.remove()
            raise

    def plan_for(self, config: DiTCacheConfig) -> RunPlan:
        """The plan of a run with ``config``; raises a clear error if the engine cannot run it here."""
        plan = self._plans.get(config)
        if plan is None:
            if len(self._plans) >= _MAX_PLANS:  # a server with ever-new per-request configs
                self._plans = {self.plan.config: self.plan} if hasattr(self, "plan") else {}
            plan = native_plan(self.lists, config, self.lifecycle.target.transformer)
            if plan.streams and self.parallel is not None and self.parallel.group is not None:
                raise DiTCacheConfigError(
                    "options.streams", "worst", "'pooled' for a model sharded over process_group",
                    hint="per-stream measures slice the whole token sequence, which no rank holds here")
            self._plans[config] = plan
        return plan

    def begin_run(self, run: RunState) -> None:
        plan = self.plan_for(run.config)
        if plan.method is not None:
            plan.method.check_run(plan.options, run)
        shared = (SharedDecisions(enabled=not plan.separate_cfg) if self.parallel is None
                  else self.parallel.shared_decisions(enabled=not plan.separate_cfg))
        self.runs.open(run, NativeRunState(plan, shared, rules=scheduled_rules(plan, run)))

    def end_run(self, run: RunState) -> None:
        self.runs.close(run)

    def held_bytes(self) -> int:
        return sum(state.nbytes() for state in self.runs.values())

    def run_bytes(self, run: RunState) -> int:
        state = self.runs.get(run)
        return state.nbytes() if state is not None else 0

    def check_batch(self, runs: list[RunState], per_row: bool) -> None:
        if not per_row:
            _check_one_layout([self.runs[run].plan for run in runs])

    def checkpoint(self, calls: list[CallInfo]) -> Any:
        """Every (run, branch) of a batch as it was before the call: its branch cache (or its absence)
        and the shared CFG decision of its step. Restored when the call raises."""
        saved = []
        for call in calls:
            state = self.runs[call.run]
            cache = state.branches.get(call.branch)
            saved.append((state, call.branch, None if cache is None else cache.snapshot(), call.step,
                          state.shared.by_step.get(call.step)))

        def restore() -> None:
            for state, branch, cache, step, shared in reversed(saved):
                if cache is None:
                    state.branches.pop(branch, None)
                else:
                    state.branches[branch] = cache
                if shared is None:
                    state.shared.by_step.pop(step, None)
                else:
                    state.shared.by_step[step] = shared

        return restore

    def remove(self) -> None:
        self._undo.undo()

    # -- the block wrapper ----------------------------------------------------------------------

    def _wrap(self, position: int, original: Any, io: BlockIO) -> Any:
        before = torch.compiler.disable(functools.partial(self._before, position, io))
        after = torch.compiler.disable(functools.partial(self._after, position, io))

        def forward(*args: Any, **kwargs: Any) -> Any:
            work = before(args, kwargs)
            if work is None:  # outside a run
                return original(*args, **kwargs)
            if not work.running:
                return work.reused
            if work.subset is None:
                return after(work, original(*args, **kwargs))
            return after(work, original(*work.subset[0], **work.subset[1]))

        # The decision stays in Python: under regional compilation (block.compile() or
        # torch.compile(block)) dynamo skips this wrapper and the two bookkeeping steps and traces
        # only the block's own forward.
        return torch.compiler.disable(forward, recursive=False)

    def _before(self, position: int, io: BlockIO, args: tuple, kwargs: dict) -> _Work | None:
        """Bookkeeping before a block runs: which groups run it, and the output of those that do not."""
        forward = self._advance(position)
        if forward is None:
            return None
        refuse_capture("cached block %s was called", self.layout.names[position])
        hidden, encoder = io.hidden_in(args, kwargs), io.encoder_in(args, kwargs)
        if forward.per_row and len(forward.groups) > 1 and position in self.layout.list_starts:
            # Refused at the first mixed batch, not the first step whose rows happen to differ.
            io.check_roles(args, kwargs, hidden.shape[0])
        if position == 0:
            self._start(forward, hidden, encoder, args, kwargs)
        running = [g for g in forward.groups if g.runs_block(position)]
        for group in running:
            segment = group.layout.segment_start.get(position)
            if segment is not None and group.refreshes:
                group.segment_inputs[segment] = (group.rows(hidden), group.rows(encoder))
        if len(running) == len(forward.groups):
            return _Work(running)
        if not running:
            return _Work(running, reused=self._reused_output(position, io, forward, hidden, encoder))
        index = forward.index_of(running, hidden.device)
        return _Work(running, index=index, subset=io.select_rows(args, kwargs, index, forward.batch),
                     inputs=(hidden, encoder))

    def _after(self, position: int, io: BlockIO, work: _Work, output: Any) -> Any:
        """Bookkeeping after a block ran: merge partial rows, count, decide, store residuals."""
        forward: Forward = self.lifecycle.current_forward().scratch
        io.observe(output)
        if work.subset is not None:
            output = self._merged_output(position, io, forward, work, output)
        for group in work.running:
            group.call.blocks_computed += 1
        deciding = [g for g in forward.groups if g.decision is None and g.layout.decider == position]
        if deciding:
            self._decide_measured(forward, deciding, io.split(output)[0])
        if position == len(self.layout) - 1:
            for group in forward.groups:
                if group.refreshes and group.cache.method is not None:
                    group.cache.method.computed(group.inputs, group.rows(io.split(output)[0]))
        for group in forward.groups:
            segment = group.layout.segment_end.get(position)
            if segment is not None and group.refreshes:
                self._store_residual(group, segment, io, output)
        return output

    def _advance(self, position: int) -> Forward | None:
        current = self.lifecycle.current_forward()
        if current is None:
            return None
        forward: Forward | None = current.scratch
        if position == 0 and forward is None:
            forward = current.scratch = self._new_forward(current)
        elif forward is None or forward.next_position != position:
            expected = 0 if forward is None else forward.next_position
            raise CacheStateError(
                f"transformer blocks ran out of order: {self.layout.names[position]} was called where "
                f"{self.layout.names[expected] if expected < len(self.layout) else 'the end of the chain'} "
                "was expected. The cache needs every block list to run once per call, in the order of the "
                "block spec; pass blocks=[...] in execution order"
            )
        forward.next_position = position + 1
        return forward

    def _new_forward(self, current: TransformerCall) -> Forward:
        groups = []
        for call in current.calls:
            state = self.runs[call.run]
            if isinstance(call.scratch, Decision):  # decided before the call (options.skip_call)
                groups.append(Group(call, state, None, decision=call.scratch, skip=call.scratch.cached, ahead=True))
                continue
            cache = self._branch_cache(state, call) if state.plan.enabled else None
            groups.append(Group(call, state, cache, position=self.position(state, call) if cache else None))
        return Forward(groups, per_row=current.per_row, batched=current.batched)

    def position(self, state: NativeRunState, call: CallInfo) -> float:
        """Where ``call`` lies on its run's forecast axis: its own rows' timestep, or its step index
        where no time can be read (warned once per run when the run asked for time)."""
        forecaster = state.plan.forecaster
        signature = self.lifecycle.target.signature
        time = signature.timestep_value(call.args, call.kwargs) if forecaster.axis == "time" else None
        if isinstance(time, torch.Tensor) and time.dim() > 0 and time.shape[0] > 1 and call.rows != slice(None):
            time = time[call.rows]  # a step-level batch: each row's request is at its own time
        position, is_time = forecast_position(forecaster, time, call.step)
        if forecaster.axis == "time" and forecaster.order and not is_time:
            call.run.warn_once("forecast_time_unread", self._unread_time_message(time))
        return position

    def _unread_time_message(self, time: Any) -> str:
        transformer = type(self.lifecycle.target.transformer).__name__
        found = (f"a {time.dtype} tensor" if isinstance(time, torch.Tensor) else type(time).__name__)
        return (f"phyai_cache: options.forecast_axis 'time' needs {transformer}'s calls to pass their timestep "
                f"({self.lifecycle.target.signature.describe_timestep()}) as a number or an integer, float32 or "
                f"float64 tensor; found {found}, so this run forecasts over the step index")

    def _branch_cache(self, state: NativeRunState, call: CallInfo) -> BranchCache:
        cache = state.branches.setdefault(call.branch, BranchCache())
        if cache.method is None and state.plan.method is not None:
            cache.method = state.plan.method(state.plan.options, call.run)
        return cache

    def _start(self, forward: Forward, hidden: torch.Tensor, encoder: torch.Tensor | None, args: tuple,
               kwargs: dict) -> None:
        """At the first block: check the rows, key every group, decide the groups that need no block."""
        forward.batch = hidden.shape[0]
        if forward.batched:
            covered = sum(len(range(*g.call.rows.indices(forward.batch))) for g in forward.groups)
            if forward.groups[-1].call.rows.stop != forward.batch or covered != forward.batch:
                raise CacheStateError(
                    f"the batch rows describe {forward.groups[-1].call.rows.stop} rows but the transformer's blocks "
                    f"got a batch of {forward.batch}; describe every row of the batch, in order")
        for group in forward.groups:
            group.chain_input = group.rows(hidden)
            if group.decision is not None:  # decided before the call
                continue
            modes = call_modes(group.call.args, group.call.kwargs)
            group.key = cache_key(group.chain_input, group.rows(encoder), modes)
            if not group.state.plan.enabled:
                self._commit(group, Decision(False, "disabled"))
            elif group.cache.method is not None:
                group.inputs = StepInputs(group.call, group.chain_input, group.call.rows, self.layout.modules[0],
                                          args, kwargs)
        # Strategies without front blocks decide here, before any block runs.
        starting = [g for g in forward.groups if g.decision is None and g.layout.front_blocks == 0]
        for group in starting:
            method = group.cache.method
            self._take(forward, group, measure=None if method is None else functools.partial(method.measure,
                                                                                               group.inputs))
        self._finish_batch_decision(forward)

    # -- decision -------------------------------------------------------------------------------

    def _decide_measured(self, forward: Forward, groups: list[Group], front_hidden: torch.Tensor) -> None:
        """Decide ``groups`` after their front blocks, measuring all of them with one host sync."""
        for group in groups:
            group.residual = self._front_residual(group, group.rows(front_hidden))
        measurable = [g for g in groups if g.state.plan.measured and g.cache.decision_residual is not None
                      and g.cache.key == g.key]
        values: dict[int, float] = {}

        def over_ranks(points: list[Group]) -> Any:  # None in one process: the statistic as always
            return None if self.parallel is None else self.parallel.reducer([(g.state.shared, g.call) for g in points])

        def measure(group: Group) -> float:
            if group.state.plan.streams:
                return self._worst_stream_change(group)
            if len(groups) == 1:  # one group: the plain statistic (bit-for-bit the solo figure)
                return relative_l1(group.residual, group.cache.decision_residual, over_ranks([group]))
            if not values:  # every measurable group's sums in one reduction (one collective on several ranks)
                stats = relative_l1_groups(torch.cat([g.residual for g in measurable]),
                                           torch.cat([g.cache.decision_residual for g in measurable]),
                                           [g.residual.shape[0] for g in measurable], over_ranks(measurable))
                values.update({id(g): v for g, v in zip(measurable, stats)})
            return values[id(group)]

        for group in groups:  # a scheduled strategy with a verified forecaster has front blocks but no measure
            self._take(forward, group, measure=functools.partial(measure, group) if group.state.plan.measured else None)
        self._finish_batch_decision(forward)

    def _worst_stream_change(self, group: Group) -> float:
        """The largest relative L1 change over the group's token streams (options.streams="worst").

        A policy model's action tokens are a few among many video tokens: pooled, their change hardly
        moves the statistic, yet the action is what a robot executes. Each stream present in this
        call is measured on its own tokens (``measures["change_<stream>"]``) and the worst decides."""
        signature = self.lifecycle.target.signature
        call, residual, reference = group.call, group.residual, group.cache.decision_residual
        tails = []
        for name in group.state.plan.streams:
            value = signature.read(call.args, call.kwargs, name)
            if isinstance(value, torch.Tensor) and value.dim() > 1:
                tails.append((name.removesuffix("_latents"), value.shape[1]))
        start = residual.shape[1] - sum(length for _, length in tails)
        changes = {"main": relative_l1(residual[:, :start], reference[:, :start])}
        for name, length in tails:
            changes[name] = relative_l1(residual[:, start:start + length], reference[:, start:start + length])
            start += length
        for name, change in changes.items():
            call.measures[f"change_{name}"] = change
        return max(changes.values())

    def _take(self, forward: Forward, group: Group, measure: Any) -> None:
        """Decide one group; per-row batches commit at once, per-batch ones when all have decided."""
        plan, cache, call = group.state.plan, group.cache, group.call
        gap = cache_gap(group.key, cache.key, cache.has_cache(plan.layout.num_segments, plan.measured))
        if gap is None and cache.method is not None:
            gap = cache.method.gap(group.inputs)
        verify = None if plan.verify is None else functools.partial(self._verify, group, plan.verify)
        decision = decide(call.step, call.branch, group.state.rules, cache, group.state.shared, group.key, gap=gap,
                          measure=measure, commit=False, verify=verify)
        if forward.per_row:
            self._commit(group, decision)
        else:
            group.decision = decision

    def _finish_batch_decision(self, forward: Forward) -> None:
        """Per-batch decisions (what peers do): the batch caches only if every group would."""
        if forward.per_row or any(g.decision is None for g in forward.groups):
            return
        if any(g.skip is not None for g in forward.groups if g.state.plan.enabled and not g.ahead):
            return  # already committed
        everyone = all(g.decision.cached for g in forward.groups)
        for group in forward.groups:
            if group.state.plan.enabled and not group.ahead:
                self._commit(group, group.decision if everyone else group.decision.overruled("batch_computes"))

    def _commit(self, group: Group, decision: Decision) -> None:
        group.decision, group.skip = decision, decision.cached
        group.call.take(decision)
        if group.cache is None:
            return
        call = group.call
        record(decision, call.step, call.branch, group.cache, group.state.shared, group.key)
        plan = group.state.plan
        if not decision.cached and plan.measured:
            group.cache.decision_residual = group.residual
        if not decision.cached and plan.verify is not None and group.residual is not None:
            if group.cache.front is None:
                group.cache.front = plan.forecaster.history()
            group.cache.front.update(call.step, group.residual, group.position)
        if group.cache.method is not None and group.inputs is not None:
            group.cache.method.committed(group.inputs, decision)

    def _verify(self, group: Group, tolerance: float) -> str | None:
        """The verified forecaster's check of a step about to be cached: the front blocks' residual,
        forecast from the computed steps like the skipped blocks' residuals are, against the residual
        the front blocks really gave this step. Its relative L1 error is the step's estimated error.

        The idea is SpeCa's (Liu et al. 2025, "Speculative Feature Caching": forecast, verify cheaply,
        compute when the check fails). Here the check needs no extra block: it reuses the front
        blocks' output that fbcache/dbcache compute anyway (taylorseer runs one front block for it)."""
        history = group.cache.front
        if history is None or not history.factors or history.factors[0].shape != group.residual.shape:
            return "no_forecast"
        error = relative_l1(history.predict(group.call.step, group.position), group.residual)
        group.call.measures["forecast_error"] = error
        return None if error < tolerance else "forecast_error"

    # -- whole-call skipping (options.skip_call) --------------------------------------------------

    def run_call(self, call: CallInfo, original: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        if not self._skips_calls(call):
            return original(*args, **kwargs)
        return run_whole_call(self, call, original, args, kwargs)

    def run_batch(self, forward: TransformerCall, original: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        ahead = [call for call in forward.calls if self._skips_calls(call)]
        if not ahead:
            return original(*args, **kwargs)
        return run_whole_call_rows(self, forward, ahead, original, args, kwargs)

    def _skips_calls(self, call: CallInfo) -> bool:
        plan = self.runs[call.run].plan
        return plan.enabled and plan.skip_call

    def _front_residual(self, group: Group, front_output: torch.Tensor) -> torch.Tensor:
        if front_output.shape != group.chain_input.shape:
            raise CacheStateError(
                f"the front blocks change the hidden-state shape ({tuple(group.chain_input.shape)} -> "
                f"{tuple(front_output.shape)}); use fewer front_blocks so the decision residual is defined"
            )
        return front_output - group.chain_input

    # -- reuse, merge and store -----------------------------------------------------------------

    def _reused_rows(self, position: int, group: Group, hidden: torch.Tensor, encoder: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A skipping group's rows after a middle block: its input, plus the residual at a segment start."""
        segment = group.layout.segment_start.get(position)
        if segment is not None and not group.ahead:  # a whole-call skip passes through: its output is forecast
            hidden_history, encoder_history = group.cache.segments[segment]
            hidden = hidden + hidden_history.predict(group.call.step, group.position)
            if encoder_history is not None and encoder is not None:
                encoder = encoder + encoder_history.predict(group.call.step, group.position)
        return hidden, encoder

    def _reused_output(self, position: int, io: BlockIO, forward: Forward, hidden: torch.Tensor,
                       encoder: torch.Tensor | None) -> Any:
        if len(forward.groups) == 1:
            return io.make_output(*self._reused_rows(position, forward.groups[0], hidden, encoder))
        if not any(position in g.layout.segment_start for g in forward.groups):
            return io.make_output(hidden, encoder)  # every row passes through this block unchanged
        pieces = [self._reused_rows(position, g, g.rows(hidden), g.rows(encoder)) for g in forward.groups]
        return io.make_output(*_concat(pieces))

    def _merged_output(self, position: int, io: BlockIO, forward: Forward, work: _Work, output: Any) -> Any:
        """The whole batch's output from the running groups' rows and the skipping groups' reuse."""
        computed_hidden, computed_encoder = io.split(output)
        hidden, encoder = work.inputs
        running = {id(g) for g in work.running}
        skipping = [g for g in forward.groups if id(g) not in running]
        if not any(position in g.layout.segment_start for g in skipping):
            # The skipping rows pass through unchanged: write the computed rows into a copy of the input.
            hidden = hidden.index_copy(0, work.index, computed_hidden)
            if encoder is not None and computed_encoder is not None:
                encoder = encoder.index_copy(0, work.index, computed_encoder)
            return io.make_output(hidden, encoder)
        pieces, offset = [], 0
        for group in forward.groups:
            if id(group) in running:
                size = group.chain_input.shape[0]
                part_encoder = computed_encoder[offset:offset + size] if computed_encoder is not None else None
                pieces.append((computed_hidden[offset:offset + size], part_encoder))
                offset += size
            else:
                pieces.append(self._reused_rows(position, group, group.rows(hidden), group.rows(encoder)))
        return io.make_output(*_concat(pieces))

    def _store_residual(self, group: Group, segment: int, io: BlockIO, output: Any) -> None:
        hidden_out, encoder_out = io.split(output)
        hidden_out, encoder_out = group.rows(hidden_out), group.rows(encoder_out)
        hidden_in, encoder_in = group.segment_inputs.pop(segment)
        if hidden_out.shape != hidden_in.shape:
            raise CacheStateError(
                f"blocks up to {self.layout.names[_segment_end_position(group.layout, segment)]} change the "
                "hidden-state shape inside one block list; such a list cannot be skipped as a whole"
            )
        forecaster = group.state.plan.forecaster
        has_encoder = encoder_out is not None and encoder_in is not None
        histories = group.cache.segments.get(segment)
        if histories is None:
            histories = (forecaster.history(), forecaster.history() if has_encoder else None)
            group.cache.segments[segment] = histories
        histories[0].update(group.call.step, hidden_out - hidden_in, group.position)
        if has_encoder and histories[1] is not None:
            histories[1].update(group.call.step, encoder_out - encoder_in, group.position)
        group.call.run.note_cache_bytes(group.state.nbytes())


def native_plan(lists: list[BlockList], config: DiTCacheConfig, model: torch.nn.Module | None = None) -> RunPlan:
    """How the native engine runs ``config`` on ``model`` with these block lists; raises a clear
    error naming the field when it cannot (the handle's config, a request's or an override's)."""
    from ...errors import BackendUnavailableError
    from ...strategies._options import validate as validate_options

    total = sum(len(block_list.blocks) for block_list in lists)
    if not config.enabled:
        return RunPlan(config, enabled=False, layout=ChainLayout(lists, 0, 0))
    if config.backend not in ("auto", "native"):
        raise DiTCacheConfigError("backend", config.backend, "'native' or 'auto' for a run on the native engine",
                                  hint="requests, step-level batches and per-call overrides are served by the native "
                                       "engine the cache was enabled with")
    spec = get_strategy(config.strategy)
    if spec.native is None:
        raise BackendUnavailableError(f"strategy {spec.name!r} is not available on backend 'native': "
                                      f"{spec.why_not('native')}")
    options = validate_options(spec.name, "native", spec.native.options, config.options)
    method = _method_class(spec.native.method) if spec.native.method else None
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
    return RunPlan(config, enabled=True, layout=ChainLayout(lists, front, back), rules=rules,
                   measured=spec.native.measured, forecaster=_forecaster(config, options),
                   separate_cfg=config.separate_cfg is not False,  # "auto" -> separate: always correct
                   method=method, options=options, verify=verify, skip_call=skip_call, streams=streams)


def _forecaster(config: DiTCacheConfig, options: Mapping[str, Any]) -> Forecaster:
    return Forecaster(config.taylorseer_order or 0, options.get("forecast", "taylor"),
                      options.get("forecast_axis", DEFAULT_FORECAST_AXIS))


def scheduled_rules(plan: RunPlan, run: RunState) -> StepRules | None:
    """options.schedule: the run's steps to compute, calibrated for its step count (``phyai-cache tune``
    searches them), as a compute mask; None (the plan's own rules) when the run's step count has no
    schedule, which is warned once per run: the interval then decides."""
    schedules = plan.options.get("schedule") if plan.enabled else None
    if not schedules:
        return None
    steps = run.stats.num_inference_steps
    computed = schedules.get(steps)
    if computed is None:
        run.warn_once("schedule_missing", f"phyai_cache: options.schedule has schedules for {sorted(schedules)} steps, "
                                          f"not for this run's {steps}; cache_interval="
                                          f"{plan.config.cache_interval} decides instead")
        return None
    mask = [1 if step in computed else 0 for step in range(steps)]
    return StepRules(plan.config.replace(compute_mask=mask, cache_interval=None, warmup_steps=0))


class _Calibrating(StepRules):
    """``options.calibrate``: every step computes, so the strategy's statistic sees an uncached run."""

    def must_compute(self, step: int) -> str | None:
        return "calibrate"


def _method_class(path: str) -> type[Method]:
    module, name = path.split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def _check_one_layout(plans: list[RunPlan]) -> None:
    # whole-call requests decide before the call, whatever the layout of the others
    layouts = {(p.layout.front_blocks, p.layout.back_blocks) for p in plans if p.enabled and not p.skip_call}
    if len(layouts) > 1:
        raise CacheStateError(
            f"per-batch decisions need every cached request of a batch to use the same front/back blocks "
            f"(got {sorted(layouts)}); use per-row decisions or batch such requests separately")


def _concat(pieces: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = torch.cat([h for h, _ in pieces])
    encoders = [e for _, e in pieces]
    return hidden, (torch.cat(encoders) if all(e is not None for e in encoders) else None)


def _segment_end_position(layout: ChainLayout, segment: int) -> int:
    return next(p for p, s in layout.segment_end.items() if s == segment)
