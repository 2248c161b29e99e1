"""Cache-DiT applied to one transformer, driven per run and branch by phyai_cache's lifecycle.

One Cache-DiT context per (run, branch), created on the branch's first call and dropped when the run
ends (also when it raised); a router on ``forward`` lets only calls announced by ``call_context`` go
through Cache-DiT; removal restores exactly what ``enable_cache`` changed on the instance dict
(package docstring: why).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch

from ..._patch import DictSnapshot, splice_forward
from ...config import DiTCacheConfig
from ...decision import SharedDecisions
from ...errors import CacheStateError
from ...instrument import BlockCounter
from ...runtime import CallInfo, CallSource, RunState, RunStates
from ...stats import tensor_bytes
from ..base import Installation
from .model import ChainSpec
from .options import CacheSettings

# Cache-DiT records -2.0 as the "diff" of a step whose residual shape changed (and -1.0 / -0.0 for
# thresholds >= 1 / <= 0, which it does not measure).
_DIFF_SHAPE_CHANGED = -2.0


@dataclasses.dataclass
class _RunContexts:
    """The cache-dit contexts of one run, one per branch, and the shared CFG decisions."""

    shared: SharedDecisions
    contexts: dict[str, Any] = dataclasses.field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(tensor_bytes(*(t for t in ctx.buffers.values() if isinstance(t, torch.Tensor)))
                   for ctx in self.contexts.values())


@dataclasses.dataclass
class _Before:
    """A branch context's counters just before a call, to explain a 'computed' decision afterwards."""

    cached_total: int
    streak: int
    accumulated_diff: float

    @classmethod
    def read(cls, context: Any, step: int) -> _Before:
        cached = context.cached_steps
        streak = context.continuous_cached_steps if cached and cached[-1] == step - 1 else 0
        return cls(len(cached), streak, context.accumulated_residual_diff)


