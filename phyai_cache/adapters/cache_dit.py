"""The ``cache_dit`` backend: Cache-DiT's DBCache behind the unified config.

Strategies: ``fbcache`` (DBCache F1B0) and ``dbcache`` (DBCache FnBn), optionally with Cache-DiT's
TaylorSeer calibrator (``taylorseer_order``). Everything else is reported unavailable with a reason.

How Cache-DiT is driven, and why (docs/backend-cache-dit.md has the full story and the tests):

* **Transformer-only, with a block adapter we build ourselves.** We never hand Cache-DiT the
  pipeline: in pipeline mode it replaces ``type(pipe).__call__`` on the *class*. We never use its
  registered per-model adapters either: the Flux one applies a ``PatchFunctor`` that
  ``disable_cache`` does not revert, and its block layout depends on an environment variable. Our
  ``BlockAdapter`` lists the blocks found by :func:`phyai_cache.blocks.discover_blocks` as *one
  chain* (several lists are concatenated, the others temporarily emptied: Cache-DiT's own "dummy
  blocks" layout), so ``front_blocks``/``back_blocks`` count over the whole model like on the
  native engine. Its placeholder pipeline is an instance of a subclass created per installation,
  so even Cache-DiT's class-level ``_is_cached`` flag lands on a class that only we use.
* **One Cache-DiT context per run and branch.** Cache-DiT's persistent (transformer-only) context
  resets one call late or never, and its separate-CFG mode assigns cond/uncond by call parity
  (wrong for Flux true CFG, and for runs that switch CFG on and off). Our lifecycle knows each
  call's run, branch and step, so we create a fresh context for every (run, branch), make it the
  one Cache-DiT's block wrapper sees before each call, and drop them all when the run ends (also
  when it raised). Cache-DiT's own refresh logic is never reached (``num_inference_steps`` stays
  unset), and between runs no context exists at all.
* **Calls outside a run bypass Cache-DiT** entirely through a small router on ``forward``.
* **Removal restores exactly** what ``enable_cache`` changed on the transformer's instance dict;
  nothing is ever set on a user class.

Importing this module never imports ``cache_dit`` (it is slow to import): only methods do.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import math
import numbers
from collections.abc import Iterator
from typing import Any

import torch

from ..blocks import BlockList, BlocksArg, check_block_counts, discover_blocks
from ..config import DiTCacheConfig
from ..errors import BackendUnavailableError, CacheStateError, DiTCacheConfigError, did_you_mean
from ..instrument import BlockCounter
from .._patch import DictSnapshot, splice_forward
from ..decision import SharedDecisions
from ..distributed import check_blocks_see_their_shard, check_cache_dit
from ..runtime import CacheTarget, CallInfo, CallSource, RunState, RunStates
from ..strategies import StrategySpec
from ..stats import tensor_bytes
from ..versions import MIN_VERSIONS, feature_available
from .base import Backend, Installation, Plan, StrategySupport, unsupported

logger = logging.getLogger("phyai_cache")

BACKEND = "cache_dit"
# The strategies this adapter implements (DBCache with F1B0 or FnBn); which backends serve which
# strategy, and why not, is declared in phyai_cache/strategies/ (a test checks the two agree).
SERVED_STRATEGIES = ("fbcache", "dbcache")
# DBCacheConfig fields that duplicate a unified field: set the unified field instead.
_UNIFIED_EQUIVALENTS = {
    "Fn_compute_blocks": "front_blocks",
    "Bn_compute_blocks": "back_blocks",
    "residual_diff_threshold": "threshold",
    "max_warmup_steps": "warmup_steps",
    "max_cached_steps": "max_cached_steps",
    "max_continuous_cached_steps": "max_consecutive_cached",
    "enable_separate_cfg": "separate_cfg",
    "cfg_compute_first": "separate_cfg",
    "cfg_diff_compute_separate": "separate_cfg",
    "steps_computation_mask": "active_steps",
}

# DBCacheConfig fields that conflict with how this adapter drives Cache-DiT.
_REFUSED_OPTIONS = {
    "cache_type": "DBPrune does not fit the unified schema (it decides per block, not per step, so "
                  "steps cached, back_blocks and the threshold would mean something else); only DBCache is served",
    "num_inference_steps": "phyai_cache's lifecycle owns runs (fresh cache-dit state per run and branch); "
                           "cache-dit's own step-count refresh is not used (it fires one call late)",
    "force_refresh_step_hint": "phyai_cache's lifecycle owns refreshes: every run and CFG branch starts fresh",
    "force_refresh_step_policy": "phyai_cache's lifecycle owns refreshes: every run and CFG branch starts fresh",
    "steps_computation_policy": "active_steps implies the 'dynamic' policy; 'static' caches masked steps without "
                                "any check and crashes when the resolution changes",
}

# Cache-DiT records -2.0 as the "diff" of a step whose residual shape changed (and -1.0 / -0.0 for
# thresholds >= 1 / <= 0, which it does not measure).
_DIFF_SHAPE_CHANGED = -2.0

# Models whose forward runs several block lists back to back with the same arguments and nothing in
# between (checked in their diffusers source), so the lists can be cached as one chain. Cache-DiT
# itself does this for Flux ("dummy blocks"); for any other model several lists are refused rather
# than silently skipping the model's own code between them.
_BACK_TO_BACK_LISTS: dict[str, tuple[str, ...]] = {
    "FluxTransformer2DModel": ("transformer_blocks", "single_transformer_blocks"),
    "HunyuanVideoTransformer3DModel": ("transformer_blocks", "single_transformer_blocks"),
}

# Models whose forward does more with a block list than call each block with the same arguments,
# found by the support matrix (lab/phyai_cache_lab/testing/families.py) with the cache-dit version below.
# For the whole forward call cache-dit puts a one-element list holding its wrapper where the block
# list was: the model's loop calls the wrapper once, with the first block's arguments, and whatever
# else the forward reads from the list sees the wrapper, so the first call raises (or, for per-block
# arguments, could compute something else). Kept as data: such uses hide in helper methods and in
# branches that never run (SD3 reads block.context_pre_only, Flux len(blocks) for ControlNet only),
# so reading the forward's source would refuse models that work and miss models that do not.
_FORWARD_USES_BLOCKS: dict[str, tuple[tuple[str, ...], str]] = {
    "AceStepTransformer1DModel": (("layers",), "reads self.layers[0].self_attn.processor"),
    "DiTTransformer2DModel": (("transformer_blocks",), "reads self.transformer_blocks[0].norm1"),
    "Transformer2DModel": (("transformer_blocks",), "reads self.transformer_blocks[0].norm1 (patched inputs)"),
    "QwenImage21Transformer2DModel": (("transformer_blocks",), "reads block.attn.processor of every block"),
    "HunyuanDiT2DModel": (("blocks",), "passes each block of the second half its own skip connection (skip=)"),
}
_FORWARD_USES_BLOCKS_SEEN = "1.5.3"


# -- backend ------------------------------------------------------------------------------------


class CacheDiTBackend(Backend):
    name = BACKEND
    description = "Cache-DiT's DBCache (+ TaylorSeer calibrator), driven per run and branch by phyai_cache"

    def support(self, spec: StrategySpec, version: str | None) -> StrategySupport:
        minimum = MIN_VERSIONS[BACKEND]["dbcache"]
        if spec.name not in SERVED_STRATEGIES:
            return unsupported(spec.name, "declared as served by cache_dit, but this adapter has no mapping for it")
        if version is None:
            return unsupported(spec.name, "cache-dit is not installed", minimum)
        if not feature_available(BACKEND, spec.name, version):
            return unsupported(
                spec.name, f"cache-dit {version} predates what this adapter needs (DBCacheConfig, "
                           "transformer-only BlockAdapter(pipe=None) whose persistent context does not "
                           "demand num_inference_steps, the cache_dit.caching package)", minimum)
        return StrategySupport(spec.name, True, min_version=minimum)

    def prepare(self, target: CacheTarget, config: DiTCacheConfig, blocks: BlocksArg = None) -> CacheDiTPlan:
        version = self.version()
        support = self.strategy_support(version)[config.strategy]
        if not support.available:  # the registry checks this first; a direct prepare() might not
            raise BackendUnavailableError(f"strategy {config.strategy!r} is not available on backend "
                                          f"'cache_dit' {version}: {support.reason}")
        _check_version_gated_fields(config, version)
        _check_undeclared_dependencies(version)
        check_cache_dit(target.parallel)  # Cache-DiT reduces over the world group: right for one layout only
        lists = discover_blocks(target.transformer, blocks)
        check_blocks_see_their_shard(lists)
        chain = ChainSpec.from_lists(target.transformer, lists)
        check_block_counts(config.front_blocks, config.back_blocks, len(chain),
                           where=f" in the chain {' + '.join(chain.paths)}")
        settings = _cache_settings(config)  # imports cache_dit (options are checked against its fields)
        _check_internals()
        if config.threshold is not None and config.threshold >= 1.0:
            logger.warning("phyai_cache: cache_dit treats threshold >= 1 as 'always cache' without measuring "
                           "(the native engine still requires diff < threshold); got %s", config.threshold)
        return CacheDiTPlan(chain, config, settings)


def _check_version_gated_fields(config: DiTCacheConfig, version: str | None) -> None:
    restricted = config.active_steps not in (None, (0, None))
    if restricted and not feature_available(BACKEND, "steps_computation_mask", version):
        raise DiTCacheConfigError(
            "active_steps", list(config.active_steps), f"[0, null] on cache_dit {version}",
            hint=f"cache-dit gained steps_computation_mask in {MIN_VERSIONS[BACKEND]['steps_computation_mask']}; "
                 "upgrade it or use backend 'native'")
    if config.max_consecutive_cached is not None and not feature_available(BACKEND, "max_continuous_streak", version):
        raise DiTCacheConfigError(
            "max_consecutive_cached", config.max_consecutive_cached, f"null on cache_dit {version}",
            hint=f"before {MIN_VERSIONS[BACKEND]['max_continuous_streak']} cache-dit counted streaks differently "
                 "(the first cached pair counted as 2); upgrade it or use backend 'native'")
    if config.taylorseer_order is not None and not feature_available(BACKEND, "taylorseer_calibrator", version):
        raise DiTCacheConfigError(
            "taylorseer_order", config.taylorseer_order, f"null on cache_dit {version}",
            hint=f"TaylorSeerCalibratorConfig needs cache-dit >= {MIN_VERSIONS[BACKEND]['taylorseer_calibrator']}")


def _check_undeclared_dependencies(version: str | None) -> None:
    if feature_available(BACKEND, "accelerate_optional", version):
        return
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        raise BackendUnavailableError(
            f"cache-dit {version} imports accelerate in enable_cache without declaring it: pip install accelerate, "
            f"or cache-dit >= {MIN_VERSIONS[BACKEND]['accelerate_optional']}")


def _check_internals() -> None:
    """We switch contexts per branch through the context manager's registry: make sure it is there."""
    from cache_dit.caching import CachedContextManager

    manager = CachedContextManager(name="phyai_cache_probe", persistent_context=True)
    if not isinstance(getattr(manager, "_cached_context_manager", None), dict) or not all(
        callable(getattr(manager, name, None)) for name in ("new_context", "remove_context", "clear_contexts")
    ):
        raise BackendUnavailableError("this cache-dit version manages contexts differently from what the "
                                      "cache_dit adapter was written for; use backend 'native'")


