"""Applying a diffusers cache to one transformer atomically, and scoping its state per run and branch.

Install order (undone in reverse by :meth:`DiffusersInstallation.remove`):

1. block counters (:class:`~phyai_cache.instrument.BlockCounter`) on the model's blocks, innermost, so
   ``blocks_computed`` counts block forwards that really ran;
2. the strategy's own inner wrappers (PAB/FasterCache: attention execution counters);
3. ``transformer.enable_cache(config)`` — if it raises half-way, every hook it registered is removed and
   every attribute it set is restored (diffusers itself leaves orphan hooks behind);
4. a guard around every module diffusers hooked: outside a run the hook is bypassed, so a transformer
   called outside a pipeline call or ``handle.run()`` runs uncached instead of touching cache state;
5. the strategy's patches of the hook objects (e.g. FirstBlockCache's decision).

Per run, diffusers' state is reset at the start *and* at the end (diffusers resets only at the end of
a pipeline call that did not raise). Per call, a diffusers ``cache_context`` named after the branch is
entered when the pipeline did not enter one itself, so context-keyed hooks never share state across
branches and never raise for a missing context.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..._patch import MISSING, DictSnapshot, InstancePatch, UndoStack, is_stale_hook_forward
from ...blocks import BlockList
from ...calls import CallSignature
from ...decision import SharedDecisions, cache_key, call_modes
from ...instrument import BlockCounter
from ...runtime import CacheTarget, CallInfo, CallSource, RunState, RunStates
from ...stats import tensor_bytes
from ..base import Installation
from .driver import DiffusersRunState, Driver

logger = logging.getLogger("phyai_cache")
# What diffusers' enable_cache/disable_cache change on a module's instance dict.
_TRACKED_ATTRIBUTES = ("forward", "_diffusers_hook", "_cache_config")


@dataclass
class NewHook:
    """A hook that enable_cache registered."""

    name: str  # diffusers' hook name, e.g. "fbc_leader_block_hook"
    module_name: str  # "" for the transformer itself
    module: torch.nn.Module
    hook: Any


@dataclass
class CallScratch:
    """The adapter's working state for one transformer call."""

    invocations: int = 0  # calls of hooked modules (guards count them where the strategy asks)
    executions: int = 0  # of those, real executions (inner counters)
    key: tuple | None = None  # input shapes of this call
    reason: str | None = None  # why the schedule forces a compute, if it does
    saved: Any = None  # strategy-specific values to restore after the call


class ModuleSnapshot:
    """The tracked instance attributes and hook names of every submodule, to undo enable_cache exactly."""

    def __init__(self, root: torch.nn.Module) -> None:
        self.root = root
        self.modules = dict(root.named_modules())
        self.attributes = DictSnapshot(self.modules.values(), keys=_TRACKED_ATTRIBUTES)
        self.hook_names = {id(m): _hook_names(m) for m in self.modules.values()}

    def forward_before(self, module: torch.nn.Module) -> Callable[..., Any]:
        value = self.attributes.before(module, "forward")
        return type(module).forward.__get__(module, type(module)) if value is MISSING else value

    def touched(self) -> list[torch.nn.Module]:
        """Modules whose tracked attributes or hooks differ from the snapshot."""
        return [m for m in self.modules.values()
                if _hook_names(m) != self.hook_names[id(m)] or self.attributes.changed(m)]

    def new_hooks(self) -> list[NewHook]:
        found = []
        for name, module in self.modules.items():
            registry = _registry(module)
            if registry is None:
                continue
            for hook_name in registry._hook_order:
                if hook_name not in self.hook_names[id(module)]:
                    found.append(NewHook(hook_name, name, module, registry.hooks[hook_name]))
        return found

    def restore(self, modules: list[torch.nn.Module]) -> None:
        """Remove hooks registered since the snapshot and put the tracked attributes back."""
        for module in modules:
            registry = _registry(module)
            if registry is not None:
                for hook_name in reversed(list(registry._hook_order)):
                    if hook_name not in self.hook_names[id(module)]:
                        registry.remove_hook(hook_name, recurse=False)
            changed = self.attributes.changed(module)
            current = module.__dict__.get("_diffusers_hook")
            if current is not None and current.hooks:
                changed.discard("_diffusers_hook")  # someone else's hooks live there now: keep them
            self.attributes.restore(module, changed)
            if is_stale_hook_forward(module, module.__dict__.get("forward")):
                # diffusers' remove_hook restores a hook's original_forward even when the hook below it was
                # removed meanwhile (group offload taken off while the cache was on): drop that stale wrapper.
                module.__dict__.pop("forward", None)
        self.invalidate_child_registries()

    def invalidate_child_registries(self) -> None:
        """Registries cache the list of their children's registries; hooks came or went, so drop it."""
        for module in self.modules.values():
            registry = _registry(module)
            if registry is not None and getattr(registry, "_child_registries_cache", None) is not None:
                registry._child_registries_cache = None


