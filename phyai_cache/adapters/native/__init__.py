"""The native backend: phyai_cache's own engine, for any transformer, with no extra dependency.

It serves every strategy whose declaration (phyai_cache/strategies/) carries a ``NativeSpec``:
``fbcache`` (first-block cache, Fn=1 Bn=0) and ``dbcache`` (Fn front blocks decide, Bn back blocks
always run), both optionally with a TaylorSeer forecaster (``taylorseer_order``); ``taylorseer``
(scheduled: compute every ``cache_interval``-th step or per ``compute_mask``, forecast between); and
the strategies with a statistic of their own (``magcache``, ``easycache``, ``teacache``: :mod:`.method`).
It is also the engine that serves requests with their own configs and step-level batches with
per-row decisions (docs/serving.md), and the one that serves models spread over several processes
(docs/distributed.md: the statistic is reduced over the model's group). See :mod:`.chain` for the
mechanism (:mod:`.run_setup` for a run's layout and rules, :mod:`.groups` for a forward's row
groups), :mod:`.history` for what is reused, and phyai_cache/decision.py for the decision.
"""

from __future__ import annotations

from typing import Any

from ..._version import __version__
from ...blocks import BlockList, BlocksArg, discover_blocks
from ...config import DiTCacheConfig
from ...distributed import check_blocks_see_their_shard
from ...runtime import CacheTarget, CallSource
from ...strategies import StrategySpec
from ..base import Backend, Installation, Plan, StrategySupport
from .chain import ChainInstallation
from .run_setup import RunSetup, run_setup


class NativePlan(Plan):
    def __init__(self, lists: list[BlockList], config: DiTCacheConfig, setup: RunSetup, parallel: Any = None) -> None:
        self.lists = lists
        self.config = config
        self.setup = setup
        self.parallel = parallel

    def install(self, lifecycle: CallSource) -> Installation:
        return ChainInstallation(self.lists, self.config, lifecycle)

    def describe(self) -> dict[str, Any]:
        layout = self.setup.layout
        return {
            "blocks": len(layout),
            "front": layout.names[: layout.front_blocks],
            "back": layout.names[len(layout) - layout.back_blocks:] if layout.back_blocks else [],
            "segments": layout.num_segments,
            **({"parallel": self.parallel.describe()} if self.parallel is not None else {}),
        }


class NativeBackend(Backend):
    name = "native"
    description = "phyai_cache's own block cache engine (torch only)"

    def version(self) -> str | None:
        return __version__

    def support(self, spec: StrategySpec, version: str | None) -> StrategySupport:
        return StrategySupport(spec.name, True)

    def prepare(self, target: CacheTarget, config: DiTCacheConfig, blocks: BlocksArg = None) -> NativePlan:
        lists = discover_blocks(target.transformer, blocks)
        check_blocks_see_their_shard(lists)  # context parallelism must split before the cached blocks
        return NativePlan(lists, config, run_setup(lists, config, target.transformer), target.parallel)