# -- block chain --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChainSpec:
    """The blocks Cache-DiT caches as one unit, and how they are called."""

    lists: tuple[BlockList, ...]
    pattern: str  # ForwardPattern member name

    @property
    def paths(self) -> list[str]:
        return [block_list.path for block_list in self.lists]

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [block for block_list in self.lists for block in block_list.blocks]

    def __len__(self) -> int:
        return sum(len(block_list.blocks) for block_list in self.lists)

    @classmethod
    def from_lists(cls, transformer: torch.nn.Module, lists: list[BlockList]) -> ChainSpec:
        patterns = [_forward_pattern(block_list) for block_list in lists]
        if any("." in block_list.path for block_list in lists):
            raise DiTCacheConfigError(
                "blocks", [bl.path for bl in lists], "block lists that are direct children of the transformer",
                hint="cache-dit swaps the lists by attribute name on the transformer; use backend 'native'")
        if len(lists) > 1:
            _check_back_to_back(transformer, lists, patterns)
        _check_forward_only_calls_blocks(transformer, lists)
        return cls(tuple(lists), patterns[0])


def _forward_pattern(block_list: BlockList) -> str:
    """Cache-DiT's ForwardPattern for a list, from our block description (diffusers' registry).

    Cache-DiT calls every block as ``block(hidden_states, encoder_hidden_states, *args, **kwargs)``
    (patterns 0-2) or ``block(hidden_states, *args, **kwargs)`` (pattern 3), so the streams must be
    the first positional parameters of the block.
    """
    io = block_list.io[0]
    if io.hidden_pos != 0:
        raise DiTCacheConfigError(
            "blocks", block_list.path, "blocks whose hidden states are their first argument",
            hint="cache-dit passes hidden states positionally; use backend 'native' for this model")
    if io.returns_encoder:
        if io.encoder_pos != 1:
            raise DiTCacheConfigError(
                "blocks", block_list.path, "blocks whose encoder hidden states are their second argument",
                hint="cache-dit passes the encoder stream positionally; use backend 'native' for this model")
        _check_stream_names(block_list)
        return "Pattern_0" if io.hidden_index < io.encoder_index else "Pattern_1"
    positional = io.positional_names
    if len(positional) > 1 and positional[1] == "encoder_hidden_states":
        return "Pattern_2"  # takes the encoder stream, returns hidden states only (e.g. Wan)
    return "Pattern_3"


