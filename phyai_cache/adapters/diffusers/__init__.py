"""The diffusers backend: diffusers' own cache hooks behind the unified config.

Strategies: ``fbcache`` (FirstBlockCache), ``pab`` (PyramidAttentionBroadcast), ``fastercache``
(FasterCache, attention reuse only), ``taylorseer`` (TaylorSeerCache), ``magcache`` (MagCache),
``seacache`` (SeaCache) and ``textkv`` (TextKVCache, exact), each
from the diffusers release listed in :data:`phyai_cache.versions.MIN_VERSIONS`. The mapping of every
unified field, what cannot be honoured and the upstream bugs this layer neutralises are documented in
docs/backend-diffusers.md.

Importing this module never imports diffusers: that happens in :meth:`DiffusersBackend.prepare`.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from dataclasses import dataclass
from typing import Any

from ...blocks import BlockList, BlocksArg, discover_blocks
from ...config import DiTCacheConfig
from ...distributed import refuse_sharded
from ...errors import BackendUnavailableError, DiTCacheConfigError
from ...runtime import CacheTarget, CallSource
from ...strategies import StrategySpec
from ...versions import MIN_VERSIONS, feature_available
from ..base import Backend, Installation, Plan, StrategySupport, unsupported
from .driver import Driver

logger = logging.getLogger("phyai_cache")


@dataclass(frozen=True)
class DiffusersCache:
    """How one strategy maps onto a diffusers cache: the row of :data:`DIFFUSERS_CACHES`.

    cache_class: diffusers' name for it (messages, the support table).
    config: ``module:Class`` of its config in ``diffusers.hooks``.
    driver: our :class:`Driver` for it, which holds everything else about the strategy (its options,
    what it refuses, what its hooks need of the model): ``module:Class`` in this package (imported
    when used), or the class itself (a strategy registered from outside the package).
    """

    cache_class: str
    config: str
    driver: str | type[Driver]

    def config_class(self) -> type:
        module, name = self.config.split(":")
        return getattr(importlib.import_module(f"diffusers.hooks.{module}"), name)

    def driver_class(self) -> type[Driver]:
        if not isinstance(self.driver, str):
            return self.driver
        module, name = self.driver.split(":")
        return getattr(importlib.import_module(f".{module}", __name__), name)


# The strategies this adapter implements, one row each; which strategies exist and which backends
# serve them is declared in phyai_cache/strategies/ (a test checks the two agree). A strategy
# registered at run time adds its row here (tests/test_extending.py does).
DIFFUSERS_CACHES: dict[str, DiffusersCache] = {
    "fbcache": DiffusersCache("FirstBlockCache", "first_block_cache:FirstBlockCacheConfig",
                              "fbcache:FirstBlockCacheDriver"),
    "pab": DiffusersCache("PyramidAttentionBroadcast", "pyramid_attention_broadcast:PyramidAttentionBroadcastConfig",
                          "attention:PyramidAttentionBroadcastDriver"),
    "fastercache": DiffusersCache("FasterCache", "faster_cache:FasterCacheConfig", "attention:FasterCacheDriver"),
    "taylorseer": DiffusersCache("TaylorSeerCache", "taylorseer_cache:TaylorSeerCacheConfig",
                                 "taylorseer:TaylorSeerDriver"),
    "magcache": DiffusersCache("MagCache", "mag_cache:MagCacheConfig", "magcache:MagCacheDriver"),
    "seacache": DiffusersCache("SeaCache", "sea_cache:SeaCacheConfig", "seacache:SeaCacheDriver"),
    "textkv": DiffusersCache("TextKVCache", "text_kv_cache:TextKVCacheConfig", "textkv:TextKVCacheDriver"),
}


class DiffusersPlan(Plan):
    def __init__(self, target: CacheTarget, driver: Driver, block_lists: list[BlockList]) -> None:
        self.target = target
        self.driver = driver
        self.block_lists = block_lists
        self.installation: Any = None

    def install(self, lifecycle: CallSource) -> Installation:
        from .install import DiffusersInstallation

        self.installation = DiffusersInstallation(self.target, self.driver, self.block_lists, lifecycle)
        return self.installation

    def describe(self) -> dict[str, Any]:
        description = {"diffusers_cache": DIFFUSERS_CACHES[self.driver.strategy].cache_class,
                       "counted_blocks": sum(len(b.blocks) for b in self.block_lists), **self.driver.describe()}
        if self.installation is not None:
            description["hooked_modules"] = len(self.installation.hooked_modules)
        return description


class DiffusersBackend(Backend):
    name = "diffusers"
    description = "diffusers' cache hooks (CacheMixin.enable_cache) with phyai_cache's run lifecycle"

    def support(self, spec: StrategySpec, version: str | None) -> StrategySupport:
        cache = DIFFUSERS_CACHES.get(spec.name)
        if cache is None:
            return unsupported(spec.name, "declared as served by diffusers, but this adapter has no driver for it")
        if version is None:
            return unsupported(spec.name, "diffusers is not installed (pip install 'phyai-cache[diffusers]')")
        minimum = MIN_VERSIONS["diffusers"].get(spec.name)
        if minimum is None:
            return unsupported(spec.name, "versions.MIN_VERSIONS names no diffusers release that has it")
        if not feature_available("diffusers", spec.name, version):
            return unsupported(spec.name, f"diffusers {version} has no {cache.cache_class}", minimum)
        return StrategySupport(spec.name, True, min_version=minimum)

    def prepare(self, target: CacheTarget, config: DiTCacheConfig, blocks: BlocksArg = None) -> DiffusersPlan:
        support = self.supports(config.strategy)
        if not support.available:
            needed = f", needs >= {support.min_version}" if support.min_version else ""
            raise BackendUnavailableError(
                f"strategy {config.strategy!r} is not available on backend 'diffusers' ({support.reason}{needed})")
        refuse_sharded(target.parallel, "diffusers", "its cache hooks decide on each process's own tensors and "
                                                  "never reduce across ranks")
        from .model import check_block_cache, require_cache_mixin

        cache = DIFFUSERS_CACHES[config.strategy]
        driver_class = cache.driver_class()
        transformer = target.transformer
        require_cache_mixin(transformer)
        driver_class.check_config(config)
        config_class = cache.config_class()
        rules = driver_class.option_rules.for_fields({f.name for f in dataclasses.fields(config_class)},
                                                     source=f"diffusers {config_class.__name__}")
        options = rules.validate(config.strategy, self.name, config.options)
        if driver_class.block_hooks is not None:
            check_block_cache(transformer, config.strategy, driver_class.block_hooks)
        driver = driver_class(config, options, type(transformer).__name__)
        return DiffusersPlan(target, driver, _counted_blocks(transformer, blocks, cache, driver_class))


def _counted_blocks(transformer: Any, blocks: BlocksArg, cache: DiffusersCache,
                    driver_class: type[Driver]) -> list[BlockList]:
    """The block lists whose executions the stats count (``blocks=`` only selects these here)."""
    try:
        return discover_blocks(transformer, blocks)
    except DiTCacheConfigError:
        if blocks is not None or driver_class.block_hooks is not None:
            raise
        logger.warning("phyai_cache: %s has no block list diffusers describes; %s runs, but blocks_computed "
                       "is not counted (pass blocks=... to count)", type(transformer).__name__, cache.cache_class)
        return []
