"""What a cached model's objects go through besides runs: copies, pickles, swapped components,
offload hooks. One rule: never silently wrong, never silently idle.

* **Installing and removing beneath offload hooks.** accelerate's hooks (``enable_model_cpu_offload``,
  ``enable_sequential_cpu_offload``, ``cpu_offload_with_hook``) replace a module's ``forward`` and keep
  the one they wrap in ``_old_forward``; removing them puts ``_old_forward`` back, and diffusers removes
  and re-adds them after every pipeline call under model offload. So the cache is always installed
  and removed *beneath* them (:func:`beneath_offload_hooks`): they are peeled off for the duration and
  put back on top, exactly as if they had been added after the cache, so adding, re-adding and removing
  them in any order keeps the cache in the call chain and removing the cache leaves them working.
* **The footprint** (:class:`Footprint`): what the cache installed (the pipeline's transformer, every
  module whose forward chain it changed, under its name). Checked at the start of every run, by
  identity only: a ``pipe.transformer`` or block list replaced after enabling, or a forward replaced
  by hand, raises :class:`~phyai_cache.errors.TargetChangedError` instead of a run that reports success
  while nothing went through the cache.
* **Copies and pickles** (``copy.deepcopy``, ``copy.copy``, ``pickle``, ``torch.save(model)``) of the
  pipeline, the transformer or any module we patched come out **uncached and exact**: the cache is
  taken off for the duration of the copy and put back afterwards (instance-level ``__deepcopy__`` and
  ``__reduce_ex__``, removed with the cache). The copy computes with its own weights; a WARNING says it
  is not cached. Pickling copies the module structure, not the tensors (they are shared with the
  original while pickling). Refused during a run or while requests are open.
"""

from __future__ import annotations

import contextlib
import copy
import copyreg
import logging
from collections.abc import Iterator
from typing import Any

import torch

from ._patch import MISSING, forward_slots, in_forward_chain
from .errors import CacheStateError, TargetChangedError
from .lifecycle import HANDLE_ATTR

logger = logging.getLogger("phyai_cache")


# -- offload hooks ----------------------------------------------------------------------------


@contextlib.contextmanager
def beneath_offload_hooks(root: torch.nn.Module) -> Iterator[None]:
    """Take accelerate's hooks off ``root``'s modules for the duration, then put them back on top of
    whatever forward the modules have afterwards (the cache's wrappers, or the plain forward)."""
    peeled = []
    for module in root.modules():
        own = module.__dict__
        if "_hf_hook" in own and "_old_forward" in own and "forward" in own:
            peeled.append((module, own["forward"]))
            own["forward"] = own.pop("_old_forward")
    try:
        yield
    finally:
        for module, hook_forward in reversed(peeled):
            own = module.__dict__
            inner = own.get("forward", MISSING)
            own["_old_forward"] = type(module).forward.__get__(module, type(module)) if inner is MISSING else inner
            own["forward"] = hook_forward


def install(lifecycle: Any, plan: Any) -> None:
    """Install ``plan`` and the lifecycle's wrappers beneath any offload hooks, record the footprint
    and put the copy guards in place; atomic (on error the target is as it was)."""
    target = lifecycle.target
    with beneath_offload_hooks(target.transformer):
        before = {id(m): _chain_values(m) for m in target.transformer.modules()}
        installation = plan.install(lifecycle)
        try:
            lifecycle.install(installation)
        except BaseException:
            installation.remove()
            raise
        try:
            lifecycle.installed_plan = plan
            lifecycle.footprint = Footprint(target, before)
            _install_copy_guards(lifecycle)
        except BaseException:
            lifecycle.uninstall()
            installation.remove()
            raise


def remove(lifecycle: Any) -> None:
    """Remove the lifecycle's wrappers and the installation, beneath any offload hooks."""
    with beneath_offload_hooks(lifecycle.target.transformer):
        lifecycle.uninstall()
        assert lifecycle.installation is not None
        lifecycle.installation.remove()
    lifecycle.footprint = None


# -- the footprint ----------------------------------------------------------------------------


def _chain_values(module: torch.nn.Module) -> tuple[Any, ...]:
    return tuple(holder.__dict__.get(name) for holder, name in forward_slots(module))


class Footprint:
    """The objects the cache is installed on, checked by identity at the start of every run."""

    def __init__(self, target: Any, before: dict[int, tuple[Any, ...]]) -> None:
        self.pipeline = target.pipeline
        self.transformer = target.transformer
        self.watched: list[tuple[str, torch.nn.Module, list[Any]]] = []
        for name, module in self.transformer.named_modules():
            previous = before.get(id(module), ())
            ours = [v for v in _chain_values(module) if v is not None and not any(v is p for p in previous)]
            if ours:
                self.watched.append((name, module, ours))

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [module for _, module, _ in self.watched]

    def check(self, operation: str) -> None:
        """Raise :class:`TargetChangedError` if what the cache was installed on is no longer in place."""
        transformer = self.transformer
        kind = type(transformer).__name__
        fix = ("disable_dit_cache(pipe) and enable it again (enable_dit_cache(pipe, handle.config)) so that the "
               "cache is installed on what the model holds now")
        if self.pipeline is not None and getattr(self.pipeline, "transformer", None) is not transformer:
            raise TargetChangedError(
                f"{operation}: pipe.transformer was replaced after the cache was enabled; the cache is installed on "
                f"the {kind} the pipeline had then, so this run would go through no cache while reporting success. "
                "disable_dit_cache(pipe) and enable it again (enable_dit_cache(pipe, handle.config)) to cache the new "
                "transformer")
        for name, module, ours in self.watched:
            try:
                current = transformer.get_submodule(name) if name else transformer
            except AttributeError:
                current = None
            if current is not module:
                raise TargetChangedError(
                    f"{operation}: {kind}.{name} was replaced after the cache was enabled (a block list or block "
                    f"assigned anew, e.g. transformer.{name.split('.')[0]} = ModuleList(...)); the cache is "
                    f"installed on the modules it had then and would silently do nothing. {fix}")
            if not all(in_forward_chain(module, value) for value in ours) and _known_forward(module):
                where = f"{kind}.{name}" if name else kind
                raise TargetChangedError(
                    f"{operation}: {where}.forward was replaced after the cache was enabled (set back to the class's "
                    f"forward, or a hook installed before the cache was removed), so the cache's wrapper is no longer "
                    f"called and the run would silently do nothing. {fix}")


