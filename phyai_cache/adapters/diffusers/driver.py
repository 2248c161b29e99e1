"""The per-strategy part of the diffusers adapter: which config to apply and how to steer its hooks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ...config import DiTCacheConfig
from ...errors import DiTCacheConfigError
from ...lifecycle import CallInfo, RunState
from .schedule import DiffusersRunState, StepRules

if TYPE_CHECKING:
    from .install import DiffusersInstallation


class Driver:
    """Base class: one per strategy. ``diffusers_config`` is built (and so validated) at prepare time."""

    strategy: str = ""
    uses_context = False  # hook state keyed by diffusers' cache_context name

    def __init__(self, config: DiTCacheConfig, options: dict[str, Any]) -> None:
        self.config = config
        self.options = options
        self.rules = StepRules(config)
        self.installation: DiffusersInstallation | None = None
        self.diffusers_config = self.build_config()

    def build_config(self) -> Any:
        raise NotImplementedError

    # -- install time ---------------------------------------------------------------------------

    def before_apply(self, installation: DiffusersInstallation) -> None:
        """Wrap what must sit under diffusers' hooks (runs before enable_cache)."""
        self.installation = installation

    def attach(self, installation: DiffusersInstallation) -> None:
        """Find the hooks diffusers registered and patch what the strategy steers."""

    def counts_invocations(self, module: torch.nn.Module) -> bool:
        return False

    def no_op_error(self, transformer: torch.nn.Module) -> Exception:
        return DiTCacheConfigError(
            "target", f"<{type(transformer).__name__}>", f"a model diffusers' {self.strategy} can hook",
            hint="diffusers registered no hook on any submodule, so nothing would ever be cached",
        )

    # -- run time -------------------------------------------------------------------------------

    def begin_run(self, run: RunState) -> None:
        pass

    def before_call(self, call: CallInfo, state: DiffusersRunState) -> None:
        pass

    def after_call(self, call: CallInfo, state: DiffusersRunState) -> None:
        pass

    def extra_state(self, state: DiffusersRunState) -> list[Any]:
        """Cache tensors the adapter keeps itself (for ``cache_bytes``)."""
        return []

    def describe(self) -> dict[str, Any]:
        return {}

    # -- helpers --------------------------------------------------------------------------------

    @property
    def lifecycle(self) -> Any:
        assert self.installation is not None
        return self.installation.lifecycle

    def find_hooks(self, attribute: str) -> list[Any]:
        """Hook objects that have ``attribute`` (diffusers' hook classes are matched by behaviour)."""
        assert self.installation is not None
        return [h.hook for h in self.installation.hooks if hasattr(h.hook, attribute)]


def hook_internals_error(strategy: str, missing: str) -> Exception:
    from ...errors import BackendUnavailableError

    return BackendUnavailableError(
        f"diffusers' {strategy} hooks at the installed version have no {missing!r}, which phyai_cache uses "
        "to apply the unified step rules; use backend 'native' or another diffusers release"
    )


def relative_l1(current: torch.Tensor, reference: torch.Tensor) -> float:
    """mean|current - reference| / mean|reference| (float32 means), the native engine's statistic."""
    ratio = (current - reference).abs().mean(dtype=torch.float32) / reference.abs().mean(dtype=torch.float32)
    return float(ratio.item())
