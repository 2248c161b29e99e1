"""The diffusers backend: diffusers' own cache hooks behind the unified config.

Strategies: ``fbcache`` (FirstBlockCache), ``pab`` (PyramidAttentionBroadcast), ``fastercache``
(FasterCache, attention reuse only), ``taylorseer`` (TaylorSeerCache) and ``magcache`` (MagCache), each
from the diffusers release listed in :data:`phyai_cache.versions.MIN_VERSIONS`. The mapping of every
unified field, what cannot be honoured and the upstream bugs this layer neutralises are documented in
docs/backend-diffusers.md.

Importing this module never imports diffusers: that happens in :meth:`DiffusersBackend.prepare`.
"""

from __future__ import annotations

import logging
from typing import Any

from ...blocks import BlocksArg, BlockList, discover_blocks
from ...config import STRATEGIES, DiTCacheConfig
from ...errors import BackendUnavailableError, DiTCacheConfigError
from ...lifecycle import CacheTarget, Lifecycle
from ...versions import MIN_VERSIONS, feature_available
from ..base import Backend, Installation, Plan, StrategySupport, all_strategies, unsupported
from .driver import Driver

logger = logging.getLogger("phyai_cache")

# strategy -> the diffusers cache class that serves it (for messages and the support table).
DIFFUSERS_CACHES = {
    "fbcache": "FirstBlockCache",
    "pab": "PyramidAttentionBroadcast",
    "fastercache": "FasterCache",
    "taylorseer": "TaylorSeerCache",
    "magcache": "MagCache",
}
# Strategies whose hooks only touch attention modules: they can run without counted block lists.
_ATTENTION_LEVEL = ("pab", "fastercache", "taylorseer")


class DiffusersPlan(Plan):
    def __init__(self, target: CacheTarget, driver: Driver, block_lists: list[BlockList]) -> None:
        self.target = target
        self.driver = driver
        self.block_lists = block_lists
        self.installation: Any = None

    def install(self, lifecycle: Lifecycle) -> Installation:
        from .install import DiffusersInstallation

        self.installation = DiffusersInstallation(self.target, self.driver, self.block_lists, lifecycle)
        return self.installation

    def describe(self) -> dict[str, Any]:
        description = {"diffusers_cache": DIFFUSERS_CACHES[self.driver.strategy],
                       "counted_blocks": sum(len(b.blocks) for b in self.block_lists), **self.driver.describe()}
        if self.installation is not None:
            description["hooked_modules"] = len(self.installation.hooked_modules)
        return description


class DiffusersBackend(Backend):
    name = "diffusers"
    description = "diffusers' cache hooks (CacheMixin.enable_cache) with phyai_cache's run lifecycle"

    def strategy_support(self, version: str | None) -> dict[str, StrategySupport]:
        def support(strategy: str) -> StrategySupport:
            if version is None:
                return unsupported(strategy, "diffusers is not installed (pip install 'phyai-cache[diffusers]')")
            if strategy not in DIFFUSERS_CACHES:
                return unsupported(strategy, "diffusers has no such cache (dbcache: backends native, cache_dit)")
            minimum = MIN_VERSIONS["diffusers"][strategy]
            if not feature_available("diffusers", strategy, version):
                return unsupported(strategy, f"diffusers {version} has no {DIFFUSERS_CACHES[strategy]}", minimum)
            return StrategySupport(strategy, True, min_version=minimum)

        return all_strategies(support)

    def prepare(self, target: CacheTarget, config: DiTCacheConfig, blocks: BlocksArg = None) -> DiffusersPlan:
        support = self.supports(config.strategy)
        if not support.available:
            needed = f", needs >= {support.min_version}" if support.min_version else ""
            raise BackendUnavailableError(
                f"strategy {config.strategy!r} is not available on backend 'diffusers' ({support.reason}{needed})")
        from .model import check_block_cache, require_cache_mixin
        from .options import check_unified_fields, validate_options

        transformer = target.transformer
        require_cache_mixin(transformer)
        check_unified_fields(config)
        options = validate_options(config.strategy, _diffusers_config_class(config.strategy), config.options)
        if config.strategy in ("fbcache", "magcache"):
            check_block_cache(transformer, config.strategy)
        driver = _make_driver(config, options, type(transformer).__name__)
        return DiffusersPlan(target, driver, _counted_blocks(transformer, blocks, config.strategy))


def _diffusers_config_class(strategy: str) -> type:
    import importlib

    module, name = {
        "fbcache": ("first_block_cache", "FirstBlockCacheConfig"),
        "pab": ("pyramid_attention_broadcast", "PyramidAttentionBroadcastConfig"),
        "fastercache": ("faster_cache", "FasterCacheConfig"),
        "taylorseer": ("taylorseer_cache", "TaylorSeerCacheConfig"),
        "magcache": ("mag_cache", "MagCacheConfig"),
    }[strategy]
    return getattr(importlib.import_module(f"diffusers.hooks.{module}"), name)


def _make_driver(config: DiTCacheConfig, options: dict[str, Any], model_class: str) -> Driver:
    if config.strategy == "fbcache":
        from .fbcache import FirstBlockCacheDriver

        return FirstBlockCacheDriver(config, options)
    if config.strategy == "pab":
        from .attention import PyramidAttentionBroadcastDriver

        return PyramidAttentionBroadcastDriver(config, options)
    if config.strategy == "fastercache":
        from .attention import FasterCacheDriver

        return FasterCacheDriver(config, options)
    if config.strategy == "taylorseer":
        from .taylorseer import TaylorSeerDriver

        return TaylorSeerDriver(config, options)
    from .magcache import MagCacheDriver, require_ratios

    require_ratios(model_class, options)
    return MagCacheDriver(config, options, model_class)


def _counted_blocks(transformer: Any, blocks: BlocksArg, strategy: str) -> list[BlockList]:
    """The block lists whose executions the stats count (``blocks=`` only selects these here)."""
    try:
        return discover_blocks(transformer, blocks)
    except DiTCacheConfigError:
        if blocks is not None or strategy not in _ATTENTION_LEVEL:
            raise
        logger.warning("phyai_cache: %s has no block list diffusers describes; %s runs, but blocks_computed "
                       "is not counted (pass blocks=... to count)", type(transformer).__name__, strategy)
        return []


assert set(DIFFUSERS_CACHES) <= set(STRATEGIES)
