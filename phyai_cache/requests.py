"""Serving: requests with their own cache state on one shared model, and step-level batches.

A :class:`Request` is a run that a serving engine opens and closes itself (vLLM's request-scoped
KV slots are the model): it gets its own config, validated when it opens, its own per-branch state
and step counters and its own :class:`~phyai_cache.stats.RunStats`, and everything is freed when it
is closed or cancelled (a handle refuses to be disabled while requests are open). Many requests
can be open at once on one model.

A step-level batch is one transformer call carrying the current step of several requests: a list
of :class:`Row` says, in batch order, which request and CFG branch each group of rows belongs to
(``handle.batch(rows)``). Every row group steps its own request's counters and is decided on its own
rows; the native engine then runs the middle blocks only on the rows that must compute.

The :class:`RequestTable` owns the open requests of one model (in the spirit of vLLM's
``KVCacheManager``): the lifecycle opens requests in it, has it check each batch's rows, claims
them for the transformer call and releases them afterwards; a request closed while its call is in
flight is freed when the call ends, and one whose call failed beyond repair is marked failed.
"""

from __future__ import annotations

import itertools
import numbers
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .config import DiTCacheConfig
from .errors import CacheStateError, DiTCacheConfigError, RequestClosedError, RequestFailedError
from .stats import RunStats

if TYPE_CHECKING:
    from .runtime import RunState


class RunOwner(Protocol):
    """What the table needs from the lifecycle that runs its requests."""

    def open_run(self, config: DiTCacheConfig, num_inference_steps: int | None, request_id: str) -> RunState:
        """A new run with its backend state opened (raises, leaving nothing behind, if it cannot)."""

    def close_run(self, run: RunState, completed: bool) -> None:
        """Drop the run's backend state and finish its stats."""

    def run_bytes(self, run: RunState) -> int:
        """Tensor bytes the run's cache holds right now."""


class Request:
    """One request on a cache-enabled model; made by ``handle.open_request()``.

    ``stats`` is live while the request is open and final once it is closed. Use it as a context
    manager to close it on exit (cancelled if the block raised).
    """

    def __init__(self, table: RequestTable, run: RunState) -> None:
        self._table = table
        self._run = run

    @property
    def id(self) -> str:
        assert self._run.request_id is not None
        return self._run.request_id

    @property
    def config(self) -> DiTCacheConfig:
        return self._run.config

    @property
    def stats(self) -> RunStats:
        return self._run.stats

    @property
    def closed(self) -> bool:
        return not self._table.is_open(self._run)

    @property
    def failed(self) -> bool:
        """True when a failed transformer call left this request's state unrecoverable; its next
        batch raises :class:`~phyai_cache.errors.RequestFailedError` (close or cancel it)."""
        return self._table.failure_of(self._run) is not None

    @property
    def cache_bytes(self) -> int:
        """Tensor bytes this request's cache holds right now (0 once closed); safe to read from any
        thread while requests open, close and run."""
        return self._table.cache_bytes(self._run)

    def close(self) -> None:
        """Finish the request and free its cache state (a no-op when already closed)."""
        self._table.close(self._run, completed=True)

    def cancel(self) -> None:
        """Drop the request: its state is freed and its stats say it did not complete."""
        self._table.close(self._run, completed=False)

    def __enter__(self) -> Request:
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        self._table.close(self._run, completed=exc_type is None)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "failed" if self.failed else "open"
        return f"Request({self.id!r}, {state}, strategy={self.config.strategy!r}, enabled={self.config.enabled})"


@dataclass(frozen=True)
class Row:
    """``size`` consecutive batch rows of one request's CFG ``branch`` (e.g. ``"cond"``, ``"uncond"``)."""

    request: Request
    branch: str = "cond"
    size: int = 1


RowLike = Any  # a Row, or a (request, branch) / (request, branch, size) tuple


