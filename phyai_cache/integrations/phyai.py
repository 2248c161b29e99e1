"""phyai's runners and schedulers as the cache's client: one call attaches it.

phyai does not run diffusers pipelines. A *scheduler* runs one whole request per
``scheduler.step(request)`` (its denoising loop inside); a *runner* runs one transformer call of one
CFG branch per ``runner.forward(branch, hidden_states, timestep, ...)`` and forgets the previous
request at ``runner.reset()``. :func:`attach` maps those onto the cache's own notions:

* a **run** is one ``scheduler.step(request)``, declared with the request's ``num_inference_steps``;
* the **branch** of a transformer call is the runner's ``branch`` argument (by position or keyword);
* the **config** of a run is the request's own ``dit_cache`` attribute when it has one —
  ``None`` (or no such attribute): the engine default given to :func:`attach`; ``False``: no cache;
  a preset name, a mapping or a :class:`~phyai_cache.config.DiTCacheConfig`: that config — resolved
  and validated before the request's first step, so a bad value fails that request alone and leaves
  the model as it was;
* the **blocks** of phyai's model classes are known to the library (:mod:`phyai_cache.known_blocks`).

phyai's request dataclasses are not ours: the attribute is read if present, never written. Each
run's :class:`~phyai_cache.stats.RunStats` is :attr:`PhyaiCache.last_run` (and goes to ``on_stats``).
docs/phyai.md shows the few lines phyai's engine config, request, runner and scheduler need.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from .._patch import UndoStack
from ..api import CacheHandle, enable_dit_cache
from ..blocks import BlocksArg
from ..config import ConfigSource, DiTCacheConfig, load_config
from ..errors import BackendUnavailableError, CacheStateError, DiTCacheConfigError
from ..stats import RunStats
from . import phyai_graphs

logger = logging.getLogger("phyai_cache")

REQUEST_FIELD = "dit_cache"  # the attribute a phyai request may carry
OFF = DiTCacheConfig(enabled=False)
# The engine the runs are served by when the engine default is off: requests may still ask for a
# cache of their own, and a run with the default (disabled) config computes every block unchanged.
_SERVING_BASE = DiTCacheConfig(enabled=True, backend="native")


class PhyaiCache:
    """A cache attached to one phyai runner (and the scheduler that drives it, if any)."""

    def __init__(self, handle: CacheHandle, runner: Any, scheduler: Any, default: DiTCacheConfig,
                 on_stats: Callable[[Any, RunStats], None] | None) -> None:
        self.handle = handle
        self.runner = runner
        self.scheduler = scheduler
        self.default = default
        self.on_stats = on_stats
        self.last_run: RunStats | None = None
        self._undo = UndoStack()
        self._in_request = False
        self.graphs = phyai_graphs.captures_graphs(runner)  # decided at runner.forward (phyai_graphs)

    # -- one request ----------------------------------------------------------------------------

    def config_for(self, request: Any) -> DiTCacheConfig:
        """The config ``request`` runs with (see the module doc), checked against this model."""
        value = getattr(request, REQUEST_FIELD, None)
        if value is None:
            return self.default
        if value is False:
            return OFF
        if not isinstance(value, (str, Mapping, DiTCacheConfig)):
            raise DiTCacheConfigError(
                "<config>", value, "None (the engine default), False (no cache), a preset name, a mapping or a "
                "DiTCacheConfig", hint=f"the request's {REQUEST_FIELD} attribute")
        where = f"from the request's {REQUEST_FIELD} attribute"
        try:
            config = _native(load_config(value))
            self.handle._lifecycle_for("a phyai request").check_config(config)
            if self.graphs:
                phyai_graphs.check_config(config, self.runner)
        except DiTCacheConfigError as error:
            hint = "; ".join(filter(None, [error.hint, where]))
            raise DiTCacheConfigError(error.field, error.value, error.allowed, hint) from error
        except BackendUnavailableError as error:
            raise BackendUnavailableError(f"{error} ({where})") from error
        return config

    @contextlib.contextmanager
    def request(self, request: Any) -> Iterator[DiTCacheConfig]:
        """Scope one request: its config, its steps and its own cache state (dropped at exit).

        ``scheduler.step`` is wrapped in this; a caller driving a runner directly wraps its loop."""
        if self._in_request:
            raise CacheStateError("a phyai request is already running on this cache: one scheduler.step at a "
                                  "time per model (requests do not nest)")
        config = self.config_for(request)
        steps = _steps_of(request)
        self._in_request = True
        try:
            with self.handle.override(config), self.handle.run(num_inference_steps=steps):
                yield config
        finally:
            self._in_request = False
            self.last_run = self.handle.last_run
            if self.on_stats is not None and self.last_run is not None:
                self.on_stats(request, self.last_run)

    # -- the wrappers ---------------------------------------------------------------------------

    def _wrap_step(self, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def step(request: Any, *args: Any, **kwargs: Any) -> Any:
            with self.request(request):
                return original(request, *args, **kwargs)

        return step

    def _wrap_forward(self, original: Callable[..., Any], call: Callable[..., Any] | None = None) -> Callable[..., Any]:
        """``original`` (the runner's forward) with its branch named; it runs ``call`` (default: itself)."""
        branch_of = _branch_reader(self.runner)
        call = call or original

        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            branch = branch_of(args, kwargs)
            if not isinstance(branch, str) or not branch:
                raise CacheStateError(f"runner.forward got branch {branch!r}; phyai runners name each call's CFG "
                                      "branch ('cond', 'uncond') in their branch argument")
            with self.handle.branch(branch):
                return call(*args, **kwargs)

        return forward

    def _wrap_reset(self, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def reset(*args: Any, **kwargs: Any) -> Any:
            run = self.handle._lifecycle.run_state if self.handle._lifecycle is not None else None
            if run is not None and run.stats.steps_total:
                raise CacheStateError(
                    "runner.reset() inside a request that already ran transformer calls: reset starts a new "
                    "request, whose state must not mix with this one's; end the request scope first")
            return original(*args, **kwargs)

        return reset

    # -- lifetime -------------------------------------------------------------------------------

    def detach(self) -> None:
        """Take the cache off: the runner, scheduler and transformer behave exactly as before attach."""
        if self._in_request:
            raise CacheStateError("cannot detach the cache while a request is running")
        try:
            self._undo.undo()
        finally:
            self.handle.disable()

    def __enter__(self) -> PhyaiCache:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.detach()


def attach(target: Any, default: ConfigSource = None, *, blocks: BlocksArg = None, process_group: Any = None,
           cfg_group: Any = None, on_stats: Callable[[Any, RunStats], None] | None = None,
           **overrides: Any) -> PhyaiCache:
    """Attach a cache to a phyai scheduler (anything with ``.runner`` and ``step(request)``) or runner
    (``forward(branch, ...)``, ``reset()`` and ``.transformer``).

    ``default`` (+ ``overrides``) is the engine-wide config — phyai's engine config carries it as
    ``dit_cache`` — used by requests that do not set their own; ``None`` means no cache unless a
    request asks for one. ``blocks`` is needed only for a model class the library does not know;
    ``process_group`` / ``cfg_group`` as for :func:`~phyai_cache.enable_dit_cache`. Every check runs
    before anything is changed.
    """
    runner, scheduler = _runner_and_scheduler(target)
    default_config = _native(load_config(default, **overrides))
    # A runner replaying CUDA graphs is cached at its forward, which phyai_graphs stands for.
    graphed = phyai_graphs.RunnerCall.of(runner) if phyai_graphs.captures_graphs(runner) else None
    if graphed is not None:
        phyai_graphs.check_config(default_config, runner)
        blocks = phyai_graphs.runner_blocks(runner, blocks)
    base = default_config if default_config.enabled else _SERVING_BASE
    handle = enable_dit_cache(graphed if graphed is not None else runner.transformer, base, blocks=blocks,
                              process_group=process_group, cfg_group=cfg_group)
    cache = PhyaiCache(handle, runner, scheduler, default_config, on_stats)
    try:
        if graphed is not None:
            graphed.handle = handle
        cache._undo.patch(runner, "forward", cache._wrap_forward(runner.forward, graphed))
        cache._undo.patch(runner, "reset", cache._wrap_reset(runner.reset))
        if scheduler is not None:
            cache._undo.patch(scheduler, "step", cache._wrap_step(scheduler.step))
    except BaseException:
        cache.detach()
        raise
    logger.info("phyai_cache: attached to %s (default %s)", type(scheduler or runner).__name__,
                default_config.strategy if default_config.enabled else "off")
    return cache


def _native(config: DiTCacheConfig) -> DiTCacheConfig:
    """``config`` on the native engine: the one that serves each request with its own config."""
    if not config.enabled or config.backend == "native":
        return config
    if config.backend != "auto":
        raise DiTCacheConfigError("backend", config.backend, "'native' or 'auto' for phyai models",
                                  hint="phyai's runners serve each request with its own config, which only the "
                                       "native engine can do")
    return config.replace(backend="native")


def _runner_and_scheduler(target: Any) -> tuple[Any, Any]:
    phyai_graphs.refuse_whole_loop(target)
    runner = getattr(target, "runner", None)
    scheduler = target if runner is not None and callable(getattr(target, "step", None)) else None
    runner = runner if scheduler is not None else target
    parameters = phyai_graphs.forward_parameters(runner)
    if not isinstance(getattr(runner, "transformer", None), torch.nn.Module) or "branch" not in parameters \
            or not callable(getattr(runner, "reset", None)):
        raise DiTCacheConfigError(
            "target", f"<{type(target).__name__} object>",
            "a phyai scheduler (with .runner and step(request)) or runner (with .transformer, a forward taking "
            "a branch argument, and reset())")
    return runner, scheduler


def _branch_reader(runner: Any) -> Callable[[tuple, dict[str, Any]], Any]:
    """Reads a runner call's ``branch`` the way the runner's class does: by keyword, position or default
    (Cosmos3's runners take it first, Qwen-Image 2.1's as a keyword defaulting to "cond")."""
    parameters = dict(list(inspect.signature(type(runner).forward).parameters.items())[1:])  # self excluded
    positional = [name for name, p in parameters.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    position = positional.index("branch") if "branch" in positional else None
    default = parameters["branch"].default
    default = None if default is inspect.Parameter.empty else default

    def read(args: tuple, kwargs: dict[str, Any]) -> Any:
        if "branch" in kwargs:
            return kwargs["branch"]
        return args[position] if position is not None and position < len(args) else default

    return read



def _steps_of(request: Any) -> int | None:
    steps = getattr(request, "num_inference_steps", None)
    if steps is None:
        return None
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DiTCacheConfigError("num_inference_steps", steps, "a positive integer",
                                  hint="the request's num_inference_steps")
    return steps
