"""What a run is made of: the target, one run's state, one transformer call.

Shared by the lifecycle (which creates them) and the adapters (which read them); this module imports
neither, so there is no import circle between ``lifecycle.py`` and ``adapters/base.py``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import torch

from .calls import CallSignature
from .config import DiTCacheConfig
from .decision import Decision
from .stats import RunClock, RunStats, StepRecord

logger = logging.getLogger("phyai_cache")


ALL_ROWS = slice(None)


@dataclass
class CacheTarget:
    """What the cache is applied to: a transformer, and the pipeline that owns it if any."""

    transformer: torch.nn.Module
    pipeline: Any = None
    # The process groups the model is spread over (phyai_cache.distributed.ParallelLayout), resolved at
    # enable time; None for a model run by one process.
    parallel: Any = None

    @property
    def objects(self) -> list[Any]:
        return [o for o in (self.pipeline, self.transformer) if o is not None]

    @property
    def signature(self) -> CallSignature:
        """How the transformer's forward takes its arguments (read once per class)."""
        return CallSignature.of(self.transformer)


@dataclass
class CallInfo:
    """One transformer call in a run. Backends fill in the decision they took."""

    run: RunState
    branch: str
    step: int
    blocks_computed: int = 0
    decision: str | None = None
    reason: str = ""
    diff: float | None = None
    scratch: Any = None  # the backend's per-call working state (the diffusers drivers')
    decided: Decision | None = None  # taken before the call (native options.skip_call): the blocks obey it
    args: tuple = ()  # the transformer call's own arguments (references, not copies)
    kwargs: dict[str, Any] | None = None
    rows: slice = field(default_factory=lambda: ALL_ROWS)  # its rows of a step-level batch; else all
    measures: dict[str, float] = field(default_factory=dict)  # a strategy's per-step figures (StepRecord.measures)
    skipped_call: bool = False  # the whole transformer call was skipped (its output forecast)

    def take(self, decision: Decision) -> None:
        """Record a decision from :func:`phyai_cache.decision.decide` as this call's."""
        self.decision, self.reason, self.diff = decision.label, decision.reason, decision.diff


class RunState:
    """Everything the lifecycle keeps for one run only (backends keep theirs in :class:`RunStates`).

    A run is one generation: a pipeline call, a ``handle.run()`` scope, or a serving request opened
    with ``handle.open_request()``. ``config`` is the cache config it runs with (the handle's, a
    per-call override, or the request's own).
    """

    def __init__(self, stats: RunStats, device: torch.device | None, config: DiTCacheConfig,
                 request_id: str | None = None) -> None:
        self.stats = stats
        self.clock = RunClock(device)
        self.config = config
        self.request_id = request_id
        self._branch_steps: dict[str, int] = {}
        self._step_key: Any = None
        self._calls_in_step = 0

    def begin_call(self, branch: str, args: tuple = (), kwargs: dict[str, Any] | None = None,
                   rows: slice = ALL_ROWS) -> CallInfo:
        step = self._branch_steps.get(branch, 0)
        self._branch_steps[branch] = step + 1
        return CallInfo(run=self, branch=branch, step=step, args=args, kwargs=kwargs, rows=rows)

    def undo_call(self, call: CallInfo) -> None:
        """Take back the step ``call`` counted (its transformer call failed and is to be retried)."""
        self._branch_steps[call.branch] = call.step

    def end_call(self, call: CallInfo, blocks_per_call: int, raised: bool = False) -> None:
        if raised:  # whatever it had decided: the step did not happen (RunStats.calls_failed)
            call.decision, call.reason = "raised", "raised"
        elif call.decision is None:  # backends that do not report decisions: infer from block counts
            call.decision = "cached" if call.blocks_computed < blocks_per_call else "computed"
        self.stats.add(
            StepRecord(call.step, call.branch, call.decision, call.reason, call.diff, call.blocks_computed,
                       dict(call.measures), call.skipped_call),
            blocks_per_call,
        )
        self.clock.sample()

    def warn_once(self, code: str, message: str) -> None:
        """Log ``message`` as a warning the first time ``code`` happens in this run, and flag it in the
        run's stats (``RunStats.warnings``), so a run that went wrong is never reported as fine."""
        if code not in self.stats.warnings:
            self.stats.warnings[code] = message
            logger.warning(message)

    def note_cache_bytes(self, nbytes: int) -> None:
        self.stats.cache_bytes = max(self.stats.cache_bytes, nbytes)

    def branch_by_step_key(self, key: Any) -> str:
        """Name calls by their position within the step that ``key`` identifies."""
        if key is not None and key is self._step_key:
            self._calls_in_step += 1
        else:
            self._step_key = key
            self._calls_in_step = 0
        return f"call{self._calls_in_step}"


@dataclass
class TransformerCall:
    """One transformer forward: one :class:`CallInfo` per (run, branch) whose rows it computes.

    Outside step-level batches there is exactly one, covering the whole batch. In a batch
    (``handle.batch(rows)``), each call covers its own consecutive rows and decides on them alone;
    ``per_row=False`` makes the batch compute unless every call would cache (what peers do).
    """

    calls: list[CallInfo]
    batched: bool = False
    per_row: bool = True
    scratch: Any = None  # the engine's working state for this forward

    @property
    def single(self) -> CallInfo | None:
        return self.calls[0] if len(self.calls) == 1 and not self.batched else None


S = TypeVar("S")


class RunStates(Generic[S]):
    """An installation's own per-run state, one typed object per open run.

    Opened when a run begins and closed when it ends (also when it raised), so an installation can
    never hand one run's tensors to another.
    """

    def __init__(self) -> None:
        self._states: dict[int, tuple[RunState, S]] = {}

    def open(self, run: RunState, state: S) -> S:
        self._states[id(run)] = (run, state)
        return state

    def __getitem__(self, run: RunState) -> S:
        return self._states[id(run)][1]

    def close(self, run: RunState) -> S | None:
        entry = self._states.pop(id(run), None)
        return entry[1] if entry is not None else None

    def __len__(self) -> int:
        return len(self._states)

    def get(self, run: RunState) -> S | None:
        entry = self._states.get(id(run))
        return entry[1] if entry is not None else None

    def values(self) -> list[S]:
        # list() copies the dict in one C call (the GIL is held throughout): safe to call from a
        # metrics thread while requests open and close.
        return [state for _, state in list(self._states.values())]


class CallSource(Protocol):
    """What an installation needs from the lifecycle that drives it."""

    target: CacheTarget

    def current_call(self) -> CallInfo | None:
        """The transformer call in progress inside a run, or None (outside runs: run uncached)."""

    def current_forward(self) -> TransformerCall | None:
        """The transformer forward in progress with all its calls (one per batch row group)."""

    @property
    def pipeline_context_name(self) -> str | None:
        """The diffusers ``cache_context`` name the pipeline has entered, if any."""
