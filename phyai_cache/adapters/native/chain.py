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

Every block is patched at the instance level (``block.forward``); the decision runs in Python
around the blocks, never inside them, so blocks can be compiled regionally.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from ..._patch import InstancePatch
from ...blocks import BlockIO, BlockList
from ...errors import CacheStateError
from ...graphs import refuse_capture
from ...lifecycle import CallInfo, Lifecycle, RunState
from ..base import Installation
from ...schedule import CACHED
from .policy import BranchCache, ResidualHistory, StepSchedule, relative_l1


class ChainLayout:
    """The role of every block position for a given number of front and back blocks.

    With ``front_blocks=0`` (scheduled strategies) nothing runs before the decision, which is then
    taken when the chain starts.
    """

    def __init__(self, lists: list[BlockList], front_blocks: int, back_blocks: int) -> None:
        self.modules: list[torch.nn.Module] = []
        self.io: list[BlockIO] = []
        self.names: list[str] = []
        list_of_position: list[int] = []
        for list_index, block_list in enumerate(lists):
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


@dataclass
class NativeRunState:
    """Per-run state: one cache per branch, and the shared decisions when CFG is not separate."""

    branches: dict[str, BranchCache] = field(default_factory=dict)
    shared_decisions: dict[int, tuple[str, bool]] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(cache.nbytes() for cache in self.branches.values())


@dataclass
class ChainCall:
    """Working state of one transformer call while its blocks run."""

    cache: BranchCache
    next_position: int = 0
    skip: bool = False
    chain_input: torch.Tensor | None = None
    key: tuple | None = None
    segment_inputs: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)


