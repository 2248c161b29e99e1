"""Exceptions raised by phyai_cache.

Every error is raised *before* anything on the target is changed, so catching one leaves the model
exactly as it was.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any


class PhyaiCacheError(Exception):
    """Base class of every phyai_cache error."""


class DiTCacheConfigError(PhyaiCacheError, ValueError):
    """An invalid cache configuration, block spec or target.

    ``field`` names the offending setting (``"threshold"``, ``"front_blocks"``, ``"target"`` ...),
    ``value`` is what was given and ``allowed`` says what would be accepted.
    """

    def __init__(self, field: str, value: Any, allowed: str, hint: str = "") -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        self.hint = hint
        message = f"dit_cache.{field}: got {_short_repr(value)}; allowed: {allowed}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class BackendUnavailableError(PhyaiCacheError, RuntimeError):
    """A requested backend or strategy does not exist at the installed library versions."""


class CacheStateError(PhyaiCacheError, RuntimeError):
    """An operation that does not fit the target's current cache state.

    Examples: enabling twice on the same target, or a model whose blocks do not run in the order the
    cache was built for.
    """


class RequestClosedError(CacheStateError):
    """A batch row names a request that was closed or cancelled meanwhile (by another thread, say a
    client disconnect). Nothing ran and nothing changed: a scheduler drops that row and goes on."""


class RequestFailedError(CacheStateError):
    """A request whose cache state could not be restored after a failed transformer call (see
    docs/serving.md, "Failed calls"); it cannot take another step. Close or cancel it."""


class DistributedCacheError(CacheStateError):
    """A cache collective across ranks failed or timed out, or ranks met at different decisions.

    Raised on the rank that waited; the message names the rank, the group's ranks and the step. The
    process group cannot be trusted afterwards (see docs/distributed.md).
    """


def did_you_mean(word: Any, choices: Sequence[str]) -> str:
    """``"did you mean 'x'?"`` for the closest of ``choices`` (case-insensitive), or ``""``."""
    if not isinstance(word, str):
        return ""
    by_lower = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f"did you mean {by_lower[close[0]]!r}?" if close else ""


class TargetChangedError(CacheStateError):
    """What the cache was installed on changed after enabling: ``pipe.transformer`` or a block list
    replaced, or a patched ``forward`` assigned anew. Raised at the start of the next run, instead of a
    run that would report success while nothing went through the cache. Fix: disable and enable again.
    """


class GraphCaptureError(CacheStateError):
    """A cached model was called while a CUDA stream was being captured into a graph.

    A captured graph replays the kernels of the path taken at capture time, so a cache decision made
    in Python during capture would be frozen into every replay. See :mod:`phyai_cache.graphs`.
    """


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