def _check_stream_names(block_list: BlockList) -> None:
    """Refuse two-stream blocks with an ``encoder_hidden_states`` parameter that is not their second stream.

    The model calls cache-dit's wrapper where it called a block, and the wrapper takes the streams as
    ``forward(hidden_states, encoder_hidden_states, *args, **kwargs)``: a keyword argument binds by
    that name. LTX-2 passes ``audio_hidden_states=`` (its second stream) and ``encoder_hidden_states=``
    (the text), so the text would become the second stream and the audio is passed twice.
    """
    io = block_list.io[0]
    positional = io.positional_names
    if io.encoder_name != "encoder_hidden_states" and "encoder_hidden_states" in positional:
        raise DiTCacheConfigError(
            "blocks", block_list.path,
            "two-stream blocks whose parameter named encoder_hidden_states is their second stream",
            hint=f"the second stream of {type(block_list.blocks[0]).__name__} is {io.encoder_name!r} and "
                 "encoder_hidden_states is another argument; cache-dit binds a keyword encoder_hidden_states "
                 "as the second stream; use backend='native', which serves this model")


def _check_back_to_back(transformer: torch.nn.Module, lists: list[BlockList], patterns: list[str]) -> None:
    model = type(transformer).__name__
    paths = tuple(block_list.path for block_list in lists)
    if _BACK_TO_BACK_LISTS.get(model) != paths:
        raise DiTCacheConfigError(
            "blocks", list(paths), "a single block list for this model on backend 'cache_dit'",
            hint=f"cache-dit caches one chain of blocks; {model} is not known to run {' and '.join(paths)} back to "
                 "back with nothing in between, so skipping them as one unit could skip the model's own code; "
                 "use backend 'native' (a residual per list) or pass blocks= with one list")
    if len(set(patterns)) != 1:
        raise DiTCacheConfigError(
            "blocks", list(paths), "block lists with the same inputs and outputs",
            hint=f"their cache-dit forward patterns differ ({', '.join(patterns)}); this diffusers version's "
                 f"{model} needs backend 'native'")