class ChainInstallation(Installation):
    """The native engine applied to one transformer."""

    def __init__(self, layout: ChainLayout, schedule: StepSchedule, separate_cfg: bool,
                 lifecycle: Lifecycle, forecast_order: int | None = None) -> None:
        self.layout = layout
        self.schedule = schedule
        self.separate_cfg = separate_cfg
        self.lifecycle = lifecycle
        self.forecast_order = forecast_order
        self.measured = layout.front_blocks > 0  # else: scheduled, decided when the chain starts
        self.blocks_per_call = len(layout)
        self._patches: list[InstancePatch] = []
        try:
            for position, module in enumerate(layout.modules):
                forward = self._wrap(position, module.forward, layout.io[position])
                self._patches.append(InstancePatch(module, "forward", forward))
        except BaseException:
            self.remove()
            raise

    def begin_run(self, run: RunState) -> None:
        run.backend_state = NativeRunState()

    def end_run(self, run: RunState) -> None:
        run.backend_state = None

    def remove(self) -> None:
        for patch in reversed(self._patches):
            patch.restore()
        self._patches.clear()

    # -- the block wrapper ----------------------------------------------------------------------

    def _wrap(self, position: int, original: Any, io: BlockIO) -> Any:
        before = torch.compiler.disable(functools.partial(self._before, position, io))
        after = torch.compiler.disable(functools.partial(self._after, position, io))

        def forward(*args: Any, **kwargs: Any) -> Any:
            reused = before(args, kwargs)
            if reused is not _COMPUTE:
                return reused
            output = original(*args, **kwargs)
            after(output)
            return output

        # The decision stays in Python: under regional compilation (block.compile() or
        # torch.compile(block)) dynamo skips this wrapper and the two bookkeeping steps and traces
        # only the block's own forward.
        return torch.compiler.disable(forward, recursive=False)

    def _before(self, position: int, io: BlockIO, args: tuple, kwargs: dict) -> Any:
        """Bookkeeping before a block runs; returns its cached output, or _COMPUTE to run it."""
        call = self.lifecycle.current_call()
        if call is None:
            return _COMPUTE
        refuse_capture("cached block %s was called", self.layout.names[position])
        state = self._advance(call, position)
        if state.skip and self.layout.is_middle(position):
            return self._reuse(position, io, args, kwargs, state)
        if position == 0:
            state.chain_input = io.hidden_in(args, kwargs)
            state.key = _cache_key(state.chain_input, io.encoder_in(args, kwargs))
            if not self.measured:
                state.skip = self._decide(call, state, None)
                if state.skip:
                    return self._reuse(position, io, args, kwargs, state)
        segment = self.layout.segment_start.get(position)
        if segment is not None:
            state.segment_inputs[segment] = (io.hidden_in(args, kwargs), io.encoder_in(args, kwargs))
        return _COMPUTE

    def _after(self, position: int, io: BlockIO, output: Any) -> None:
        """Bookkeeping after a block ran: count it, decide after the front blocks, store residuals."""
        call = self.lifecycle.current_call()
        if call is None:
            return
        state: ChainCall = call.scratch
        call.blocks_computed += 1
        io.observe(output)
        if position == self.layout.decider:
            state.skip = self._decide(call, state, io.split(output)[0])
        segment = self.layout.segment_end.get(position)
        if segment is not None:
            self._store_residual(segment, io, output, state)

    def _advance(self, call: CallInfo, position: int) -> ChainCall:
        state: ChainCall | None = call.scratch
        if position == 0 and state is None:
            state = call.scratch = ChainCall(cache=self._branch_cache(call.branch))
        elif state is None or state.next_position != position:
            expected = 0 if state is None else state.next_position
            raise CacheStateError(
                f"transformer blocks ran out of order: {self.layout.names[position]} was called where "
                f"{self.layout.names[expected] if expected < len(self.layout) else 'the end of the chain'} "
                "was expected. The cache needs every block list to run once per call, in the order of the "
                "block spec; pass blocks=[...] in execution order"
            )
        state.next_position = position + 1
        return state

    def _branch_cache(self, branch: str) -> BranchCache:
        run_state: NativeRunState = self.lifecycle.run_state.backend_state
        return run_state.branches.setdefault(branch, BranchCache())

    # -- decision -------------------------------------------------------------------------------

    def _decide(self, call: CallInfo, state: ChainCall, front_output: torch.Tensor | None) -> bool:
        """Take this call's decision (after the front blocks, or at the chain start if scheduled)."""
        residual = self._front_residual(state, front_output) if self.measured else None
        cache = state.cache
        reason = self.schedule.gate(call.step, cache, state.key, self.layout.num_segments, self.measured)
        leader = self._leader(call)
        if reason is None and leader is not None:
            reason = CACHED if leader[1] else f"follows_{leader[0]}"
        elif reason is None and self.measured:
            call.diff = relative_l1(residual, cache.decision_residual)
            reason = self.schedule.judge(call.diff)
            if reason == CACHED:
                reason = self.schedule.limit(cache) or CACHED
        elif reason is None:
            reason = CACHED
        skip = reason == CACHED
        if not self.separate_cfg and leader is None:
            self.lifecycle.run_state.backend_state.shared_decisions[call.step] = (call.branch, skip)
        call.decision, call.reason = ("cached" if skip else "computed"), reason
        cache.record(skip)
        if not skip:
            if state.key != cache.key:
                cache.invalidate(state.key)
            cache.decision_residual = residual
        return skip

    def _front_residual(self, state: ChainCall, front_output: torch.Tensor) -> torch.Tensor:
        if front_output.shape != state.chain_input.shape:
            raise CacheStateError(
                f"the front blocks change the hidden-state shape ({tuple(state.chain_input.shape)} -> "
                f"{tuple(front_output.shape)}); use fewer front_blocks so the decision residual is defined"
            )
        return front_output - state.chain_input

    def _leader(self, call: CallInfo) -> tuple[str, bool] | None:
        """With shared CFG decisions, the (branch, skip) that another branch took at this step."""
        if self.separate_cfg:
            return None
        decision = self.lifecycle.run_state.backend_state.shared_decisions.get(call.step)
        return decision if decision is not None and decision[0] != call.branch else None

    # -- reuse and store ------------------------------------------------------------------------

    def _reuse(self, position: int, io: BlockIO, args: tuple, kwargs: dict, state: ChainCall) -> Any:
        hidden, encoder = io.hidden_in(args, kwargs), io.encoder_in(args, kwargs)
        segment = self.layout.segment_start.get(position)
        if segment is not None:
            step = self.lifecycle.run_state.current.step
            hidden_history, encoder_history = state.cache.segments[segment]
            hidden = hidden + hidden_history.predict(step)
            if encoder_history is not None and encoder is not None:
                encoder = encoder + encoder_history.predict(step)
        return io.make_output(hidden, encoder)

    def _store_residual(self, segment: int, io: BlockIO, output: Any, state: ChainCall) -> None:
        hidden_out, encoder_out = io.split(output)
        hidden_in, encoder_in = state.segment_inputs.pop(segment)
        if hidden_out.shape != hidden_in.shape:
            raise CacheStateError(
                f"blocks up to {self.layout.names[self._segment_end_position(segment)]} change the hidden-state "
                "shape inside one block list; such a list cannot be skipped as a whole"
            )
        run = self.lifecycle.run_state
        step = run.current.step
        has_encoder = encoder_out is not None and encoder_in is not None
        histories = state.cache.segments.get(segment)
        if histories is None:
            histories = (ResidualHistory(self.forecast_order),
                         ResidualHistory(self.forecast_order) if has_encoder else None)
            state.cache.segments[segment] = histories
        histories[0].update(step, hidden_out - hidden_in)
        if has_encoder and histories[1] is not None:
            histories[1].update(step, encoder_out - encoder_in)
        run.note_cache_bytes(run.backend_state.nbytes())

    def _segment_end_position(self, segment: int) -> int:
        return next(p for p, s in self.layout.segment_end.items() if s == segment)


_COMPUTE = object()  # sentinel: the block must run


def _cache_key(hidden: torch.Tensor, encoder: torch.Tensor | None) -> tuple:
    """What cached tensors are valid for: any change of shape, dtype or device invalidates them."""
    encoder_shape = tuple(encoder.shape) if encoder is not None else None
    return (tuple(hidden.shape), hidden.dtype, hidden.device, encoder_shape)
