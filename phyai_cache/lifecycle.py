"""Per-run cache lifecycle: run scopes, the pipeline-call wrapper, branch and step tracking.

A *run* is one generation: one pipeline call, or one ``with handle.run():`` scope around a custom
denoising loop. A :class:`RunState` is created when the run starts and dropped when it ends (also
when it raises), and every cached tensor lives inside it, so nothing can leak from one prompt,
batch, resolution or device to the next.

Within a run, each transformer call is one step of one *branch*. The branch is, in order of
precedence: the name given with ``handle.branch(name)``; the name of the diffusers
``cache_context(name)`` the pipeline entered (``"cond"``/``"uncond"``); otherwise the call's
position within its denoising step (``"call0"``, ``"call1"``), where calls belong to the same step
when they see the same timestep object. Steps are counted per branch, so cond and uncond keep
separate state and separate step counters.

The pipeline call is intercepted by giving *that instance* its own subclass with a wrapping
``__call__`` (special methods are looked up on the type); the pipeline class itself is never
modified, so other instances of the class are unaffected.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import torch

from ._patch import ClassSwap, InstancePatch, UndoStack
from .adapters.base import Installation
from .config import DiTCacheConfig
from .errors import CacheStateError, DiTCacheConfigError
from .runtime import CacheTarget, CallInfo, RunState
from .stats import RunStats

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
    """Owns the run scopes of one cache-enabled target and the patches that create them."""

    def __init__(self, target: CacheTarget, config: DiTCacheConfig, backend: str) -> None:
        self.target = target
        self.config = config
        self.backend = backend
        self.installation: Installation | None = None
        self.run_state: RunState | None = None
        self.last_run: RunStats | None = None
        self._explicit_branch: str | None = None
        self._context_name: str | None = None
        self._undo = UndoStack()
        self._warned_outside_run = False

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
            if not patch.is_current():
                logger.warning("phyai_cache: %s.%s was replaced by someone else after the cache was enabled; "
                               "restoring the original anyway", type(patch.obj).__name__, patch.name)
            patch.restore()

        self._undo.push(restore)

    def uninstall(self) -> None:
        if self.run_state is not None:
            raise CacheStateError("cannot disable the cache while a run is in progress")
        self._undo.undo()

    @property
    def pipeline_context_name(self) -> str | None:
        """The diffusers ``cache_context`` name the pipeline has entered, if any."""
        return self._context_name

    def current_call(self) -> CallInfo | None:
        run = self.run_state
        return run.current if run is not None else None

    # -- run and branch scopes ----------------------------------------------------------------

    @contextlib.contextmanager
    def run(self, num_inference_steps: int | None = None) -> Iterator[RunState]:
        if self.run_state is not None:
            raise CacheStateError(
                "a run is already in progress on this target: runs cannot nest, and one cached "
                "pipeline or transformer cannot serve two generations at once (use one instance per thread)"
            )
        assert self.installation is not None
        stats = RunStats(backend=self.backend, strategy=self.config.strategy, num_inference_steps=num_inference_steps)
        run = RunState(stats, _device_of(self.target.transformer))
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
                run.clock.stop(stats)
                stats.completed = completed
                self.last_run = stats
                logger.info(stats.summary())

    @contextlib.contextmanager
    def branch(self, name: str) -> Iterator[None]:
        if not isinstance(name, str) or not name:
            raise DiTCacheConfigError("branch", name, "a non-empty string such as 'cond' or 'uncond'")
        previous = self._explicit_branch
        self._explicit_branch = name
        try:
            yield
        finally:
            self._explicit_branch = previous

    # -- wrappers -----------------------------------------------------------------------------

    def _wrap_forward(self, original: Any) -> Any:
        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            run = self.run_state
            if run is None or run.current is not None:
                if run is None:
                    self._warn_outside_run()
                return original(*args, **kwargs)
            call = run.begin_call(self._branch_for_call(run, kwargs), args, kwargs)
            raised = True
            try:
                with self.installation.call_context(call):
                    output = original(*args, **kwargs)
                raised = False
                return output
            finally:
                run.end_call(call, self.installation.blocks_per_call, raised)

        return forward

    def _wrap_cache_context(self, original: Any) -> Any:
        @contextlib.contextmanager
        def cache_context(name: str, *args: Any, **kwargs: Any) -> Iterator[None]:
            previous = self._context_name
            self._context_name = name
            try:
                with original(name, *args, **kwargs):
                    yield
            finally:
                self._context_name = previous

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

    def _branch_for_call(self, run: RunState, kwargs: dict[str, Any]) -> str:
        if self._explicit_branch is not None:
            return self._explicit_branch
        if self._context_name is not None:
            return self._context_name
        key = self._step_key(kwargs)
        return "default" if key is None else run.branch_by_step_key(key)

    def _step_key(self, kwargs: dict[str, Any]) -> Any:
        """An object that is identical for every call of one denoising step.

        diffusers pipelines keep the loop's timestep in ``_current_timestep``; a custom loop that
        passes the same ``timestep`` tensor to each branch call gives the same object too.
        """
        pipeline = self.target.pipeline
        if pipeline is not None:
            key = getattr(pipeline, "__dict__", {}).get("_current_timestep")
            if key is not None:
                return key
        return kwargs.get("timestep")

    def _warn_outside_run(self) -> None:
        if self._warned_outside_run:
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


def _device_of(module: torch.nn.Module) -> torch.device | None:
    for parameter in module.parameters():
        return parameter.device
    return None