class CacheDiTInstallation(Installation):
    """Cache-DiT applied to one transformer, driven per run and branch by our lifecycle."""

    def __init__(self, chain: ChainSpec, config: DiTCacheConfig, settings: CacheSettings,
                 lifecycle: CallSource) -> None:
        self.chain = chain
        self.settings = settings
        self.separate_cfg = config.separate_cfg is not False  # "auto": per branch, always correct
        self.lifecycle = lifecycle
        self.transformer = lifecycle.target.transformer
        self.blocks_per_call = len(chain)
        self.runs: RunStates[_RunContexts] = RunStates()
        self._armed = False
        self._counter: BlockCounter | None = None
        self._restore: _InstanceRestore | None = None
        self._manager: Any = None
        self._context_name = ""
        try:
            # Innermost first: the counters sit on the blocks before cache-dit wraps anything, so they
            # count block forwards that really run.
            self._counter = BlockCounter(chain.modules, lifecycle)
            self._restore = _InstanceRestore(self.transformer)
            self._enable_cache_dit()
        except BaseException:
            if self._restore is not None:
                self._restore.record_changes()  # whatever a failed enable_cache left behind
            self.remove()
            raise

    def _enable_cache_dit(self) -> None:
        import cache_dit

        class_forward = type(self.transformer).__dict__.get("forward")
        plain_forward = self.transformer.forward
        with _quiet_cache_dit():
            adapter = self._block_adapter()
            # Returns the adapter (a list for a bare transformer): never assign anything from it.
            cache_dit.enable_cache(adapter, cache_config=cache_dit.DBCacheConfig(**self.settings.cache_fields))
        if type(self.transformer).__dict__.get("forward") is not class_forward:
            # Never expected (we apply no PatchFunctor), but a class patch would leak to every instance.
            _restore_class_attribute(type(self.transformer), "forward", class_forward)
            raise CacheStateError(
                f"cache-dit replaced {type(self.transformer).__name__}.forward on the class; restored and refused")
        self._restore.record_changes()
        self._manager = self.transformer.__dict__["_context_manager"]
        self._context_name = adapter.unique_blocks_name[0][0]
        self._manager.clear_contexts()  # no state exists between runs; runs create their own
        self._restore.set(self.transformer, "forward", self._router(self.transformer.forward, plain_forward))

    def _block_adapter(self) -> Any:
        from cache_dit import BlockAdapter, ForwardPattern
        from cache_dit.caching import FakeDiffusionPipeline

        # A class of our own per installation: cache-dit sets `_is_cached` on the pipe's *class*.
        placeholder = type("FakeDiffusionPipeline", (FakeDiffusionPipeline,), {"__module__": __name__})
        lists = self.chain.lists
        modules = torch.nn.ModuleList(self.chain.modules)  # a new list object; the user's lists stay as they are
        return BlockAdapter(
            pipe=placeholder(self.transformer),
            transformer=self.transformer,
            blocks=modules,
            blocks_name=lists[0].path,
            dummy_blocks_names=[block_list.path for block_list in lists[1:]],
            forward_pattern=getattr(ForwardPattern, self.chain.pattern),
            # Our counters wrap block.forward as (*args, **kwargs); the pattern was derived in prepare().
            check_forward_pattern=False,
            check_num_outputs=False,
            has_separate_cfg=False,
        )

    def _router(self, cached_forward: Any, plain_forward: Any) -> Any:
        """Only calls announced by call_context() go through cache-dit; all others run uncached."""

        @functools.wraps(plain_forward)
        def forward(*args: Any, **kwargs: Any) -> Any:
            if self._armed:
                self._armed = False
                return cached_forward(*args, **kwargs)
            return plain_forward(*args, **kwargs)

        return forward

    # -- runs -----------------------------------------------------------------------------------

    def begin_run(self, run: RunState) -> None:
        self.runs.open(run, _RunContexts(SharedDecisions(enabled=not self.separate_cfg)))

    def end_run(self, run: RunState) -> None:
        self._armed = False
        contexts = self.runs.close(run)
        if contexts is not None:
            for context in contexts.contexts.values():
                context.clear_buffers()
        if self._manager is not None:
            self._manager.clear_contexts()
        _remove_cache_dit_stats(self.transformer)
        if self._restore is not None:
            self._restore.restore_module_order()

    @contextlib.contextmanager
    def call_context(self, call: CallInfo) -> Iterator[None]:
        contexts = self.runs[call.run]
        context = self._context_for(contexts, call.branch)
        self._extend_mask(context, call.step)
        before = _Before.read(context, call.step)
        leader = contexts.shared.leader(call.step, call.branch)
        self._armed = True
        try:
            with _forced_threshold(context, None if leader is None else (1.0 if leader[1] else 0.0)):
                yield
        finally:
            self._armed = False
        self._record(call, context, before, leader, contexts)

    def _context_for(self, contexts: _RunContexts, branch: str) -> Any:
        """The branch's context, registered under the name cache-dit's block wrapper looks up."""
        context = contexts.contexts.get(branch)
        if context is None:
            from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

            calibrator = None
            if self.settings.taylorseer_order is not None:
                calibrator = TaylorSeerCalibratorConfig(taylorseer_order=self.settings.taylorseer_order)
            fields = copy.deepcopy(self.settings.cache_fields)
            if self.settings.active_steps is not None:
                fields["steps_computation_mask"] = []  # grown per step in _extend_mask
            context = self._manager.new_context(name=self._context_name, cache_config=DBCacheConfig(**fields),
                                                calibrator_config=calibrator)
            contexts.contexts[branch] = context
        self._manager._cached_context_manager[self._context_name] = context
        return context

    def _extend_mask(self, context: Any, step: int) -> None:
        """Grow the branch's steps_computation_mask to cover ``step`` (1 = must compute).

        Built step by step from the run's real calls, so it is right for any step count, known or
        not. Warmup steps are 1 too: cache-dit shortens warmup to the mask's leading run of 1s.
        """
        if self.settings.active_steps is None:
            return
        start, end = self.settings.active_steps
        mask = context.cache_config.steps_computation_mask
        while len(mask) <= step:
            position = len(mask)
            forced = position < self.settings.warmup_steps or position < start or (end is not None and position >= end)
            mask.append(1 if forced else 0)

    def _record(self, call: CallInfo, context: Any, before: _Before, leader: tuple[str, bool] | None,
                contexts: _RunContexts) -> None:
        if context.get_current_step() != call.step:
            raise CacheStateError(
                f"cache-dit counted step {context.get_current_step()} where phyai_cache counted step {call.step} "
                f"of branch {call.branch!r}: the transformer did not run its cached blocks exactly once")
        cached = bool(context.cached_steps) and context.cached_steps[-1] == call.step
        raw = context.residual_diffs.get(str(call.step))
        call.decision = "cached" if cached else "computed"
        call.diff = raw if leader is None and _is_measured(raw) else None
        call.reason = self._reason(context, cached, raw, before, leader)
        if leader is None:
            contexts.shared.record(call.step, call.branch, cached)
        call.run.note_cache_bytes(contexts.nbytes())

    def _reason(self, context: Any, cached: bool, raw: float | None, before: _Before,
                leader: tuple[str, bool] | None) -> str:
        config = context.cache_config
        if context.is_in_warmup():
            return "warmup"
        if context.is_in_full_compute_steps():
            return "inactive"
        if leader is not None:
            return SharedDecisions.follow_reason(leader) if not cached else "cached"
        if cached:
            return "cached"
        if raw == _DIFF_SHAPE_CHANGED:
            return "shape_changed"
        if _is_measured(raw):
            return "above_threshold"
        if 0 <= config.max_cached_steps <= before.cached_total:
            return "max_cached"
        if 0 <= config.max_continuous_cached_steps <= before.streak:
            return "max_consecutive"
        budget = getattr(config, "max_accumulated_residual_diff_threshold", None)
        if budget is not None and budget > 0 and before.accumulated_diff >= budget:
            return "max_accumulated_diff"
        if config.residual_diff_threshold <= 0:
            return "above_threshold"  # threshold 0: never caches, not measured by cache-dit
        return "no_cache"

    # -- removal --------------------------------------------------------------------------------

    def remove(self) -> None:
        self._armed = False
        if self._manager is not None:
            self._manager.clear_contexts()
            self._manager = None
        if self._restore is not None:
            _remove_cache_dit_stats(self.transformer)
            self._restore.restore()
            self._restore = None
        if self._counter is not None:
            self._counter.remove()
            self._counter = None


