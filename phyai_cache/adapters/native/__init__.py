"""The native backend: phyai_cache's own engine, for any transformer, with no extra dependency.

Strategies: ``fbcache`` (first-block cache, Fn=1 Bn=0), ``dbcache`` (Fn front blocks decide, Bn back
blocks always run), both optionally with a TaylorSeer forecaster (``taylorseer_order``), and
``taylorseer`` (scheduled: compute every ``cache_interval``-th step or per ``compute_mask``, forecast
between). See :mod:`.chain` for the mechanism and :mod:`.policy` for the decision.
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

NATIVE_STRATEGIES = ("fbcache", "dbcache", "taylorseer")


class NativePlan(Plan):
    def __init__(self, layout: ChainLayout, config: DiTCacheConfig) -> None:
        self.layout = layout
        self.config = config

    def install(self, lifecycle: Lifecycle) -> Installation:
        separate = self.config.separate_cfg is not False  # "auto" -> separate: always correct
        return ChainInstallation(self.layout, StepSchedule(self.config), separate, lifecycle,
                                 forecast_order=self.config.taylorseer_order)

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
        if config.options:
            name = next(iter(config.options))
            raise DiTCacheConfigError(f"options.{name}", config.options[name], "no options: backend 'native' has none")
        lists = discover_blocks(target.transformer, blocks)
        total = sum(len(block_list.blocks) for block_list in lists)
        front, back = _block_counts(config)
        _check_block_counts(front, back, total)
        return NativePlan(ChainLayout(lists, front, back), config)


def _block_counts(config: DiTCacheConfig) -> tuple[int, int]:
    """(Fn, Bn). Scheduled TaylorSeer decides without measuring, so it runs no front block and
    forecasts the whole chain."""
    if config.strategy == "taylorseer":
        return 0, 0
    return config.front_blocks, config.back_blocks


def _check_block_counts(front: int, back: int, total: int) -> None:
    """At least one middle block must remain between the front and back blocks, or nothing is cached."""
    if front + back < total:
        return
    if front >= total:
        raise DiTCacheConfigError(
            "front_blocks", front, f"1 to {max(total - 1 - back, 1)} for this model ({total} blocks, back_blocks={back})"
        )
    raise DiTCacheConfigError(
        "back_blocks", back, f"0 to {max(total - 1 - front, 0)} for this model ({total} blocks, front_blocks={front})"
    )