def _hook_names(module: torch.nn.Module) -> tuple[str, ...]:
    registry = _registry(module)
    return tuple(registry._hook_order) if registry is not None else ()


def _registry(module: torch.nn.Module) -> Any:
    return module.__dict__.get("_diffusers_hook")


class DiffusersInstallation(Installation):
    """One diffusers cache applied to one transformer through phyai_cache's lifecycle."""

    def __init__(self, target: CacheTarget, driver: Driver, block_lists: list[BlockList],
                 lifecycle: CallSource) -> None:
        self.target = target
        self.transformer = target.transformer
        self.driver = driver
        self.lifecycle = lifecycle
        self.hooks: list[NewHook] = []
        self.runs: RunStates[DiffusersRunState] = RunStates()
        self._undo = UndoStack()
        self._state_holders: list[Any] = []
        # The lifecycle wraps transformer.cache_context afterwards to learn the pipeline's branch
        # names; entering a context of our own must not go through that wrapper.
        self._cache_context = getattr(self.transformer, "cache_context", None)
        try:
            self._install(block_lists)
        except BaseException:
            self.remove()
            raise

    # -- install / remove -----------------------------------------------------------------------

    def _install(self, block_lists: list[BlockList]) -> None:
        blocks = [block for block_list in block_lists for block in block_list.blocks]
        if blocks:
            counter = BlockCounter(blocks, self.lifecycle)
            self._undo.push(counter.remove)
            self.blocks_per_call = len(counter)
        self.driver.before_apply(self)
        snapshot = ModuleSnapshot(self.transformer)
        try:
            self.transformer.enable_cache(self.driver.diffusers_config)
        except BaseException:
            snapshot.restore(snapshot.touched())
            raise
        touched = snapshot.touched()
        self._undo.push(lambda: self._disable(snapshot, touched))
        # diffusers 0.38-0.40 kept a stale child-registry list when a cache_context had been entered
        # before enable_cache (#14037): contexts then never reached the new hooks.
        snapshot.invalidate_child_registries()
        self.hooks = snapshot.new_hooks()
        if not any(h.module is not self.transformer for h in self.hooks):
            raise self.driver.no_op_error(self.transformer)
        self._install_guards(snapshot)
        self.driver.attach(self)
        self._state_holders = _state_holders(self.hooks)
        logger.debug("phyai_cache: diffusers %s hooked %d modules", self.driver.strategy, len(self.hooked_modules))

    def _disable(self, snapshot: ModuleSnapshot, touched: list[torch.nn.Module]) -> None:
        if getattr(self.transformer, "is_cache_enabled", False):
            self.transformer.disable_cache()
        snapshot.restore(touched)

    def _install_guards(self, snapshot: ModuleSnapshot) -> None:
        for module in self.hooked_modules:
            guard = self._guard(module.__dict__["forward"], snapshot.forward_before(module),
                                count=self.driver.counts_invocations(module))
            self.patch(module, "forward", guard)

    def _guard(self, hooked: Callable[..., Any], bypass: Callable[..., Any], count: bool) -> Callable[..., Any]:
        lifecycle = self.lifecycle

        def forward(*args: Any, **kwargs: Any) -> Any:
            call = lifecycle.current_call()
            if call is None:  # outside a run: no cache state may be read or written
                return bypass(*args, **kwargs)
            if count:
                call.scratch.invocations += 1
            return hooked(*args, **kwargs)

        return forward

    def patch(self, obj: Any, name: str, value: Any) -> InstancePatch:
        """An instance-level patch that :meth:`remove` undoes (in reverse order)."""
        return self._undo.patch(obj, name, value)

    def add_undo(self, undo: Callable[[], None]) -> None:
        """Something :meth:`remove` must undo (in reverse order of registration)."""
        self._undo.push(undo)

    @property
    def hooked_modules(self) -> list[torch.nn.Module]:
        return list({id(h.module): h.module for h in self.hooks}.values())

    def remove(self) -> None:
        self._undo.undo()

    # -- runs and calls -------------------------------------------------------------------------

    def begin_run(self, run: RunState) -> None:
        # A previous run that raised never reached diffusers' own reset (end of a pipeline call).
        self.transformer._reset_stateful_cache()
        state = self.runs.open(
            run, DiffusersRunState(SharedDecisions(enabled=self.driver.config.separate_cfg is False)))
        self.driver.begin_run(run, state)

    def end_run(self, run: RunState) -> None:
        try:
            self.transformer._reset_stateful_cache()
        finally:
            self.runs.close(run)

    def call_context(self, call: CallInfo) -> contextlib.AbstractContextManager[None]:
        return self._call_scope(call)

    @contextlib.contextmanager
    def _call_scope(self, call: CallInfo) -> Iterator[None]:
        call.scratch = CallScratch(key=_input_key(self.target.signature, call))
        state = self.runs[call.run]
        with contextlib.ExitStack() as stack:
            context = self.driver.context_kwargs(call) if self.driver.uses_context else None
            if self.driver.uses_context and (context is not None or self._needs_own_context(call.branch)):
                stack.enter_context(self._cache_context(call.branch, **(context or {})))
            self.driver.before_call(call, state)
            stack.callback(self._after_call, call, state)
            yield

    def _after_call(self, call: CallInfo, state: DiffusersRunState) -> None:
        self.driver.after_call(call, state)
        call.run.note_cache_bytes(self._cache_bytes(state))

    def _needs_own_context(self, branch: str) -> bool:
        # Pipelines without cache_context calls (Flux img2img/Kontext, Flux2, Chroma ...) and custom
        # loops; or an explicit handle.branch() that differs from the pipeline's context name.
        return self._cache_context is not None and self.lifecycle.pipeline_context_name != branch

    def _cache_bytes(self, run_state: DiffusersRunState) -> int:
        tensors: dict[int, torch.Tensor] = {}
        for holder in [*self._state_holders, *self.driver.extra_state(run_state)]:
            _collect_tensors(holder, tensors, depth=0)
        return tensor_bytes(*tensors.values())