# -- helpers ------------------------------------------------------------------------------------


def _is_measured(raw: float | None) -> bool:
    """A real relative-L1 value, not one of cache-dit's sentinels (-0.0, -1.0, -2.0)."""
    return raw is not None and raw >= 0 and math.copysign(1.0, raw) > 0


@contextlib.contextmanager
def _forced_threshold(context: Any, threshold: float | None) -> Iterator[None]:
    """Make a follower branch take the leader's decision: cache-dit caches at threshold >= 1 (still
    subject to warmup, active steps and caps) and never at 0, without measuring either way."""
    if threshold is None:
        yield
        return
    config = context.cache_config
    own = config.residual_diff_threshold
    config.residual_diff_threshold = threshold
    try:
        yield
    finally:
        config.residual_diff_threshold = own


class _InstanceRestore:
    """Remembers what cache-dit changes in a module's instance dict, and puts it back exactly.

    Only the keys that ``enable_cache`` (and we) changed are restored, so attributes the user sets
    while the cache is on are left alone. The order of the submodules is restored too: cache-dit
    swaps the block lists with ``unittest.mock.patch.object`` on every call, which deletes and
    re-adds them, moving them to the end of ``_modules`` (and of ``named_modules()``/``state_dict()``).
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self._snapshot = DictSnapshot([module])
        self._modules_before = list(module._modules.items())
        self._changed: set[str] = set()
        self._set: dict[str, Any] = {}

    def record_changes(self) -> None:
        self._changed |= self._snapshot.changed(self.module)

    def set(self, obj: torch.nn.Module, name: str, value: Any) -> None:
        obj.__dict__[name] = value
        self._changed.add(name)
        self._set[name] = value

    def restore_module_order(self) -> None:
        """Put the submodules back in registration order (keeping any the user added since, last)."""
        modules = self.module._modules
        order = [name for name, _ in self._modules_before if name in modules]
        if list(modules)[: len(order)] == order:
            return
        items = [(name, modules[name]) for name in order] + [(k, v) for k, v in modules.items() if k not in order]
        modules.clear()
        modules.update(items)

    def restore(self) -> None:
        forward = self._set.get("forward")
        if forward is not None and self.module.__dict__.get("forward") is not forward:
            # Another hook wrapped ours since (e.g. group offload added after the cache): take ours out
            # of its chain and leave its forward in place.
            splice_forward(self.module, forward, self._snapshot.before(self.module, "forward"))
            self._changed.discard("forward")
        self._snapshot.restore(self.module, self._changed)
        modules = self.module._modules
        for name, module in self._modules_before:  # a failed call could leave a swapped list behind
            if modules.get(name) is not module:
                modules[name] = module
        self.restore_module_order()


def _restore_class_attribute(cls: type, name: str, value: Any) -> None:
    if value is not None:
        setattr(cls, name, value)
    elif name in cls.__dict__:
        delattr(cls, name)


def _remove_cache_dit_stats(transformer: torch.nn.Module) -> None:
    """cache-dit copies its per-context stats onto the transformer after each call; drop them."""
    try:
        from cache_dit.caching.cache_blocks import remove_stats
    except ImportError:  # pragma: no cover - layout of older releases
        return
    remove_stats(transformer)


@contextlib.contextmanager
def _quiet_cache_dit(level: int = logging.ERROR) -> Iterator[None]:
    """cache-dit logs a dozen INFO/WARNING lines per enable_cache (to stdout, not propagated);
    ours is the one line that matters. Its loggers are raised to ``level`` for the call."""
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name.startswith("cache_dit") or name == "CACHE_DIT"]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, level))
    try:
        yield
    finally:
        for lg, previous in zip(loggers, levels):
            lg.setLevel(previous)
