"""Per-run cache lifecycle: run scopes, the pipeline-call wrapper, and the wrapped transformer call.

A *run* is one generation: one pipeline call, or one ``with handle.run():`` scope around a custom
denoising loop. A :class:`RunState` is created when the run starts and dropped when it ends (also
when it raises), and every cached tensor lives inside it, so nothing can leak from one prompt,
batch, resolution or device to the next.

Within a run, each transformer call is one step of one *branch* (named and counted by
:class:`~phyai_cache.branches.BranchNaming`), so cond and uncond keep separate state and separate
step counters.

The pipeline call is intercepted by giving *that instance* its own subclass with a wrapping
``__call__`` (special methods are looked up on the type); the pipeline class itself is never
modified, so other instances of the class are unaffected.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ._patch import ClassSwap, InstancePatch, UndoStack, in_forward_chain
from .adapters.base import Installation, Plan
from .branches import BranchNaming
from .config import DiTCacheConfig
from .errors import BackendUnavailableError, CacheStateError, DistributedCacheError, DiTCacheConfigError
from .graphs import refuse_capture
from .requests import Request, RequestTable, Row, RowLike, check_steps
from .runtime import CacheTarget, CallInfo, RunState, TransformerCall
from .stats import BatchStats, RunStats

logger = logging.getLogger("phyai_cache")

HANDLE_ATTR = "_phyai_cache_handle"


def resolve_target(target: Any) -> CacheTarget:
    """A diffusers-style pipeline (anything callable with a ``.transformer`` module) or a module."""
    if isinstance(target, torch.nn.Module):
        return CacheTarget(transformer=target)
    transformer = getattr(target, "transformer", None)
    if isinstance(transformer, torch.nn.Module) and callable(target):
        return CacheTarget(transformer=transformer, pipeline=target)
    raise DiTCacheConfigError(
        "target", f"<{type(target).__name__} object>",
        "a diffusers pipeline with a .transformer, a diffusers transformer, or a torch.nn.Module "
        "with blocks= describing its block lists",
    )


class Lifecycle:
    """Owns the run scopes of one cache-enabled target and the patches that create them; its serving
    requests are kept in a :class:`~phyai_cache.requests.RequestTable` (``requests``)."""

    def __init__(self, target: CacheTarget, config: DiTCacheConfig, backend: str) -> None:
        self.target = target
        self.config = config
        self.backend = backend
        self.installation: Installation | None = None
        self.run_state: RunState | None = None  # the run of a pipeline call or handle.run()
        self.last_run: RunStats | None = None
        self.last_batch: BatchStats | None = None
        self.requests = RequestTable(self)  # open serving requests
        self._forward: TransformerCall | None = None
        self._batch: tuple[list[Row], bool] | None = None
        self._override: DiTCacheConfig | None = None
        self.branches = BranchNaming(target)  # which branch and step each transformer call is
        self._undo = UndoStack()
        self._warned_outside_run = False
        self.installed_plan: Plan | None = None  # what was installed, to put the cache back after a copy (objects.py)
        self.footprint: Any = None  # what the cache is installed on, checked at every run start (objects.py)

    def check_target(self, operation: str) -> None:
        """Raise a clear error if what the cache is installed on was replaced since (objects.Footprint)."""
        if self.footprint is not None:
            self.footprint.check(operation)

    # -- installation -------------------------------------------------------------------------

    def install(self, installation: Installation) -> None:
        """Wrap the transformer call (and the pipeline call); undone by :meth:`uninstall`."""
        self.installation = installation
        transformer = self.target.transformer
        try:
            self._patch(transformer, "forward", self._wrap_forward(transformer.forward))
            if callable(getattr(transformer, "cache_context", None)):
                self._patch(transformer, "cache_context", self._wrap_cache_context(transformer.cache_context))
            if self.target.pipeline is not None:
                swap = ClassSwap(self.target.pipeline, {"__call__": self._wrap_pipeline_call()})
                self._undo.push(swap.restore)
        except BaseException:
            self._undo.undo()
            raise

    def _patch(self, obj: Any, name: str, value: Any) -> None:
        patch = InstancePatch(obj, name, value)

        def restore() -> None:
            if not patch.is_current() and not in_forward_chain(patch.obj, patch.value):
                logger.warning("phyai_cache: %s.%s was replaced by someone else after the cache was enabled; "
                               "left as it is", type(patch.obj).__name__, patch.name)
            patch.restore()  # takes the wrapper out of any hook chain that still holds it

        self._undo.push(restore)

    def patch_until_removed(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.name`` to ``value`` until the cache is removed (objects.py's copy guards)."""
        self._undo.patch(obj, name, value)

    def uninstall(self) -> None:
        if self.run_state is not None:
            raise CacheStateError("cannot disable the cache while a run is in progress")
        self.requests.refuse_removal()
        self._undo.undo()

    @property
    def pipeline_context_name(self) -> str | None:
        """The diffusers ``cache_context`` name the pipeline has entered, if any."""
        return self.branches.context_name

    def current_call(self) -> CallInfo | None:
        forward = self._forward
        return forward.single if forward is not None else None

    def current_forward(self) -> TransformerCall | None:
        return self._forward

    @contextlib.contextmanager
    def forward_unseen_by_blocks(self) -> Iterator[None]:
        """The block wrappers see no current forward inside (they pass through): for a forward that
        was decided before its blocks run (phyai's graph runner: eagerly, captured, or replayed)."""
        saved, self._forward = self._forward, None
        try:
            yield
        finally:
            self._forward = saved

    # -- run and branch scopes ----------------------------------------------------------------

    @contextlib.contextmanager
    def run(self, num_inference_steps: int | None = None) -> Iterator[RunState]:
        if self.run_state is not None:
            raise CacheStateError(
                "a run is already in progress on this target: runs cannot nest, and one cached "
                "pipeline or transformer cannot serve two generations at once (serve concurrent generations "
                "as requests: handle.open_request() and handle.batch())"
            )
        if self._batch is not None:
            raise CacheStateError("a pipeline call or handle.run() inside handle.batch(): batches carry requests only")
        self.check_target("a cached run" if self.target.pipeline is None else "a cached pipeline call")
        config = self._override or self.config
        refuse_capture("a cached run (%s/%s) was started", self.backend, config.strategy)
        run = self._new_run(config, num_inference_steps)
        self.run_state = run
        completed = False
        try:
            self.installation.begin_run(run)
            yield run
            completed = True
        finally:
            try:
                self.installation.end_run(run)
            finally:
                self.run_state = None
                self.last_run = self._finish_stats(run, completed)

    def _new_run(self, config: DiTCacheConfig, num_inference_steps: int | None,
                 request_id: str | None = None) -> RunState:
        assert self.installation is not None
        stats = RunStats(backend=self.backend, strategy=config.strategy if config.enabled else "disabled",
                         num_inference_steps=num_inference_steps)
        return RunState(stats, _device_of(self.target.transformer), config, request_id)

    @staticmethod
    def _finish_stats(run: RunState, completed: bool) -> RunStats:
        run.clock.stop(run.stats)
        run.stats.completed = completed
        if completed and not run.stats.reached_model:
            logger.warning(run.stats.summary())  # a run that never reached the model: never report it silently
        else:
            logger.info(run.stats.summary())
        return run.stats

    # -- per-call overrides, requests and step-level batches (native engine) ---------------------

    def check_config(self, config: DiTCacheConfig) -> None:
        """Raise a clear error unless a run with ``config`` can be served here; changes nothing."""
        assert self.installation is not None
        if not self.installation.serves_requests:
            raise BackendUnavailableError(
                f"per-call configs, requests and step-level batches need backend 'native'; this cache runs on "
                f"{self.backend!r}, which takes one decision per transformer call for the whole batch and keeps "
                "its state per model, not per request. Enable with backend='native' (or 'auto' for a native strategy)")
        self.installation.check_config(config)

    @contextlib.contextmanager
    def override(self, config: DiTCacheConfig) -> Iterator[None]:
        self.check_config(config)
        if self.run_state is not None:
            raise CacheStateError("handle.override() inside a run: wrap the whole pipeline call or handle.run()")
        previous, self._override = self._override, config
        try:
            yield
        finally:
            self._override = previous

    def open_request(self, config: DiTCacheConfig, request_id: str | None,
                     num_inference_steps: int | None) -> Request:
        num_inference_steps = check_steps(num_inference_steps)
        self.check_config(config)
        self.check_target("handle.open_request()")
        return self.requests.open(config, request_id, num_inference_steps)

    def open_run(self, config: DiTCacheConfig, num_inference_steps: int | None, request_id: str) -> RunState:
        """A request's run, its backend state opened (the request table's :class:`RunOwner`)."""
        run = self._new_run(config, num_inference_steps, request_id)
        self.installation.begin_run(run)
        return run

    def close_run(self, run: RunState, completed: bool) -> None:
        try:
            self.installation.end_run(run)
        finally:
            self._finish_stats(run, completed)

    def run_bytes(self, run: RunState) -> int:
        return (self.installation.run_bytes(run) or 0) if self.installation is not None else 0

    @contextlib.contextmanager
    def batch(self, rows: Sequence[RowLike], per_row: bool = True) -> Iterator[None]:
        assert self.installation is not None
        self.check_config(self.config)  # refuses non-native backends
        normalized = self.requests.describe(rows)
        if self.run_state is not None:
            raise CacheStateError("handle.batch() inside a pipeline call or handle.run(): a batch carries requests")
        self.check_target("handle.batch()")
        if self._batch is not None:
            raise CacheStateError("handle.batch() cannot nest")
        self.installation.check_batch(self.requests.runs_of(normalized), bool(per_row))
        self._batch = (normalized, bool(per_row))
        try:
            yield
        finally:
            self._batch = None

    @contextlib.contextmanager
    def branch(self, name: str) -> Iterator[None]:
        if not isinstance(name, str) or not name:
            raise DiTCacheConfigError("branch", name, "a non-empty string such as 'cond' or 'uncond'")
        previous = self.branches.explicit
        self.branches.explicit = name
        try:
            yield
        finally:
            self.branches.explicit = previous

    # -- wrappers -----------------------------------------------------------------------------

    def _wrap_forward(self, original: Any) -> Any:
        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            if self._forward is not None:  # a call made from inside the transformer's own forward
                return original(*args, **kwargs)
            if self._batch is not None:
                return self._batched_forward(original, args, kwargs)
            run = self.run_state
            if run is None:
                self._warn_outside_run()
                return original(*args, **kwargs)
            refuse_capture("the cached transformer (%s/%s) was called", self.backend, self.config.strategy)
            call = self.branches.begin_call(run, args, kwargs)
            self._forward = TransformerCall([call])
            raised = True
            try:
                with self.installation.call_context(call):
                    output = self.installation.run_call(call, original, args, kwargs)
                raised = False
                return output
            finally:
                self._forward = None
                run.end_call(call, self.installation.blocks_per_call, raised)

        return forward

    def _batched_forward(self, original: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        refuse_capture("the cached transformer (%s) was called in a step-level batch", self.backend)
        rows, per_row = self._batch
        runs = self.requests.claim(rows, _batch_size(self.target.signature.hidden_states(args, kwargs)))
        calls, start = [], 0
        for row, run in zip(rows, runs):
            calls.append(run.begin_call(row.branch, args, kwargs, rows=slice(start, start + row.size)))
            start += row.size
        forward = self._forward = TransformerCall(calls, batched=True, per_row=per_row)
        raised, restore = True, None
        try:
            restore = self.installation.checkpoint(calls)
            output = self.installation.run_batch(forward, original, args, kwargs)
            raised = False
            return output
        except BaseException as error:
            self._undo_failed_call(calls, restore, error)
            raise
        finally:
            self._forward = None
            for call in calls:
                call.run.end_call(call, self.installation.blocks_per_call, raised)
            self.last_batch = BatchStats.of(calls, start, self.installation.blocks_per_call)
            self.requests.release(runs)

    def _undo_failed_call(self, calls: list[CallInfo], restore: Any, error: BaseException) -> None:
        """A failed call costs its requests nothing: each is put back to its state from before the
        call, so the engine can retry the step. Where that is impossible (a collective failed, so the
        other ranks may have moved on; a backend that cannot checkpoint), the requests are marked
        failed and their next batch raises RequestFailedError."""
        if restore is not None and not isinstance(error, DistributedCacheError):
            restore()
            for call in calls:
                call.run.undo_call(call)
            return
        self.requests.fail([call.run for call in calls], f"its transformer call raised {type(error).__name__}: {error}")

    def _wrap_cache_context(self, original: Any) -> Any:
        @contextlib.contextmanager
        def cache_context(name: str, *args: Any, **kwargs: Any) -> Iterator[None]:
            previous = self.branches.context_name
            self.branches.context_name = name
            try:
                with original(name, *args, **kwargs):
                    yield
            finally:
                self.branches.context_name = previous

        return cache_context

    def _wrap_pipeline_call(self) -> Any:
        lifecycle = self
        base_call = type(self.target.pipeline).__call__
        signature = inspect.signature(base_call)

        @functools.wraps(base_call)
        def __call__(pipe: Any, *args: Any, **kwargs: Any) -> Any:
            with lifecycle.run(num_inference_steps=_steps_argument(signature, pipe, args, kwargs)):
                return base_call(pipe, *args, **kwargs)

        return __call__

    def _warn_outside_run(self) -> None:
        if self._warned_outside_run or not self.config.enabled:  # off by default: uncached is what was asked
            return
        self._warned_outside_run = True
        scope = "a pipeline call" if self.target.pipeline is not None else "`with handle.run():`"
        logger.warning("phyai_cache: transformer called outside %s; such calls run uncached "
                       "(a cache never carries over between generations)", scope)


def _steps_argument(signature: inspect.Signature, pipe: Any, args: tuple, kwargs: dict) -> int | None:
    try:
        bound = signature.bind_partial(pipe, *args, **kwargs)
    except TypeError:
        return None
    if "num_inference_steps" in bound.arguments:
        value = bound.arguments["num_inference_steps"]
    else:
        parameter = signature.parameters.get("num_inference_steps")
        value = parameter.default if parameter is not None else None
    return value if isinstance(value, int) else None


def _batch_size(hidden: Any) -> int | None:
    """The batch size of a transformer call, when its hidden states are one tensor."""
    return hidden.shape[0] if isinstance(hidden, torch.Tensor) and hidden.dim() > 0 else None


def _device_of(module: torch.nn.Module) -> torch.device | None:
    for parameter in module.parameters():
        return parameter.device
    return None

