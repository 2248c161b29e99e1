"""Serving: requests with their own cache state on one shared model, and step-level batches.

A :class:`Request` is a run that a serving engine opens and closes itself (vLLM's request-scoped
KV slots are the model): it gets its own config, validated when it opens, its own per-branch state
and step counters and its own :class:`~phyai_cache.stats.RunStats`, and everything is freed when it
is closed, cancelled, or its handle is disabled. Many requests can be open at once on one model.

A step-level batch is one transformer call carrying the current step of several requests: a list
of :class:`Row` says, in batch order, which request and CFG branch each group of rows belongs to
(``handle.batch(rows)``). Every row group steps its own request's counters and is decided on its own
rows; the native engine then runs the middle blocks only on the rows that must compute.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import DiTCacheConfig
from .errors import CacheStateError, DiTCacheConfigError, RequestClosedError, RequestFailedError
from .stats import RunStats

if TYPE_CHECKING:
    from .lifecycle import Lifecycle
    from .runtime import RunState


class Request:
    """One request on a cache-enabled model; made by ``handle.open_request()``.

    ``stats`` is live while the request is open and final once it is closed. Use it as a context
    manager to close it on exit (cancelled if the block raised).
    """

    def __init__(self, lifecycle: Lifecycle, run: RunState) -> None:
        self._lifecycle = lifecycle
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
        return not self._lifecycle.is_open(self._run)

    @property
    def failed(self) -> bool:
        """True when a failed transformer call left this request's state unrecoverable; its next
        batch raises :class:`~phyai_cache.errors.RequestFailedError` (close or cancel it)."""
        return self._lifecycle.failure_of(self._run) is not None

    @property
    def cache_bytes(self) -> int:
        """Tensor bytes this request's cache holds right now (0 once closed); safe to read from any
        thread while requests open, close and run."""
        return self._lifecycle.request_bytes(self._run)

    def close(self) -> None:
        """Finish the request and free its cache state (a no-op when already closed)."""
        self._lifecycle.close_request(self._run, completed=True)

    def cancel(self) -> None:
        """Drop the request: its state is freed and its stats say it did not complete."""
        self._lifecycle.close_request(self._run, completed=False)

    def __enter__(self) -> Request:
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        self._lifecycle.close_request(self._run, completed=exc_type is None)

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


def normalize_rows(rows: Sequence[RowLike], lifecycle: Lifecycle) -> list[Row]:
    """Check a batch description before anything runs; every problem is a clear error."""
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence) or not rows:
        raise DiTCacheConfigError("rows", rows, "a non-empty list of Row(request, branch, size) in batch order")
    normalized, seen = [], set()
    for index, item in enumerate(rows):
        row = _as_row(item, index)
        if not isinstance(row.request, Request) or row.request._lifecycle is not lifecycle:
            raise CacheStateError(f"rows[{index}] names a request that was not opened on this cache handle")
        check_usable(row.request._run, lifecycle, index)
        if not isinstance(row.branch, str) or not row.branch:
            raise DiTCacheConfigError(f"rows[{index}].branch", row.branch, "a non-empty string such as 'cond'")
        if isinstance(row.size, bool) or not isinstance(row.size, int) or row.size < 1:
            raise DiTCacheConfigError(f"rows[{index}].size", row.size, "an integer >= 1")
        key = (row.request.id, row.branch)
        if key in seen:
            raise CacheStateError(f"rows[{index}]: request {row.request.id!r} branch {row.branch!r} appears twice "
                                  "in one batch; each (request, branch) is one step of that request")
        seen.add(key)
        normalized.append(row)
    return normalized


def check_usable(run: RunState, lifecycle: Lifecycle, index: int) -> None:
    """Refuse a row whose request was closed meanwhile (:class:`RequestClosedError`: drop the row) or
    failed (:class:`RequestFailedError`: close it)."""
    if not lifecycle.is_open(run):
        raise RequestClosedError(f"rows[{index}] names request {run.request_id!r}, which is closed")
    failure = lifecycle.failure_of(run)
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


__all__ = ["Request", "Row"]
