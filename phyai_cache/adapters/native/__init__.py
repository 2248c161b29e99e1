"""The native backend: phyai_cache's own engine, for any transformer, with no extra dependency.

Strategies: ``fbcache`` (first-block cache, Fn=1 Bn=0) and ``dbcache`` (Fn front blocks decide,
Bn back blocks always run). See :mod:`.chain` for the mechanism and :mod:`.policy` for the decision.
"""

from __future__ import annotations

from typing import Any

from ..._version import __version__
from ...blocks import BlocksArg, discover_blocks
from ...config import DiTCacheConfig
from ...errors import DiTCacheConfigError
from ...lifecycle import CacheTarget, Lifecycle
from ..base import Backend, Installation, Plan, StrategySupport, all_strategies, unsupported
from .chain import ChainInstallation, ChainLayout
from .policy import StepSchedule

NATIVE_STRATEGIES = ("fbcache", "dbcache")


class NativePlan(Plan):
    def __init__(self, layout: ChainLayout, config: DiTCacheConfig) -> None:
        self.layout = layout
        self.config = config

    def install(self, lifecycle: Lifecycle) -> Installation:
        separate = self.config.separate_cfg is not False  # "auto" -> separate: always correct
        return ChainInstallation(self.layout, StepSchedule(self.config), separate, lifecycle)

    def describe(self) -> dict[str, Any]:
        layout = self.layout
        return {
            "blocks": len(layout),
            "front": layout.names[: layout.front_blocks],
            "back": layout.names[len(layout) - layout.back_blocks:] if layout.back_blocks else [],
            "segments": layout.num_segments,
        }


class NativeBackend(Backend):
    name = "native"
    description = "phyai_cache's own block cache engine (torch only)"

    def version(self) -> str | None:
        return __version__

    def strategy_support(self, version: str | None) -> dict[str, StrategySupport]:
        def support(strategy: str) -> StrategySupport:
            if strategy in NATIVE_STRATEGIES:
                return StrategySupport(strategy, True)
            return unsupported(strategy, "not implemented by the native engine")

        return all_strategies(support)

    def prepare(self, target: CacheTarget, config: DiTCacheConfig, blocks: BlocksArg = None) -> NativePlan:
        if config.taylorseer_order is not None:
            raise DiTCacheConfigError(
                "taylorseer_order", config.taylorseer_order, "null on backend 'native' in this release",
                hint="the native TaylorSeer forecaster is not implemented yet",
            )
        if config.options:
            name = next(iter(config.options))
            raise DiTCacheConfigError(f"options.{name}", config.options[name], "no options: backend 'native' has none")
        lists = discover_blocks(target.transformer, blocks)
        total = sum(len(block_list.blocks) for block_list in lists)
        _check_block_counts(config, total)
        return NativePlan(ChainLayout(lists, config.front_blocks, config.back_blocks), config)


def _check_block_counts(config: DiTCacheConfig, total: int) -> None:
    """At least one middle block must remain between the front and back blocks, or nothing is cached."""
    front, back = config.front_blocks, config.back_blocks
    if front + back < total:
        return
    if front >= total:
        raise DiTCacheConfigError(
            "front_blocks", front, f"1 to {max(total - 1 - back, 1)} for this model ({total} blocks, back_blocks={back})"
        )
    raise DiTCacheConfigError(
        "back_blocks", back, f"0 to {max(total - 1 - front, 0)} for this model ({total} blocks, front_blocks={front})"
    )
