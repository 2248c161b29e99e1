"""The native backend: phyai_cache's own engine, for any transformer, with no extra dependency.

It serves every strategy whose declaration (phyai_cache/strategies/) carries a ``NativeMethod``:
today ``fbcache`` (first-block cache, Fn=1 Bn=0), ``dbcache`` (Fn front blocks decide, Bn back
blocks always run), both optionally with a TaylorSeer forecaster (``taylorseer_order``), and
``taylorseer`` (scheduled: compute every ``cache_interval``-th step or per ``compute_mask``,
forecast between). See :mod:`.chain` for the mechanism, :mod:`.policy` for what is reused, and
phyai_cache/decision.py for the decision.
"""

from __future__ import annotations

from typing import Any

from ..._version import __version__
from ...blocks import BlocksArg, check_block_counts, discover_blocks
from ...config import DiTCacheConfig
from ...decision import StepRules
from ...errors import BackendUnavailableError, DiTCacheConfigError
from ...runtime import CacheTarget, CallSource
from ...strategies import NativeMethod, StrategySpec, get_strategy
from ..base import Backend, Installation, Plan, StrategySupport
from .chain import ChainInstallation, ChainLayout


class NativePlan(Plan):
    def __init__(self, layout: ChainLayout, config: DiTCacheConfig, method: NativeMethod) -> None:
        self.layout = layout
        self.config = config
        self.method = method

    def install(self, lifecycle: CallSource) -> Installation:
        separate = self.config.separate_cfg is not False  # "auto" -> separate: always correct
        return ChainInstallation(self.layout, StepRules(self.config), separate, self.method.measured, lifecycle,
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

    def support(self, spec: StrategySpec, version: str | None) -> StrategySupport:
        return StrategySupport(spec.name, True)

    def prepare(self, target: CacheTarget, config: DiTCacheConfig, blocks: BlocksArg = None) -> NativePlan:
        if config.options:
            name = next(iter(config.options))
            raise DiTCacheConfigError(f"options.{name}", config.options[name], "no options: backend 'native' has none")
        spec = get_strategy(config.strategy)
        method = spec.native
        if method is None:  # the registry never routes such a config here; a direct prepare() might
            raise BackendUnavailableError(f"strategy {spec.name!r} is not available on backend 'native': "
                                          f"{spec.why_not('native')}")
        lists = discover_blocks(target.transformer, blocks)
        total = sum(len(block_list.blocks) for block_list in lists)
        # Scheduled strategies decide without measuring: no front block, the whole chain is forecast.
        front, back = (config.front_blocks, config.back_blocks) if method.measured else (0, 0)
        check_block_counts(front, back, total)
        return NativePlan(ChainLayout(lists, front, back), config, method)
