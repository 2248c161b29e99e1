"""The adapter protocol: what every backend provides to the front end.

An adapter is the only place that knows a backend's API. It works in two phases so that a bad
configuration never leaves a half-modified model behind:

1. :meth:`Backend.prepare` validates the config against the model and the installed version and
   returns a :class:`Plan`. It must not change anything.
2. :meth:`Plan.install` applies the plan and returns an :class:`Installation`, which the front end
   calls at run boundaries and finally removes. If ``install`` raises, it must have undone its own
   partial changes (an :class:`~phyai_cache._patch.UndoStack` does the bookkeeping).

Per-run state belongs to the run: an installation keeps it in a typed
:class:`~phyai_cache.runtime.RunStates`, opened in ``begin_run`` and closed in ``end_run``, so a new
run can never see an old run's tensors.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import DiTCacheConfig
from ..runtime import CacheTarget, CallInfo, CallSource, RunState, TransformerCall
from ..strategies import StrategySpec, all_strategies
from ..versions import backend_version


@dataclass(frozen=True)
class StrategySupport:
    """Whether a backend can serve a strategy at the installed version, and if not, why."""

    strategy: str
    available: bool
    reason: str = ""
    min_version: str | None = None


class Installation(ABC):
    """A backend applied to one target."""

    blocks_per_call: int = 0  # block forwards an uncached transformer call executes
    # Whether runs may bring their own config (requests, per-call overrides) and share a forward
    # (step-level batches). Only engines that decide per row group and keep state per run can.
    serves_requests: ClassVar[bool] = False

    def check_config(self, config: DiTCacheConfig) -> None:
        """Raise a clear error unless a run with ``config`` can be served here (``serves_requests``
        engines only); changes nothing."""
        raise NotImplementedError

    def held_bytes(self) -> int | None:
        """Tensor bytes the cache holds right now over all open runs; None when not tracked."""
        return None

    def run_bytes(self, run: RunState) -> int | None:
        """Tensor bytes one open run holds right now (0 when closed); None when not tracked."""
        return None

    def check_batch(self, runs: list[RunState], per_row: bool) -> None:
        """Refuse, before anything runs, a step-level batch these runs cannot share."""

    def checkpoint(self, calls: list[CallInfo]) -> Callable[[], None] | None:
        """Something that puts every run and branch of ``calls`` back to its state from before the
        transformer call (called when the call raised), or None when that is impossible."""
        return None

    def begin_run(self, run: RunState) -> None:
        """Called when a run starts, before the first transformer call."""

    def end_run(self, run: RunState) -> None:
        """Called when a run ends, also when it raised; must drop all per-run backend state."""

    def call_context(self, call: CallInfo) -> contextlib.AbstractContextManager[None]:
        """Entered around each transformer call of a run, after its branch and step are known.

        Upstream adapters use it to set the backend's own per-call state (e.g. a diffusers
        ``cache_context`` for pipelines that never set one) and to record ``call.decision``.
        """
        return contextlib.nullcontext()

    def run_call(self, call: CallInfo, original: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        """Run one transformer call of a run (inside :meth:`call_context`). An engine that can
        decide before the call may return a forecast output instead of running it."""
        return original(*args, **kwargs)

    def run_batch(self, forward: TransformerCall, original: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        """Run one step-level batch forward (``serves_requests`` engines). An engine that decides
        some row groups before the call may leave their rows out of it and return their forecast."""
        return original(*args, **kwargs)

    @abstractmethod
    def remove(self) -> None:
        """Undo everything ``install`` did, leaving the target exactly as it was before."""


class Plan(ABC):
    """A validated, not yet applied configuration of one backend for one target."""

    @abstractmethod
    def install(self, lifecycle: CallSource) -> Installation:
        ...

    def describe(self) -> dict[str, Any]:
        """What the plan will do, for logs and ``handle.describe()``."""
        return {}


class Backend(ABC):
    """A cache implementation behind the unified config."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def version(self) -> str | None:
        """Installed version of the backend's package; None when not installed."""
        return backend_version(self.name)

    def strategy_support(self, version: str | None) -> dict[str, StrategySupport]:
        """Support for every declared strategy at ``version``: the strategy's declaration says
        whether this backend serves it at all (and why not), :meth:`support` the rest."""
        return {spec.name: self.support(spec, version) if self.name in spec.backends
                else unsupported(spec.name, spec.why_not(self.name)) for spec in all_strategies()}

    @abstractmethod
    def support(self, spec: StrategySpec, version: str | None) -> StrategySupport:
        """Support at ``version`` for a strategy declared as served by this backend."""

    def supports(self, strategy: str) -> StrategySupport:
        return self.strategy_support(self.version())[strategy]

    @abstractmethod
    def prepare(self, target: CacheTarget, config: DiTCacheConfig, blocks: Any = None) -> Plan:
        """Validate ``config`` for ``target`` and return a plan; must not modify the target."""


def unsupported(strategy: str, reason: str, min_version: str | None = None) -> StrategySupport:
    return StrategySupport(strategy, False, reason, min_version)
