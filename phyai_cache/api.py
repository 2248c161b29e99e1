"""The public entry points: :func:`enable_dit_cache`, :func:`disable_dit_cache`, :class:`CacheHandle`."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from . import objects
from .blocks import BlocksArg
from .config import ConfigSource, DiTCacheConfig, load_config, warn_if_calibrated_elsewhere, with_overrides
from .distributed import resolve_parallel
from .errors import CacheStateError
from .lifecycle import HANDLE_ATTR, Lifecycle, resolve_target
from .registry import registered_backends, resolve_backend
from .requests import Request, RowLike, check_steps
from .runtime import CacheTarget
from .stats import BatchStats, RunStats
from .target_checks import refuse_second_transformer

logger = logging.getLogger("phyai_cache")


class CacheHandle:
    """The cache applied to one target.

    Use ``handle.run()`` around one generation of a custom denoising loop and ``handle.branch()``
    around each CFG branch's transformer call; pipelines get both automatically. ``last_run`` holds
    the :class:`RunStats` of the most recent run. A handle is also a context manager that disables
    the cache on exit.
    """

    def __init__(self, target: CacheTarget, config: DiTCacheConfig, backend: str | None,
                 lifecycle: Lifecycle | None, plan_description: dict[str, Any] | None = None,
                 serve_later: Any = None) -> None:
        self._target = target
        self._config = config
        self._backend = backend
        self._lifecycle = lifecycle
        self._description = plan_description or {}
        # A handle disabled by its config: what installs the native engine when the first request
        # opens (a server's default is off, its requests bring their own configs or none).
        self._serve_later = serve_later

    @property
    def config(self) -> DiTCacheConfig:
        return self._config

    @property
    def backend(self) -> str | None:
        """The backend serving this cache (``None`` when the config is disabled)."""
        return self._backend

    @property
    def enabled(self) -> bool:
        """True while the cache is installed on the target."""
        return self._lifecycle is not None

    @property
    def last_run(self) -> RunStats | None:
        return self._lifecycle.last_run if self._lifecycle is not None else None

    def describe(self) -> dict[str, Any]:
        """Config, backend and what the backend installed (e.g. which blocks), for logs."""
        return {"backend": self._backend, "enabled": self.enabled, "config": self._config.to_dict(),
                "plan": dict(self._description)}

    @contextlib.contextmanager
    def run(self, num_inference_steps: int | None = None) -> Iterator[None]:
        """Scope one generation: cached state is created here and dropped on exit (also on error).

        Outside a run, transformer calls run uncached. ``num_inference_steps`` is recorded in the
        run's stats. With a disabled config this is a no-op scope.
        """
        num_inference_steps = check_steps(num_inference_steps)
        if self._lifecycle is None:
            yield
            return
        with self._lifecycle.run(num_inference_steps):
            yield

    @contextlib.contextmanager
    def branch(self, name: str) -> Iterator[None]:
        """Mark the transformer calls inside as one CFG branch (e.g. ``"cond"``, ``"uncond"``).

        Each branch keeps its own cached tensors and step counter within the run.
        """
        if self._lifecycle is None:
            yield
            return
        with self._lifecycle.branch(name):
            yield

    # -- serving: per-call overrides, requests, step-level batches (native engine) --------------

    @contextlib.contextmanager
    def override(self, config: ConfigSource = None, **overrides: Any) -> Iterator[None]:
        """Run the pipeline calls (or ``handle.run()`` scopes) inside with another config.

        ``config``/``overrides`` resolve like :func:`enable_dit_cache`'s (overrides apply on top of
        the handle's config when no ``config`` is given); validated before anything runs. The
        handle's own config is untouched afterwards. Native engine only.
        """
        with self._lifecycle_for("override").override(self._resolve(config, overrides)):
            yield

    def open_request(self, config: ConfigSource | bool = None, *, request_id: str | None = None,
                     num_inference_steps: int | None = None, **overrides: Any) -> Request:
        """Open a request with its own cache state on this shared model (native engine only).

        ``config``: a preset name, a mapping, a :class:`DiTCacheConfig`, ``None`` for the handle's
        config or ``False`` for none (served uncached, as ``enabled=False`` is), with ``overrides`` on
        top (``options`` merge into the source's). Validated here, ``num_inference_steps`` included: a
        request the engine cannot serve on this model raises before it exists. A handle whose own
        config is off installs the native engine at its first request. Close it with
        ``request.close()`` (or ``cancel()``, or use it as a context manager).
        """
        resolved = self._resolve(config, overrides)
        if self._lifecycle is None and self._serve_later is not None:
            self._install_for_requests()
        return self._lifecycle_for("open_request").open_request(resolved, request_id, num_inference_steps)

    @contextlib.contextmanager
    def batch(self, rows: Sequence[RowLike], *, per_row: bool = True) -> Iterator[None]:
        """Describe the transformer calls inside as step-level batches: ``rows`` are
        :class:`Row` (request, branch, size) in batch order. Each row group steps its own request and
        is decided on its own rows; with ``per_row=False`` the batch computes unless every group
        would cache (what peers do; for comparison). Checked before anything runs."""
        with self._lifecycle_for("batch").batch(rows, per_row):
            yield

    @property
    def open_requests(self) -> list[str]:
        """Ids of the requests open on this handle."""
        return self._lifecycle.requests.open_ids if self._lifecycle is not None else []

    @property
    def cache_bytes(self) -> int | None:
        """Tensor bytes the cache holds right now over every open run and request (0 when idle);
        None where the backend does not track it (upstream backends)."""
        if self._lifecycle is None or self._lifecycle.installation is None:
            return 0
        return self._lifecycle.installation.held_bytes()

    @property
    def last_batch(self) -> BatchStats | None:
        """What the most recent step-level batch forward did."""
        return self._lifecycle.last_batch if self._lifecycle is not None else None

    def _resolve(self, config: ConfigSource | bool, overrides: dict[str, Any]) -> DiTCacheConfig:
        if config is False:  # a request asking for no cache: served uncached, whatever the handle's default
            return load_config(None, **overrides)
        if config is None:
            return with_overrides(self._config, overrides)
        resolved = load_config(config, **overrides)
        warn_if_calibrated_elsewhere(resolved, self._target.transformer)  # a request's own preset, too
        return resolved

    def _install_for_requests(self) -> None:
        """Put the native engine on the target of a handle whose config is off, at its first request.
        Until then the target is untouched; from then on a call outside a request runs uncached."""
        target, blocks = self._serve_later
        lifecycle, description = _install(target, self._target, self._config, registered_backends()["native"], blocks)
        self._lifecycle, self._backend, self._description = lifecycle, "native", description
        self._serve_later = None
        _mark(self)

    def _lifecycle_for(self, operation: str) -> Lifecycle:
        if self._lifecycle is None:
            raise CacheStateError(f"handle.{operation}() needs an enabled cache: this handle is "
                                  + ("disabled by its config (enabled=False)" if self._backend is None
                                     else "no longer enabled (disable() was called)")
                                  + "; enable one with enable_dit_cache(target, enabled=True, backend='native', ...)")
        return self._lifecycle

    def disable(self) -> None:
        """Remove the cache; the target then behaves exactly as if it had never been enabled."""
        lifecycle = self._lifecycle
        if lifecycle is None:
            return
        objects.remove(lifecycle)  # beneath offload hooks added since
        for obj in self._target.objects:
            if obj.__dict__.get(HANDLE_ATTR) is self:
                del obj.__dict__[HANDLE_ATTR]
        self._lifecycle = self._serve_later = None

    def __enter__(self) -> CacheHandle:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.disable()

    def __repr__(self) -> str:
        state = "enabled" if self.enabled else "inactive"
        return f"CacheHandle({state}, backend={self._backend!r}, strategy={self._config.strategy!r})"


def enable_dit_cache(target: Any, config: ConfigSource = None, *, blocks: BlocksArg = None,
                     process_group: Any = None, cfg_group: Any = None, **overrides: Any) -> CacheHandle:
    """Apply a DiT cache to a pipeline or transformer and return its :class:`CacheHandle`.

    ``target``: a diffusers pipeline (caching per pipeline call), a diffusers transformer, or any
    ``torch.nn.Module`` together with ``blocks=`` naming its block lists (custom loops scope each
    generation with ``handle.run()``). ``config``: a :class:`DiTCacheConfig`, a mapping, a YAML path
    or a preset name; ``overrides`` are config fields applied on top.

    Multi-device runs (docs/distributed.md): ``process_group`` is the torch.distributed group (or
    1-D DeviceMesh) this rank's model call is sharded over (sequence/context or tensor parallel): the
    decision statistic is reduced over it, so all its ranks decide alike. A diffusers transformer
    after ``enable_parallelism`` names its own group; omit the argument then. ``cfg_group`` holds
    the ranks running the other CFG branches of the same generation (CFG parallel); its rank 0 must
    run the first branch (cond) and leads when ``separate_cfg`` is false. Data-parallel replicas
    pass neither. Either may be a :class:`~phyai_cache.distributed.Communicator` instead, e.g.
    phyai's own collectives: ``**phyai_collectives.cache_groups()``.

    A config with ``enabled=False`` (the default) changes nothing. Every check runs before the
    target is touched: on any error the target is left exactly as it was.
    """
    resolved = load_config(config, **overrides)
    cache_target = resolve_target(target)
    warn_if_calibrated_elsewhere(resolved, cache_target.transformer)
    _ensure_not_enabled(cache_target)
    cache_target.parallel = resolve_parallel(cache_target.transformer, process_group, cfg_group)
    if not resolved.enabled:
        _log_disabled(resolved, overrides)
        serve_later = (target, blocks) if resolved.backend in ("auto", "native") else None
        return CacheHandle(cache_target, resolved, None, None, serve_later=serve_later)

    backend = resolve_backend(resolved)
    lifecycle, description = _install(target, cache_target, resolved, backend, blocks)
    return _mark(CacheHandle(cache_target, resolved, backend.name, lifecycle, description))


def _install(target: Any, cache_target: CacheTarget, config: DiTCacheConfig, backend: Any,
             blocks: BlocksArg) -> tuple[Lifecycle, dict[str, Any]]:
    """Validate, then install ``backend`` on the target (atomic: on any error nothing changed)."""
    _ensure_not_enabled(cache_target)  # again for a handle installed at its first request
    refuse_second_transformer(target)
    plan = backend.prepare(cache_target, config, blocks)  # validation only, nothing changed yet
    lifecycle = Lifecycle(cache_target, config, backend.name)
    objects.install(lifecycle, plan)  # beneath offload hooks; atomic; footprint and copy guards
    logger.info("phyai_cache: enabled %s/%s on %s (%s)", backend.name,
                config.strategy if config.enabled else "disabled",
                type(cache_target.pipeline or cache_target.transformer).__name__, plan.describe())
    return lifecycle, plan.describe()


def _mark(handle: CacheHandle) -> CacheHandle:
    for obj in handle._target.objects:
        obj.__dict__[HANDLE_ATTR] = handle
    return handle


def disable_dit_cache(target: Any) -> None:
    """Remove the cache from ``target`` (the object passed to :func:`enable_dit_cache`, or the
    transformer of a cached pipeline). A target without a cache is left alone."""
    handle = get_cache_handle(target)
    if handle is not None:
        handle.disable()


def get_cache_handle(target: Any) -> CacheHandle | None:
    """The active :class:`CacheHandle` of ``target``, or None."""
    return getattr(target, "__dict__", {}).get(HANDLE_ATTR)


def _ensure_not_enabled(target: CacheTarget) -> None:
    for obj in target.objects:
        handle = get_cache_handle(obj)
        if handle is None:
            continue
        owner = handle._target.pipeline
        shared = obj is target.transformer and target.pipeline is not None and owner is not None
        if shared and owner is not target.pipeline:
            raise CacheStateError(
                f"phyai_cache is already enabled on this {type(obj).__name__} through another pipeline that shares it "
                f"({type(owner).__name__} at {id(owner):#x}, e.g. from from_pipe); one transformer carries one cache. "
                "Disable it there first (disable_dit_cache(other_pipe)), or give this pipeline its own transformer "
                "(copy.deepcopy before enabling); the other pipeline's calls run uncached and exact meanwhile")
        raise CacheStateError(
            f"phyai_cache is already enabled on this {type(obj).__name__}; "
            "call disable_dit_cache(target) before enabling again"
        )
    transformer = target.transformer
    if getattr(transformer, "is_cache_enabled", False):
        raise CacheStateError(
            f"{type(transformer).__name__} already has a diffusers cache enabled "
            "(transformer.enable_cache); disable it first"
        )
    if getattr(transformer, "_is_cached", False) or "_context_manager" in getattr(target.pipeline, "__dict__", {}):
        raise CacheStateError(
            f"{type(transformer).__name__} already has a Cache-DiT cache; call cache_dit.disable_cache first"
        )


def _log_disabled(config: DiTCacheConfig, overrides: dict[str, Any]) -> None:
    if overrides and set(overrides) != {"enabled"}:
        logger.warning("phyai_cache: config has settings (%s) but enabled=False; the target is unchanged",
                       ", ".join(sorted(overrides)))
    else:
        logger.info("phyai_cache: cache disabled by config (enabled=False); the target is unchanged")
