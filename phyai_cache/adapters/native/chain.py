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

This module is the installation: the block wrappers and the order of the bookkeeping around each
block. :mod:`.run_setup` turns a config into a run's layout and rules, :mod:`.groups` holds a
forward's row groups (their decisions, what they keep, how their rows are merged) and
:mod:`.wholecall` the skipping of whole transformer calls.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..._patch import UndoStack
from ...blocks import BlockIO, BlockList
from ...config import DiTCacheConfig
from ...decision import Decision, SharedDecisions, cache_key, call_modes, relative_l1, relative_l1_groups
from ...errors import CacheStateError, DiTCacheConfigError
from ...graphs import refuse_capture
from ...runtime import CallInfo, CallSource, RunState, RunStates, TransformerCall
from ..base import Installation
from .groups import BlockWork, Forward, Group, NativeRunState
from .history import forecast_position
from .method import StepInputs
from .run_setup import RunSetup, check_shared_layout, run_setup, scheduled_rules
from .wholecall import run_whole_call, run_whole_call_rows

_MAX_SETUPS = 256  # distinct run configs whose setups are kept


class ChainInstallation(Installation):
    """The native engine applied to one transformer."""

    serves_requests = True

    def __init__(self, lists: list[BlockList], config: DiTCacheConfig, lifecycle: CallSource) -> None:
        self.lists = lists
        self.lifecycle = lifecycle
        self.parallel = lifecycle.target.parallel  # multi-rank: reduce the statistic, share CFG decisions
        self._setups: dict[DiTCacheConfig, RunSetup] = {}
        self.setup = self.setup_for(config)  # the handle's own config, checked at prepare time
        self.layout = self.setup.layout
        self.blocks_per_call = len(self.layout)
        self.runs: RunStates[NativeRunState] = RunStates()
        self._undo = UndoStack()
        try:
            for position, module in enumerate(self.layout.modules):
                self._undo.patch(module, "forward", self._wrap(position, module.forward, self.layout.io[position]))
        except BaseException:
            self.remove()
            raise

    def check_config(self, config: DiTCacheConfig) -> None:
        self.setup_for(config)

    def setup_for(self, config: DiTCacheConfig) -> RunSetup:
        """The setup of a run with ``config``; raises a clear error if the engine cannot run it here."""
        setup = self._setups.get(config)
        if setup is None:
            if len(self._setups) >= _MAX_SETUPS:  # a server with ever-new per-request configs
                self._setups = {self.setup.config: self.setup} if hasattr(self, "setup") else {}
            setup = run_setup(self.lists, config, self.lifecycle.target.transformer)
            if setup.streams and self.parallel is not None and self.parallel.group is not None:
                raise DiTCacheConfigError(
                    "options.streams", "worst", "'pooled' for a model sharded over process_group",
                    hint="per-stream measures slice the whole token sequence, which no rank holds here")
            self._setups[config] = setup
        return setup

    def begin_run(self, run: RunState) -> None:
        setup = self.setup_for(run.config)
        if setup.method is not None:
            setup.method.check_run(setup.options, run)
        shared = (SharedDecisions(enabled=not setup.separate_cfg) if self.parallel is None
                  else self.parallel.shared_decisions(enabled=not setup.separate_cfg))
        self.runs.open(run, NativeRunState(setup, shared, rules=scheduled_rules(setup, run)))

    def end_run(self, run: RunState) -> None:
        self.runs.close(run)

    def held_bytes(self) -> int:
        return sum(state.nbytes() for state in self.runs.values())

    def run_bytes(self, run: RunState) -> int:
        state = self.runs.get(run)
        return state.nbytes() if state is not None else 0

    def check_batch(self, runs: list[RunState], per_row: bool) -> None:
        if not per_row:
            check_shared_layout([self.runs[run].setup for run in runs])

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

    def _before(self, position: int, io: BlockIO, args: tuple, kwargs: dict) -> BlockWork | None:
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
            return BlockWork(running)
        if not running:
            return BlockWork(running, reused=forward.reused_output(position, io, hidden, encoder))
        index = forward.index_of(running, hidden.device)
        return BlockWork(running, index=index, subset=io.select_rows(args, kwargs, index, forward.batch),
                     inputs=(hidden, encoder))

    def _after(self, position: int, io: BlockIO, work: BlockWork, output: Any) -> Any:
        """Bookkeeping after a block ran: merge partial rows, count, decide, store residuals."""
        forward: Forward = self.lifecycle.current_forward().scratch
        io.observe(output)
        if work.subset is not None:
            output = forward.merged_output(position, io, work, output)
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
                group.store_residual(segment, io, output)
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
            if call.decided is not None:  # decided before the call (options.skip_call)
                groups.append(Group(call, state, None, decision=call.decided, skip=call.decided.cached, ahead=True))
                continue
            cache = state.branch_cache(call) if state.setup.enabled else None
            groups.append(Group(call, state, cache, position=self.position(state, call) if cache else None))
        return Forward(groups, per_row=current.per_row, batched=current.batched)

    def position(self, state: NativeRunState, call: CallInfo) -> float:
        """Where ``call`` lies on its run's forecast axis: its own rows' timestep, or its step index
        where no time can be read (warned once per run when the run asked for time)."""
        forecaster = state.setup.forecaster
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
            if not group.state.setup.enabled:
                group.commit(Decision(False, "disabled"))
            elif group.cache.method is not None:
                group.inputs = StepInputs(group.call, group.chain_input, group.call.rows, self.layout.modules[0],
                                          args, kwargs)
        # Strategies without front blocks decide here, before any block runs.
        starting = [g for g in forward.groups if g.decision is None and g.layout.front_blocks == 0]
        for group in starting:
            method = group.cache.method
            forward.take(group, measure=None if method is None else functools.partial(method.measure, group.inputs))
        forward.finish_batch_decision()

    # -- decision -------------------------------------------------------------------------------

    def _decide_measured(self, forward: Forward, groups: list[Group], front_hidden: torch.Tensor) -> None:
        """Decide ``groups`` after their front blocks, measuring all of them with one host sync."""
        for group in groups:
            group.residual = group.front_residual(group.rows(front_hidden))
        measurable = [g for g in groups if g.state.setup.measured and g.cache.decision_residual is not None
                      and g.cache.key == g.key]
        values: dict[int, float] = {}

        def over_ranks(points: list[Group]) -> Any:  # None in one process: the statistic as always
            return None if self.parallel is None else self.parallel.reducer([(g.state.shared, g.call) for g in points])

        def measure(group: Group) -> float:
            if group.state.setup.streams:
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
            forward.take(group, measure=functools.partial(measure, group) if group.state.setup.measured else None)
        forward.finish_batch_decision()

    def _worst_stream_change(self, group: Group) -> float:
        """The largest relative L1 change over the group's token streams (options.streams="worst").

        A policy model's action tokens are a few among many video tokens: pooled, their change hardly
        moves the statistic, yet the action is what a robot executes. Each stream present in this
        call is measured on its own tokens (``measures["change_<stream>"]``) and the worst decides."""
        signature = self.lifecycle.target.signature
        call, residual, reference = group.call, group.residual, group.cache.decision_residual
        tails = []
        for name in group.state.setup.streams:
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
        setup = self.runs[call.run].setup
        return setup.enabled and setup.skip_call
