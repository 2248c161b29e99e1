"""The native engine's state for one run, and for one transformer forward: its row groups.

A forward of one run (no batch) is one :class:`Group` covering the whole batch. In a step-level
batch each (run, branch) is one group of consecutive rows, decided on its own rows with its own
run's rules and layout. This module holds what a group decides and keeps (:meth:`Group.commit`,
:meth:`Group.store_residual`), how a skipping group's rows are approximated after a block
(:meth:`Group.reused_rows`), and how one block's output is put together from the groups that ran
it and those that did not (:meth:`Forward.reused_output`, :meth:`Forward.merged_output`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from ...blocks import BlockIO
from ...decision import Decision, SharedDecisions, StepRules, cache_gap, decide, record, relative_l1
from ...errors import CacheStateError
from ...runtime import CallInfo
from .history import BranchCache
from .method import StepInputs
from .run_setup import ChainLayout, RunSetup


@dataclass
class NativeRunState:
    """Per-run state: the run's setup, one cache per branch, and the shared CFG decisions."""

    setup: RunSetup
    shared: SharedDecisions
    branches: dict[str, BranchCache] = field(default_factory=dict)
    rules: StepRules | None = None  # the setup's, or its calibrated schedule for this run's step count

    def __post_init__(self) -> None:
        if self.rules is None:
            self.rules = self.setup.rules

    def nbytes(self) -> int:
        return sum(cache.nbytes() for cache in list(self.branches.values()))  # list(): one C call, thread-safe

    def branch_cache(self, call: CallInfo) -> BranchCache:
        """The cache of ``call``'s branch, made (with the strategy's own statistic) at its first call."""
        cache = self.branches.setdefault(call.branch, BranchCache())
        if cache.method is None and self.setup.method is not None:
            cache.method = self.setup.method(self.setup.options, call.run)
        return cache


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
    inputs: StepInputs | None = None  # what the strategy's own statistic looks at (NativeSpec.statistic)
    segment_inputs: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    # Decided before the transformer call (options.skip_call): it runs every block, or, when it skips
    # the call but its rows are in it anyway, none (its rows pass through; the call's output for them
    # is replaced by the forecast, wholecall.run_whole_call_rows).
    ahead: bool = False
    position: float | None = None  # where the call lies on the forecaster's axis (its time or step)

    @property
    def layout(self) -> ChainLayout:
        return self.state.setup.layout

    def rows(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        whole = self.call.rows == slice(None)
        return tensor if tensor is None or whole else tensor[self.call.rows]

    def runs_block(self, position: int) -> bool:
        return not (self.skip and (self.ahead or self.layout.is_middle(position)))

    @property
    def refreshes(self) -> bool:
        """Computes this step and keeps what it computes (a disabled run keeps nothing)."""
        return self.skip is False and self.cache is not None

    # -- the decision ---------------------------------------------------------------------------

    def front_residual(self, front_output: torch.Tensor) -> torch.Tensor:
        if front_output.shape != self.chain_input.shape:
            raise CacheStateError(
                f"the front blocks change the hidden-state shape ({tuple(self.chain_input.shape)} -> "
                f"{tuple(front_output.shape)}); use fewer front_blocks so the decision residual is defined"
            )
        return front_output - self.chain_input

    def commit(self, decision: Decision) -> None:
        """Make ``decision`` this group's: the call's record, the branch's counters and what it keeps."""
        self.decision, self.skip = decision, decision.cached
        self.call.take(decision)
        if self.cache is None:
            return
        call = self.call
        record(decision, call.step, call.branch, self.cache, self.state.shared, self.key)
        setup = self.state.setup
        if not decision.cached and setup.measured:
            self.cache.decision_residual = self.residual
        if not decision.cached and setup.verify is not None and self.residual is not None:
            if self.cache.front is None:
                self.cache.front = setup.forecaster.history()
            self.cache.front.update(call.step, self.residual, self.position)
        if self.cache.method is not None and self.inputs is not None:
            self.cache.method.committed(self.inputs, decision)

    def verify(self, tolerance: float) -> str | None:
        """The verified forecaster's check of a step about to be cached: the front blocks' residual,
        forecast from the computed steps like the skipped blocks' residuals are, against the residual
        the front blocks really gave this step. Its relative L1 error is the step's estimated error.

        The idea is SpeCa's (Liu et al. 2025, "Speculative Feature Caching": forecast, verify cheaply,
        compute when the check fails). Here the check needs no extra block: it reuses the front
        blocks' output that fbcache/dbcache compute anyway (taylorseer runs one front block for it)."""
        history = self.cache.front
        if history is None or not history.factors or history.factors[0].shape != self.residual.shape:
            return "no_forecast"
        error = relative_l1(history.predict(self.call.step, self.position), self.residual)
        self.call.measures["forecast_error"] = error
        return None if error < tolerance else "forecast_error"

    # -- reuse and store ------------------------------------------------------------------------

    def reused_rows(self, position: int, hidden: torch.Tensor, encoder: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A skipping group's rows after a middle block: its input, plus the residual at a segment start."""
        segment = self.layout.segment_start.get(position)
        if segment is not None and not self.ahead:  # a whole-call skip passes through: its output is forecast
            hidden_history, encoder_history = self.cache.segments[segment]
            hidden = hidden + hidden_history.predict(self.call.step, self.position)
            if encoder_history is not None and encoder is not None:
                encoder = encoder + encoder_history.predict(self.call.step, self.position)
        return hidden, encoder

    def store_residual(self, segment: int, io: BlockIO, output: Any) -> None:
        """After a computed segment's last block: keep its residual (output minus the segment's input)."""
        hidden_out, encoder_out = io.split(output)
        hidden_out, encoder_out = self.rows(hidden_out), self.rows(encoder_out)
        hidden_in, encoder_in = self.segment_inputs.pop(segment)
        if hidden_out.shape != hidden_in.shape:
            raise CacheStateError(
                f"blocks up to {self.layout.names[_segment_end_position(self.layout, segment)]} change the "
                "hidden-state shape inside one block list; such a list cannot be skipped as a whole"
            )
        forecaster = self.state.setup.forecaster
        has_encoder = encoder_out is not None and encoder_in is not None
        histories = self.cache.segments.get(segment)
        if histories is None:
            histories = (forecaster.history(), forecaster.history() if has_encoder else None)
            self.cache.segments[segment] = histories
        histories[0].update(self.call.step, hidden_out - hidden_in, self.position)
        if has_encoder and histories[1] is not None:
            histories[1].update(self.call.step, encoder_out - encoder_in, self.position)
        self.call.run.note_cache_bytes(self.state.nbytes())


@dataclass
class BlockWork:
    """What the wrapper does with one block call: run it on all rows, on some, or on none."""

    running: list[Group]
    reused: Any = None  # the block's output when no row runs it
    index: torch.Tensor | None = None  # the rows that run it when only some do
    subset: tuple[tuple, dict] | None = None
    inputs: tuple[torch.Tensor, torch.Tensor | None] | None = None


@dataclass
class Forward:
    """The engine's working state for one transformer forward: its row groups."""

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

    # -- decisions ------------------------------------------------------------------------------

    def take(self, group: Group, measure: Any) -> None:
        """Decide one group; per-row batches commit at once, per-batch ones when all have decided."""
        setup, cache, call = group.state.setup, group.cache, group.call
        gap = cache_gap(group.key, cache.key, cache.has_cache(setup.layout.num_segments, setup.measured))
        if gap is None and cache.method is not None:
            gap = cache.method.gap(group.inputs)
        verify = None if setup.verify is None else functools.partial(group.verify, setup.verify)
        decision = decide(call.step, call.branch, group.state.rules, cache, group.state.shared, group.key, gap=gap,
                          measure=measure, commit=False, verify=verify)
        if self.per_row:
            group.commit(decision)
        else:
            group.decision = decision

    def finish_batch_decision(self) -> None:
        """Per-batch decisions (what peers do): the batch caches only if every group would."""
        if self.per_row or any(g.decision is None for g in self.groups):
            return
        if any(g.skip is not None for g in self.groups if g.state.setup.enabled and not g.ahead):
            return  # already committed
        everyone = all(g.decision.cached for g in self.groups)
        for group in self.groups:
            if group.state.setup.enabled and not group.ahead:
                group.commit(group.decision if everyone else group.decision.overruled("batch_computes"))

    # -- one block's output from the rows that ran it and those that did not ----------------------

    def reused_output(self, position: int, io: BlockIO, hidden: torch.Tensor, encoder: torch.Tensor | None) -> Any:
        """The block's output when no group runs it."""
        if len(self.groups) == 1:
            return io.make_output(*self.groups[0].reused_rows(position, hidden, encoder))
        if not any(position in g.layout.segment_start for g in self.groups):
            return io.make_output(hidden, encoder)  # every row passes through this block unchanged
        pieces = [g.reused_rows(position, g.rows(hidden), g.rows(encoder)) for g in self.groups]
        return io.make_output(*_concat(pieces))

    def merged_output(self, position: int, io: BlockIO, work: BlockWork, output: Any) -> Any:
        """The whole batch's output from the running groups' rows and the skipping groups' reuse."""
        computed_hidden, computed_encoder = io.split(output)
        hidden, encoder = work.inputs
        running = {id(g) for g in work.running}
        skipping = [g for g in self.groups if id(g) not in running]
        if not any(position in g.layout.segment_start for g in skipping):
            # The skipping rows pass through unchanged: write the computed rows into a copy of the input.
            hidden = hidden.index_copy(0, work.index, computed_hidden)
            if encoder is not None and computed_encoder is not None:
                encoder = encoder.index_copy(0, work.index, computed_encoder)
            return io.make_output(hidden, encoder)
        pieces, offset = [], 0
        for group in self.groups:
            if id(group) in running:
                size = group.chain_input.shape[0]
                part_encoder = computed_encoder[offset:offset + size] if computed_encoder is not None else None
                pieces.append((computed_hidden[offset:offset + size], part_encoder))
                offset += size
            else:
                pieces.append(group.reused_rows(position, group.rows(hidden), group.rows(encoder)))
        return io.make_output(*_concat(pieces))


def _concat(pieces: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = torch.cat([h for h, _ in pieces])
    encoders = [e for _, e in pieces]
    return hidden, (torch.cat(encoders) if all(e is not None for e in encoders) else None)


def _segment_end_position(layout: ChainLayout, segment: int) -> int:
    return next(p for p, s in layout.segment_end.items() if s == segment)
