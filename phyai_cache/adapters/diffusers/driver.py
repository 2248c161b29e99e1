"""The per-strategy part of the diffusers adapter: one :class:`Driver` subclass per strategy, in a module
of its own, holds everything about it — the options it accepts, the unified settings it cannot honour,
what its hooks need of the model's blocks, which config to apply and how to steer its hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ...config import DiTCacheConfig
from ...decision import BranchCounters, SharedDecisions, StepRules
from ...errors import DiTCacheConfigError
from ...runtime import CallInfo, RunState
from ...strategies._options import OptionRules
from .model import BlockHooks

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
    """Base class: one per strategy. ``diffusers_config`` is built (and so validated) at prepare time.

    option_rules:
        The ``options`` it accepts (fields of its diffusers config), the fields a unified field already
        sets, and the ones phyai_cache sets itself; checked against the installed config class.
    block_hooks:
        What its hooks need of the model's blocks (:class:`~.model.BlockHooks`, checked at enable), when
        they skip whole blocks; None when they touch attention modules only.
    no_forecaster:
        Why ``taylorseer_order`` cannot be honoured (and who serves it), when the cache has no forecaster.
    per_branch_state:
        Why a decision shared across CFG branches (``separate_cfg: false``) cannot be imposed on it,
        when it cannot.
    """

    strategy: str = ""
    uses_context = False  # hook state keyed by diffusers' cache_context name
    option_rules = OptionRules()
    block_hooks: BlockHooks | None = None
    no_forecaster: str | None = None
    per_branch_state: str | None = None

    def __init__(self, config: DiTCacheConfig, options: dict[str, Any], model_class: str) -> None:
        self.config = config
        self.options = options
        self.model_class = model_class
        self.rules = StepRules(config)
        self.installation: DiffusersInstallation | None = None
        self.diffusers_config = self.build_config()

    @classmethod
    def check_config(cls, config: DiTCacheConfig) -> None:
        """Refuse unified settings this diffusers cache cannot honour, naming who can (before anything
        is built). Drivers add their own checks and call this one last."""
        if cls.no_forecaster is not None and config.taylorseer_order is not None:
            raise DiTCacheConfigError(
                "taylorseer_order", config.taylorseer_order, f"null for {cls.strategy} on backend 'diffusers'",
                hint=cls.no_forecaster)
        if cls.per_branch_state is not None and config.separate_cfg is False:
            raise DiTCacheConfigError(
                "separate_cfg", False, f"true or 'auto' for {cls.strategy} on backend 'diffusers'",
                hint=f"{cls.per_branch_state}; a decision shared across branches cannot be imposed on it")

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
