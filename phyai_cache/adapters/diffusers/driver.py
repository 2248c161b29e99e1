"""The per-strategy part of the diffusers adapter: which config to apply and how to steer its hooks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ...config import DiTCacheConfig
from ...decision import BranchCounters, SharedDecisions, StepRules
from ...errors import DiTCacheConfigError
from ...runtime import CallInfo, RunState

if TYPE_CHECKING:
    from .install import DiffusersInstallation


@dataclass
class DiffusersRunState:
    """Per-run state of the adapter; dropped when the run ends (also when it raised)."""

    shared: SharedDecisions  # separate_cfg=False: the leader branch's decisions
    branches: dict[str, BranchCounters] = field(default_factory=dict)
    strategy_state: Any = None  # e.g. PAB's per-branch hook states

    def counters(self, branch: str) -> BranchCounters:
        return self.branches.setdefault(branch, BranchCounters())


class Driver:
    """Base class: one per strategy. ``diffusers_config`` is built (and so validated) at prepare time."""

    strategy: str = ""
    uses_context = False  # hook state keyed by diffusers' cache_context name

    def __init__(self, config: DiTCacheConfig, options: dict[str, Any], model_class: str) -> None:
        self.config = config
        self.options = options
        self.model_class = model_class
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

    def begin_run(self, run: RunState, state: DiffusersRunState) -> None:
        pass

    def context_kwargs(self, call: CallInfo) -> dict[str, Any] | None:
        """Step information for diffusers' ``cache_context(name, **kwargs)``; when given, the call always
        enters a context of its own carrying it (SeaCache reads the step, sigma and step count there)."""
        return None

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