def _check_forward_only_calls_blocks(transformer: torch.nn.Module, lists: list[BlockList]) -> None:
    """Refuse the models of _FORWARD_USES_BLOCKS: their first call would fail under cache-dit."""
    model = type(transformer).__name__
    paths, what = _FORWARD_USES_BLOCKS.get(model, ((), ""))
    chosen = [block_list.path for block_list in lists if block_list.path in paths]
    if chosen:
        raise DiTCacheConfigError(
            "target", model,
            "a model whose forward only calls the blocks of its cached list, all with the same arguments",
            hint=f"cache-dit puts one wrapper module in place of {' and '.join(chosen)} for the whole call, and "
                 f"{model}.forward {what} (fails at the first call with cache-dit {_FORWARD_USES_BLOCKS_SEEN}); "
                 "use backend='native', which serves this model")


# -- config mapping -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CacheSettings:
    """The DBCacheConfig fields and calibrator settings derived from a DiTCacheConfig."""

    cache_fields: dict[str, Any]
    taylorseer_order: int | None
    active_steps: tuple[int, int | None] | None  # None: no steps mask needed
    warmup_steps: int


def _cache_settings(config: DiTCacheConfig) -> CacheSettings:
    options = _checked_options(config)
    fields = {
        "Fn_compute_blocks": config.front_blocks,
        "Bn_compute_blocks": config.back_blocks,
        "residual_diff_threshold": config.threshold,
        "max_warmup_steps": config.warmup_steps,
        "max_cached_steps": -1 if config.max_cached_steps is None else config.max_cached_steps,
        "max_continuous_cached_steps": -1 if config.max_consecutive_cached is None else config.max_consecutive_cached,
        # Each cache-dit context sees exactly one of our branches, so its own parity-based CFG split
        # must stay off: per-branch state comes from having one context per branch.
        "enable_separate_cfg": False,
        "num_inference_steps": None,  # never let cache-dit refresh on its own
        **options,
    }
    active = config.active_steps if config.active_steps not in (None, (0, None)) else None
    if active is not None:
        fields["steps_computation_policy"] = "dynamic"
        if fields.get("warmup_interval", 1) != 1:
            raise DiTCacheConfigError(
                "options.warmup_interval", fields["warmup_interval"], "1 when active_steps is set",
                hint="cache-dit shortens warmup to the mask's leading computed steps, "
                     "so an interval cannot be honoured")
    return CacheSettings(fields, config.taylorseer_order, active, config.warmup_steps or 0)