def _input_key(signature: CallSignature, call: CallInfo) -> tuple:
    """The cache key of a transformer call's inputs, read by position or keyword."""
    return cache_key(signature.hidden_states(call.args, call.kwargs),
                     signature.encoder_hidden_states(call.args, call.kwargs), call_modes(call.args, call.kwargs))


def _state_holders(hooks: list[NewHook]) -> list[Any]:
    """The state objects of the hooks (StateManagers or plain ``state`` attributes), once each."""
    holders: dict[int, Any] = {}
    for new in hooks:
        for value in vars(new.hook).values():
            if hasattr(value, "_state_cache"):  # a diffusers StateManager: one state per context name
                holders[id(value)] = value._state_cache
        state = getattr(new.hook, "state", None)
        if state is not None:
            holders[id(new.hook)] = new.hook  # read .state at measuring time: it is swapped per branch
    return list(holders.values())


def _collect_tensors(value: Any, found: dict[int, torch.Tensor], depth: int) -> None:
    if depth > 6:  # state -> dict -> list -> tuple -> tensor is as deep as diffusers' states go
        return
    if isinstance(value, torch.Tensor):
        found[id(value)] = value
    elif isinstance(value, dict):
        for item in value.values():
            _collect_tensors(item, found, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _collect_tensors(item, found, depth + 1)
    elif hasattr(value, "__dict__") and not isinstance(value, torch.nn.Module) and not callable(value):
        for name, item in vars(value).items():
            if name not in ("fn_ref", "config", "_metadata", "state_manager"):
                _collect_tensors(item, found, depth + 1)