def _known_forward(module: torch.nn.Module) -> bool:
    """True when the module's forward is one we can see through: the class's own, or an accelerate or
    diffusers hook. A function assigned by hand may call our wrapper from its closure: trusted."""
    value = module.__dict__.get("forward", MISSING)
    if value is MISSING or (getattr(value, "__self__", None) is module
                            and getattr(value, "__func__", None) is type(module).forward):
        return True
    qualname = getattr(getattr(value, "func", None), "__qualname__", "")
    return qualname.startswith(("HookRegistry.register_hook.", "add_hook_to_module."))


# -- copies and pickles -----------------------------------------------------------------------


@contextlib.contextmanager
def suspended(lifecycle: Any, operation: str) -> Iterator[None]:
    """The target exactly as before enabling for the duration; the cache is put back afterwards."""
    target = lifecycle.target
    name = type(target.pipeline if target.pipeline is not None else target.transformer).__name__
    if lifecycle.run_state is not None or lifecycle.requests.open_ids:
        raise CacheStateError(
            f"{operation} of a cache-enabled {name} while a run or a request is in progress is refused: the copy "
            "would be taken half-way through a generation. Copy it between runs (the copy comes out uncached)")
    with lifecycle.requests.lock:
        handles = {id(obj): obj.__dict__.pop(HANDLE_ATTR) for obj in target.objects if HANDLE_ATTR in obj.__dict__}
        remove(lifecycle)
        try:
            yield
        finally:
            install(lifecycle, lifecycle.installed_plan)
            for obj in target.objects:
                if id(obj) in handles:
                    obj.__dict__[HANDLE_ATTR] = handles[id(obj)]


def clean_deepcopy(lifecycle: Any, obj: Any, memo: dict[int, Any] | None) -> Any:
    """``copy.deepcopy(obj)`` of the object as it is without the cache: uncached, its own weights."""
    with suspended(lifecycle, "copy.deepcopy"):
        result = copy.deepcopy(obj, memo)
    logger.warning("phyai_cache: copied a cache-enabled %s; the copy is not cached (it computes uncached with its own "
                   "weights): enable_dit_cache(copy, handle.config) to cache it too", type(result).__name__)
    return result


def clean_reduce(lifecycle: Any, obj: Any, protocol: int) -> Any:
    """What pickle (and ``copy.copy``) sees of ``obj``: the object without the cache, sharing its tensors."""
    with suspended(lifecycle, "pickling"):
        memo: dict[int, Any] = {id(t): t for t in _tensors(lifecycle.target)}
        skeleton = copy.deepcopy(obj, memo)
    reduced = skeleton.__reduce_ex__(protocol)
    if type(obj) is not type(skeleton) and reduced[0] is copyreg.__newobj__ and len(reduced[1]) == 1:
        # pickle refuses __newobj__ for an object whose class differs (the pipeline's own subclass);
        # the stdlib's protocol-0 reconstructor builds the same object.
        reduced = (copyreg._reconstructor, (reduced[1][0], object, None), *reduced[2:])
    return reduced


def _tensors(target: Any) -> list[torch.Tensor]:
    modules = [target.transformer]
    components = getattr(target.pipeline, "components", None) if target.pipeline is not None else None
    if isinstance(components, dict):
        modules += [m for m in components.values() if isinstance(m, torch.nn.Module)]
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


def _install_copy_guards(lifecycle: Any) -> None:
    target = lifecycle.target
    modules = {id(m): m for m in [target.transformer, *lifecycle.footprint.modules]}
    for module in modules.values():
        lifecycle.patch_until_removed(module, "__deepcopy__", _deepcopy_guard(lifecycle, module))
        lifecycle.patch_until_removed(module, "__reduce_ex__", _reduce_guard(lifecycle, module))
    if target.pipeline is not None:
        # The pipeline already has a class of its own (lifecycle.ClassSwap), dropped on disable.
        subclass = type(target.pipeline)
        subclass.__deepcopy__ = lambda pipe, memo=None: clean_deepcopy(lifecycle, pipe, memo)
        subclass.__reduce_ex__ = lambda pipe, protocol=2: clean_reduce(lifecycle, pipe, protocol)


def _deepcopy_guard(lifecycle: Any, module: torch.nn.Module) -> Any:
    def __deepcopy__(memo: dict[int, Any] | None = None) -> Any:
        return clean_deepcopy(lifecycle, module, memo)

    return __deepcopy__


def _reduce_guard(lifecycle: Any, module: torch.nn.Module) -> Any:
    def __reduce_ex__(protocol: int = 2) -> Any:
        return clean_reduce(lifecycle, module, protocol)

    return __reduce_ex__
