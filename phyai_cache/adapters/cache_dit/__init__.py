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

Layout: this module (the backend and its plan), ``model`` (the block chain Cache-DiT caches),
``options`` (the unified config as DBCacheConfig fields), ``install`` (the installation). Importing the
package never imports ``cache_dit`` (it is slow to import): only methods do.
"""

from __future__ import annotations

import logging
from typing import Any

from ...blocks import BlocksArg, check_block_counts, discover_blocks
from ...config import DiTCacheConfig
from ...distributed import check_blocks_see_their_shard, check_cache_dit
from ...errors import BackendUnavailableError, DiTCacheConfigError
from ...runtime import CacheTarget, CallSource
from ...strategies import StrategySpec
from ...versions import MIN_VERSIONS, feature_available
from ..base import Backend, Installation, Plan, StrategySupport, unsupported
from .install import CacheDiTInstallation
from .model import ChainSpec
from .options import CacheSettings, cache_settings

logger = logging.getLogger("phyai_cache")

BACKEND = "cache_dit"
# The strategies this adapter implements (DBCache with F1B0 or FnBn); which backends serve which
# strategy, and why not, is declared in phyai_cache/strategies/ (a test checks the two agree).
SERVED_STRATEGIES = ("fbcache", "dbcache")


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
        settings = cache_settings(config, self.name)  # imports cache_dit
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



__all__ = ["CacheDiTBackend", "CacheDiTPlan"]