def _checked_options(config: DiTCacheConfig) -> dict[str, Any]:
    from cache_dit import DBCacheConfig

    known = [f.name for f in dataclasses.fields(DBCacheConfig)]
    passthrough = [n for n in known if n not in _UNIFIED_EQUIVALENTS and n not in _REFUSED_OPTIONS]
    checked = {}
    for name, value in config.options.items():
        field = f"options.{name}"
        if name in _UNIFIED_EQUIVALENTS:
            raise DiTCacheConfigError(field, value, "not set here",
                                      hint=f"use the unified field {_UNIFIED_EQUIVALENTS[name]!r} instead")
        if name in _REFUSED_OPTIONS:
            raise DiTCacheConfigError(field, value, "not set here", hint=_REFUSED_OPTIONS[name])
        if name not in known:
            raise DiTCacheConfigError(field, value, "one of " + ", ".join(passthrough) + " (cache-dit DBCacheConfig)",
                                      hint=did_you_mean(name, passthrough) or "unknown cache-dit option")
        checked[name] = _check_option_value(field, name, value)
    return checked


def _check_option_value(field: str, name: str, value: Any) -> Any:
    if name == "warmup_interval":
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise DiTCacheConfigError(field, value, "an integer >= 1")
    elif name == "max_accumulated_residual_diff_threshold" and value is not None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
            raise DiTCacheConfigError(field, value, "a finite number > 0 or null")
    return value


# -- plan and installation ----------------------------------------------------------------------


class CacheDiTPlan(Plan):
    def __init__(self, chain: ChainSpec, config: DiTCacheConfig, settings: CacheSettings) -> None:
        self.chain = chain
        self.config = config
        self.settings = settings

    def install(self, lifecycle: CallSource) -> Installation:
        return CacheDiTInstallation(self.chain, self.config, self.settings, lifecycle)

    def describe(self) -> dict[str, Any]:
        front, back, total = self.config.front_blocks, self.config.back_blocks, len(self.chain)
        names = [f"{bl.path}.{i}" for bl in self.chain.lists for i in range(len(bl.blocks))]
        return {
            "blocks": total,
            "chain": self.chain.paths,
            "forward_pattern": self.chain.pattern,
            "front": names[:front],
            "back": names[total - back:] if back else [],
            "dbcache": {k: v for k, v in self.settings.cache_fields.items()
                        if k not in ("num_inference_steps", "enable_separate_cfg")},
            "taylorseer_order": self.settings.taylorseer_order,
            "cfg": "one cache-dit context per run and branch; "
                   + ("each branch decides" if self.config.separate_cfg is not False else "the first branch decides"),
        }


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


__all__ = ["CacheDiTBackend"]
