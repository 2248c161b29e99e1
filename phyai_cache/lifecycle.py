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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ._patch import ClassSwap, InstancePatch
from .errors import CacheStateError, DiTCacheConfigError
from .graphs import refuse_capture
from .stats import RunClock, RunStats, StepRecord

if TYPE_CHECKING:
    from .adapters.base import Installation
    from .config import DiTCacheConfig

logger = logging.getLogger("phyai_cache")

HANDLE_ATTR = "_phyai_cache_handle"


@dataclass
class CacheTarget:
    """What the cache is applied to: a transformer, and the pipeline that owns it if any."""

    transformer: torch.nn.Module
    pipeline: Any = None

    @property
    def kind(self) -> str:
        return "pipeline" if self.pipeline is not None else "module"

    @property
    def objects(self) -> list[Any]:
        return [o for o in (self.pipeline, self.transformer) if o is not None]


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


@dataclass
class CallInfo:
    """One transformer call in a run. Backends fill in the decision they took."""

    branch: str
    step: int
    blocks_computed: int = 0
    decision: str | None = None
    reason: str = ""
    diff: float | None = None
    scratch: Any = None  # the backend's per-call working state
    args: tuple = ()  # the transformer call's own arguments (references, not copies)
    kwargs: dict[str, Any] | None = None


class RunState:
    """Everything that exists for one run only."""

    def __init__(self, stats: RunStats, device: torch.device | None) -> None:
        self.stats = stats
        self.clock = RunClock(device)
        self.current: CallInfo | None = None
        self.backend_state: Any = None  # per-run state owned by the backend
        self._branch_steps: dict[str, int] = {}
        self._step_key: Any = None
        self._calls_in_step = 0

    def begin_call(self, branch: str, args: tuple = (), kwargs: dict[str, Any] | None = None) -> CallInfo:
        step = self._branch_steps.get(branch, 0)
        self._branch_steps[branch] = step + 1
        self.current = CallInfo(branch=branch, step=step, args=args, kwargs=kwargs)
        return self.current

    def end_call(self, call: CallInfo, blocks_per_call: int, raised: bool = False) -> None:
        self.current = None
        if raised and call.decision is None:
            call.decision, call.reason = "computed", "raised"
        elif call.decision is None:  # backends that do not report decisions: infer from block counts
            call.decision = "cached" if call.blocks_computed < blocks_per_call else "computed"
        self.stats.add(
            StepRecord(call.step, call.branch, call.decision, call.reason, call.diff, call.blocks_computed),
            blocks_per_call,
        )
        self.clock.sample()

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
        self._patches: list[InstancePatch] = []
        self._class_swap: ClassSwap | None = None
        self._warned_outside_run = False

    # -- installation -------------------------------------------------------------------------

    def install(self, installation: Installation) -> None:
        """Wrap the transformer call (and the pipeline call); undone by :meth:`uninstall`."""
        self.installation = installation
        transformer = self.target.transformer
        try:
            self._patches.append(InstancePatch(transformer, "forward", self._wrap_forward(transformer.forward)))
            if callable(getattr(transformer, "cache_context", None)):
                wrapped = self._wrap_cache_context(transformer.cache_context)
                self._patches.append(InstancePatch(transformer, "cache_context", wrapped))
            if self.target.pipeline is not None:
                self._class_swap = ClassSwap(self.target.pipeline, {"__call__": self._wrap_pipeline_call()})
        except BaseException:
            self.uninstall()
            raise

    def uninstall(self) -> None:
        if self.run_state is not None:
            raise CacheStateError("cannot disable the cache while a run is in progress")
        if self._class_swap is not None:
            self._class_swap.restore()
            self._class_swap = None
        for patch in reversed(self._patches):
            if not patch.is_current():
                logger.warning("phyai_cache: %s.%s was replaced by someone else after the cache was enabled; "
                               "restoring the original anyway", type(patch.obj).__name__, patch.name)
            patch.restore()
        self._patches.clear()

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
        refuse_capture("a cached run (%s/%s) was started", self.backend, self.config.strategy)
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
            refuse_capture("the cached transformer (%s/%s) was called", self.backend, self.config.strategy)
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

