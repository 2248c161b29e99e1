"""Every (backend, strategy) this installation can serve, with settings that make a tiny
random-weight pipeline actually hit the cache (random weights show little redundancy)."""

from __future__ import annotations

from typing import Any

from phyai_cache import list_backends
from phyai_cache.strategies import get_strategy


def served_combinations() -> list[tuple[str, str]]:
    return [(report.name, strategy) for report in list_backends() if report.installed
            for strategy in report.available_strategies]


def settings_for(backend: str, strategy: str) -> dict[str, Any]:
    return dict(enabled=True, backend=backend, strategy=strategy, **get_strategy(strategy).hit_settings)


def combo_id(combo: tuple[str, str]) -> str:
    return f"{combo[0]}-{combo[1]}"
