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
from typing import TYPE_CHECKING, Any, ContextManager

import torch

from ..._patch import InstancePatch
from ...blocks import BlockList
from ...instrument import BlockCounter
from ...lifecycle import CacheTarget, CallInfo, Lifecycle, RunState
from ...stats import tensor_bytes
from ..base import Installation
from .schedule import DiffusersRunState

if TYPE_CHECKING:
    from .strategies import Driver

logger = logging.getLogger("phyai_cache")

_MISSING = object()
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
        self.attributes = {id(m): {a: m.__dict__.get(a, _MISSING) for a in _TRACKED_ATTRIBUTES}
                           for m in self.modules.values()}
        self.hook_names = {id(m): tuple(_registry(m)._hook_order) if _registry(m) is not None else ()
                           for m in self.modules.values()}

    def forward_before(self, module: torch.nn.Module) -> Callable[..., Any]:
        value = self.attributes[id(module)]["forward"]
        return type(module).forward.__get__(module, type(module)) if value is _MISSING else value

    def touched(self) -> list[torch.nn.Module]:
        """Modules whose tracked attributes or hooks differ from the snapshot."""
        return [m for m in self.modules.values() if self._differs(m)]

    def _differs(self, module: torch.nn.Module) -> bool:
        registry = _registry(module)
        names = tuple(registry._hook_order) if registry is not None else ()
        before = self.attributes[id(module)]
        return names != self.hook_names[id(module)] or any(
            module.__dict__.get(a, _MISSING) is not before[a] for a in _TRACKED_ATTRIBUTES)

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
            for attribute, value in self.attributes[id(module)].items():
                self._restore_attribute(module, attribute, value)
        self.invalidate_child_registries()

    def invalidate_child_registries(self) -> None:
        """Registries cache the list of their children's registries; hooks came or went, so drop it."""
        for module in self.modules.values():
            registry = _registry(module)
            if registry is not None and getattr(registry, "_child_registries_cache", None) is not None:
                registry._child_registries_cache = None

    @staticmethod
    def _restore_attribute(module: torch.nn.Module, attribute: str, value: Any) -> None:
        current = module.__dict__.get(attribute, _MISSING)
        if current is value:
            return
        if attribute == "_diffusers_hook" and current is not _MISSING and current.hooks:
            return  # someone else's hooks live there now: keep them
        if value is _MISSING:
            module.__dict__.pop(attribute, None)
        else:
            module.__dict__[attribute] = value


def _registry(module: torch.nn.Module) -> Any:
    return module.__dict__.get("_diffusers_hook")


class DiffusersInstallation(Installation):
    """One diffusers cache applied to one transformer through phyai_cache's lifecycle."""

    def __init__(self, target: CacheTarget, driver: Driver, block_lists: list[BlockList],
                 lifecycle: Lifecycle) -> None:
        self.target = target
        self.transformer = target.transformer
        self.driver = driver
        self.lifecycle = lifecycle
        self.hooks: list[NewHook] = []
        self._undo: list[Callable[[], None]] = []
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
            self._undo.append(counter.remove)
            self.blocks_per_call = len(counter)
        self.driver.before_apply(self)
        snapshot = ModuleSnapshot(self.transformer)
        try:
            self.transformer.enable_cache(self.driver.diffusers_config)
        except BaseException:
            snapshot.restore(snapshot.touched())
            raise
        touched = snapshot.touched()
        self._undo.append(lambda: self._disable(snapshot, touched))
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
        patch = InstancePatch(obj, name, value)
        self._undo.append(patch.restore)
        return patch

    def add_undo(self, undo: Callable[[], None]) -> None:
        """Something :meth:`remove` must undo (in reverse order of registration)."""
        self._undo.append(undo)

    @property
    def hooked_modules(self) -> list[torch.nn.Module]:
        return list({id(h.module): h.module for h in self.hooks}.values())

    def remove(self) -> None:
        errors = []
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
            except Exception as error:  # keep undoing the rest; report the first failure
                errors.append(error)
        if errors:
            raise errors[0]

    # -- runs and calls -------------------------------------------------------------------------

    def begin_run(self, run: RunState) -> None:
        # A previous run that raised never reached diffusers' own reset (end of a pipeline call).
        self.transformer._reset_stateful_cache()
        run.backend_state = DiffusersRunState()
        self.driver.begin_run(run)

    def end_run(self, run: RunState) -> None:
        try:
            self.transformer._reset_stateful_cache()
        finally:
            run.backend_state = None

    def call_context(self, call: CallInfo) -> ContextManager[None]:
        return self._call_scope(call)

    @contextlib.contextmanager
    def _call_scope(self, call: CallInfo) -> Iterator[None]:
        call.scratch = CallScratch(key=input_key(call))
        run = self.lifecycle.run_state
        with contextlib.ExitStack() as stack:
            if self.driver.uses_context and self._needs_own_context(call.branch):
                stack.enter_context(self._cache_context(call.branch))
            self.driver.before_call(call, run.backend_state)
            stack.callback(self._after_call, call, run)
            yield

    def _after_call(self, call: CallInfo, run: RunState) -> None:
        self.driver.after_call(call, run.backend_state)
        run.note_cache_bytes(self._cache_bytes(run.backend_state))

    def _needs_own_context(self, branch: str) -> bool:
        # Pipelines without cache_context calls (Flux img2img/Kontext, Flux2, Chroma ...) and custom
        # loops; or an explicit handle.branch() that differs from the pipeline's context name.
        return self._cache_context is not None and self.lifecycle.pipeline_context_name != branch

    def _cache_bytes(self, run_state: DiffusersRunState) -> int:
        tensors: dict[int, torch.Tensor] = {}
        for holder in [*self._state_holders, *self.driver.extra_state(run_state)]:
            _collect_tensors(holder, tensors, depth=0)
        return tensor_bytes(*tensors.values())


def input_key(call: CallInfo) -> tuple:
    """What cached tensors are valid for: shapes, dtype and device of the call's inputs."""
    kwargs = call.kwargs or {}
    hidden = kwargs.get("hidden_states", call.args[0] if call.args else None)
    encoder = kwargs.get("encoder_hidden_states")
    if not isinstance(hidden, torch.Tensor):
        return (None,)
    encoder_shape = tuple(encoder.shape) if isinstance(encoder, torch.Tensor) else None
    return (tuple(hidden.shape), hidden.dtype, hidden.device, encoder_shape)


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
