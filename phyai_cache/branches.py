"""Which branch and which step each transformer call of a run is.

The branch is, in order of precedence: the name given with ``handle.branch(name)`` (``explicit``);
the name of the diffusers ``cache_context(name)`` the pipeline entered (``context_name``);
otherwise the call's position within its denoising step (``"call0"``, ``"call1"``), where calls
belong to the same step when they see the same timestep object (:meth:`BranchNaming._step_key`).
Steps are counted per branch. A run that cannot tell its calls apart is never silent: it warns, and
refuses a call that would compare one CFG branch with another (:meth:`BranchNaming._check_steps`).
"""

from __future__ import annotations

from typing import Any

from .errors import CacheStateError
from .runtime import CacheTarget, CallInfo, RunState


class BranchNaming:
    """Names each call's branch and counts its step, for the :class:`~phyai_cache.lifecycle.Lifecycle`
    of one target; ``explicit`` and ``context_name`` are set by the scopes that name branches."""

    def __init__(self, target: CacheTarget) -> None:
        self.target = target
        self.explicit: str | None = None  # handle.branch(name)
        self.context_name: str | None = None  # the pipeline's cache_context(name)

    def begin_call(self, run: RunState, args: tuple, kwargs: dict[str, Any]) -> CallInfo:
        """Name the call's branch and count its step; never silently mix branches (see :meth:`_check_steps`)."""
        if self.explicit is not None:
            branch, named_by = self.explicit, "handle.branch()"
        elif self.context_name is not None:
            branch, named_by = self.context_name, "the pipeline's cache_context()"
        else:
            key = self._step_key(args, kwargs)
            if key is None:
                branch, named_by = "default", None
                if run.config.enabled:
                    run.warn_once("timestep_unread", self.unread_timestep_message())
            else:
                branch, named_by = run.branch_by_step_key(key), "inferred"
        call = run.begin_call(branch, args, kwargs)
        self._check_steps(run, call, named_by)
        return call

    def _step_key(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        """An object that is identical for every call of one denoising step.

        diffusers pipelines keep the loop's timestep in ``_current_timestep``; a custom loop (phyai's
        schedulers among them) passes the same timestep tensor to each branch call of a step, by
        keyword or by position.
        """
        pipeline = self.target.pipeline
        if pipeline is not None:
            key = getattr(pipeline, "__dict__", {}).get("_current_timestep")
            if key is not None:
                return key
        return self.target.signature.timestep_value(args, kwargs)

    def _check_steps(self, run: RunState, call: CallInfo, named_by: str | None) -> None:
        """A branch that sees more calls than the run declared steps is mixing calls that are not its own.

        Where no branch could be told apart (no timestep, no name) the cache would compare one CFG
        branch with the other, so the call is refused before it runs. Named or inferred branches may
        legitimately run more calls than declared (a scheduler with two evaluations per step, a
        custom timestep list longer than ``num_inference_steps``): warned once and flagged.
        """
        declared = run.stats.num_inference_steps
        if not run.config.enabled or declared is None or call.step < declared:
            return
        fix = ("name each call's branch with `with handle.branch('cond'):` / `handle.branch('uncond')` "
               "around it (phyai runners: phyai_cache.integrations.phyai.attach does it), or declare the "
               "right num_inference_steps")
        message = (f"branch {call.branch!r} got call {call.step + 1} in a run declared with {declared} "
                   f"steps: its calls are not one denoising step each")
        if named_by is None:
            raise CacheStateError(f"{message}; the cache cannot tell this transformer's calls apart "
                                  f"({self.unread_timestep_message()}), so it would compare one CFG "
                                  f"branch with another: {fix}")
        run.warn_once("steps_exceeded", f"phyai_cache: {message} (branch named by {named_by}); if a "
                                        f"denoising step calls the transformer more than once per branch, {fix}")

    def unread_timestep_message(self) -> str:
        return (f"phyai_cache: cannot read a timestep from {type(self.target.transformer).__name__}'s calls "
                f"(looked for {self.target.signature.describe_timestep()}): all calls of the run count as "
                "one branch 'default'; with CFG or several calls per step, name them with handle.branch()")