class RequestTable:
    """The serving requests open on one cache-enabled model: their runs, and which of them are in a
    transformer call, closing, or failed. Thread-safe: requests may open and close from any thread."""

    def __init__(self, owner: RunOwner) -> None:
        self._owner = owner
        self.lock = threading.RLock()  # held to keep requests from opening or closing meanwhile
        self._runs: dict[str, RunState] = {}  # open requests by id
        self._in_flight: set[int] = set()  # ids of the runs in the forward in progress
        self._closing: dict[int, bool] = {}  # closed during a forward: freed when it ends (completed?)
        self._failed: dict[int, str] = {}  # requests whose state a failed call left unrecoverable: why
        self._ids = itertools.count()

    # -- open and close ---------------------------------------------------------------------------

    def open(self, config: DiTCacheConfig, request_id: str | None, num_inference_steps: int | None) -> Request:
        """Open a request (its config and steps already checked); a clear error if the id is taken."""
        if request_id is not None and (not isinstance(request_id, str) or not request_id):
            raise DiTCacheConfigError("request_id", request_id, "a non-empty string, or None for a generated one")
        with self.lock:
            request_id = request_id or f"request-{next(self._ids)}"
            if request_id in self._runs:
                raise CacheStateError(f"request {request_id!r} is already open on this model")
            run = self._owner.open_run(config, num_inference_steps, request_id)
            self._runs[request_id] = run
        return Request(self, run)

    def close(self, run: RunState, completed: bool) -> None:
        """Free a request now, or when the forward it is part of ends (another thread may close it)."""
        with self.lock:
            if self._runs.get(run.request_id) is not run or id(run) in self._closing:
                return
            if id(run) in self._in_flight:
                self._closing[id(run)] = completed
                return
            self._free(run, completed)

    def _free(self, run: RunState, completed: bool) -> None:
        del self._runs[run.request_id]
        self._closing.pop(id(run), None)
        self._failed.pop(id(run), None)
        self._owner.close_run(run, completed)

    def refuse_removal(self) -> None:
        """Raise unless no request is held (the cache cannot be disabled under open requests)."""
        if self._runs:
            raise CacheStateError(f"cannot disable the cache while {len(self._runs)} request(s) are open "
                                  f"({', '.join(list(self._runs)[:4])}); close or cancel them first")

    # -- what a request is now ----------------------------------------------------------------------

    @property
    def open_ids(self) -> list[str]:
        with self.lock:
            return [rid for rid, run in self._runs.items() if id(run) not in self._closing]

    def is_open(self, run: RunState) -> bool:
        with self.lock:
            return self._runs.get(run.request_id) is run and id(run) not in self._closing

    def failure_of(self, run: RunState) -> str | None:
        """Why a failed call left this request unusable, or None."""
        with self.lock:
            return self._failed.get(id(run))

    def cache_bytes(self, run: RunState) -> int:
        return self._owner.run_bytes(run)

    # -- step-level batches -------------------------------------------------------------------------

    def describe(self, rows: Sequence[RowLike]) -> list[Row]:
        """Check a batch description before anything runs; every problem is a clear error."""
        if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence) or not rows:
            raise DiTCacheConfigError("rows", rows, "a non-empty list of Row(request, branch, size) in batch order")
        normalized, seen = [], set()
        for index, item in enumerate(rows):
            row = _as_row(item, index)
            if not isinstance(row.request, Request) or row.request._table is not self:
                raise CacheStateError(f"rows[{index}] names a request that was not opened on this cache handle")
            self._check_usable(row.request._run, index)
            if not isinstance(row.branch, str) or not row.branch:
                raise DiTCacheConfigError(f"rows[{index}].branch", row.branch, "a non-empty string such as 'cond'")
            if isinstance(row.size, bool) or not isinstance(row.size, int) or row.size < 1:
                raise DiTCacheConfigError(f"rows[{index}].size", row.size, "an integer >= 1")
            key = (row.request.id, row.branch)
            if key in seen:
                raise CacheStateError(f"rows[{index}]: request {row.request.id!r} branch {row.branch!r} appears "
                                      "twice in one batch; each (request, branch) is one step of that request")
            seen.add(key)
            normalized.append(row)
        return normalized

    @staticmethod
    def runs_of(rows: list[Row]) -> list[RunState]:
        """The runs of described rows, in row order."""
        return [row.request._run for row in rows]

    def claim(self, rows: list[Row], batch_size: int | None) -> list[RunState]:
        """Check the batch against the open requests and mark them in flight, before anything runs."""
        total = sum(row.size for row in rows)
        if batch_size is not None and batch_size != total:
            raise CacheStateError(f"the batch has {batch_size} rows but the row list describes {total} "
                                  f"({len(rows)} entries); describe every row of the batch, in order")
        with self.lock:
            runs = []
            for index, row in enumerate(rows):
                self._check_usable(row.request._run, index)
                runs.append(row.request._run)
            self._in_flight.update(id(run) for run in runs)
        return runs

    def release(self, runs: list[RunState]) -> None:
        """The forward of ``runs`` ended: free those closed meanwhile."""
        with self.lock:
            self._in_flight.clear()
            for run in runs:
                if id(run) in self._closing:
                    self._free(run, self._closing[id(run)])

    def fail(self, runs: list[RunState], reason: str) -> None:
        """Mark requests whose state a failed call left unrecoverable; their next batch raises."""
        with self.lock:
            for run in runs:
                self._failed.setdefault(id(run), reason)

    def _check_usable(self, run: RunState, index: int) -> None:
        """Refuse a row whose request was closed meanwhile (:class:`RequestClosedError`: drop the row) or
        failed (:class:`RequestFailedError`: close it)."""
        if not self.is_open(run):
            raise RequestClosedError(f"rows[{index}] names request {run.request_id!r}, which is closed")
        failure = self.failure_of(run)
        if failure is not None:
            raise RequestFailedError(f"rows[{index}] names request {run.request_id!r}, which failed: {failure}; "
                                     "its cache state is lost, close or cancel it")


def check_steps(value: Any) -> int | None:
    """``num_inference_steps`` of a request or run: None (unknown) or an integer >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise DiTCacheConfigError("num_inference_steps", value, "an integer >= 1, or None when unknown")
    return int(value)


def _as_row(item: RowLike, index: int) -> Row:
    if isinstance(item, Row):
        return item
    if isinstance(item, tuple) and 2 <= len(item) <= 3:
        return Row(*item)
    raise DiTCacheConfigError(f"rows[{index}]", item, "a Row or a (request, branch[, size]) tuple")


__all__ = ["Request", "RequestTable", "Row"]
