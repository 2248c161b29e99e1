"""pab and fastercache: diffusers' attention-output reuse, with per-branch state.

Both hooks keep one plain state object per attention module (an iteration counter and the cached
output) and ignore ``cache_context``; with separate cond/uncond calls the uncond call therefore reads
the cond call's attention (measured upstream bug). Around each call we swap every hook's ``state``
for the calling branch's own state object, so cond and uncond never mix, and restore it afterwards.
The states live in the run and are dropped with it.

``active_steps`` maps onto the step index: outside it (and on a branch's first step) the timestep
callback returns NaN, which lies outside every timestep range, so the hooks compute. Inside it the
callback returns the real timestep, so diffusers' timestep ranges (options) still apply.

What the stats mean here: these caches skip attention, not blocks. ``blocks_computed`` stays at the
full count; a call is recorded as ``cached`` when at least one hooked attention module reused (or, for
FasterCache, extrapolated) its output instead of executing, with the reason
``attention_reused:<reused>/<hooked calls>``.

FasterCache's CFG cache (approximating the unconditional half of a batched [uncond, cond] call from
the conditional half) is not used: ``is_guidance_distilled=True`` is always set, which keeps
FasterCache's attention reuse only — the part that works with separate and with batched CFG calls.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..._patch import InstancePatch
from ...decision import cache_gap
from ...errors import DiTCacheConfigError
from ...runtime import CallInfo, RunState
from ...strategies._options import Check, OptionRules, number, optional, patterns, positive_int
from .driver import DiffusersRunState, Driver, hook_internals_error
from .model import TimestepReader, attention_classes, attention_module_names


def _timestep_range(label: str, value: Any) -> tuple[float, float]:
    allowed = "[low, high] in timestep units (0..1000), low < high; skipping happens for low < t < high"
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise DiTCacheConfigError(label, value, allowed)
    low, high = (number(label, v) for v in value)
    if not low < high:
        raise DiTCacheConfigError(label, value, allowed)
    return (low, high)


def _constant_weight(label: str, value: Any) -> Any:
    weight = number(label, value)
    return lambda _module: weight


def _attention_options(*kinds: str) -> dict[str, Check]:
    """The per-kind fields PAB and FasterCache share: which blocks, at which timesteps, every how many."""
    return {
        **{f"{kind}_attention_block_skip_range": optional(positive_int) for kind in kinds},
        **{f"{kind}_attention_timestep_skip_range": _timestep_range for kind in kinds},
        **{f"{kind}_attention_block_identifiers": patterns for kind in kinds},
    }


_TIMESTEP_SOURCE = ("phyai_cache supplies it: the pipeline's current timestep (or the transformer call's "
                    "timestep argument), and none outside active_steps")
_CFG_CACHE = ("FasterCache's CFG cache approximates the unconditional half of a batched [uncond, cond] call; "
              "phyai_cache runs FasterCache's attention reuse per CFG branch (is_guidance_distilled=True), "
              "which works with separate and batched CFG calls alike")


class AttentionReuseDriver(Driver):
    """Shared by PAB and FasterCache."""

    identifiers_option = "spatial_attention_block_identifiers"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._timestep = math.nan
        super().__init__(*args, **kwargs)

    def current_timestep(self) -> float:
        return self._timestep

    # -- install --------------------------------------------------------------------------------

    def before_apply(self, installation: Any) -> None:
        super().before_apply(installation)
        self.reader = TimestepReader(installation.transformer, installation.target.pipeline)
        self._counters: dict[int, InstancePatch] = {}  # execution counters, under the hooks added next
        installation.add_undo(self._remove_counters)
        classes = attention_classes()
        for module in installation.transformer.modules():
            if isinstance(module, classes):
                self._counters[id(module)] = InstancePatch(module, "forward", self._counting(module.forward))

    def _remove_counters(self) -> None:
        for patch in reversed(list(self._counters.values())):
            patch.restore()
        self._counters.clear()

    def _counting(self, original: Any) -> Any:
        lifecycle = self.installation.lifecycle

        def forward(*args: Any, **kwargs: Any) -> Any:
            call = lifecycle.current_call()
            if call is not None and call.scratch is not None:
                call.scratch.executions += 1
            return original(*args, **kwargs)

        return forward

    def attach(self, installation: Any) -> None:
        self.hooks = [h.hook for h in installation.hooks]
        if not all(hasattr(hook, "state") for hook in self.hooks):
            raise hook_internals_error(self.strategy, "state")
        hooked = {id(m) for m in installation.hooked_modules}
        for key in [key for key in self._counters if key not in hooked]:  # unhooked attention: no counter
            self._counters.pop(key).restore()

    def counts_invocations(self, module: torch.nn.Module) -> bool:
        return module is not self.installation.transformer

    def no_op_error(self, transformer: torch.nn.Module) -> Exception:
        names = attention_module_names(transformer)
        return DiTCacheConfigError(
            f"options.{self.identifiers_option}",
            self.options.get(self.identifiers_option, "<diffusers default>"),
            "patterns (re.search) matching attention modules of this model",
            hint=f"diffusers' {self.strategy} hooked no attention module of {type(transformer).__name__}; "
                 f"its attention modules: {', '.join(names[:6]) or 'none'}",
        )

    # -- run time -------------------------------------------------------------------------------

    def begin_run(self, run: RunState, state: DiffusersRunState) -> None:
        state.strategy_state = {}  # branch -> {id(hook): the branch's state object}

    def before_call(self, call: CallInfo, state: DiffusersRunState) -> None:
        # Read on every call, before the hook states are swapped: a run without timesteps fails at its
        # first call, not silently computing every step.
        timestep = self.reader.require(call.args, call.kwargs, self.strategy)
        counters = state.counters(call.branch)
        branch_states = state.strategy_state.get(call.branch)
        fresh = branch_states is None or counters.key != call.scratch.key
        if fresh:  # first call of the branch, or new input shapes: cached outputs do not fit
            branch_states = state.strategy_state[call.branch] = {id(h): type(h.state)() for h in self.hooks}
        call.scratch.saved = [(hook, hook.state) for hook in self.hooks]
        for hook in self.hooks:
            hook.state = branch_states[id(hook)]
        if self.rules.inactive(call.step):
            call.scratch.reason = "inactive"
        elif fresh:
            call.scratch.reason = cache_gap(call.scratch.key, counters.key, has_cache=False)
        self._timestep = math.nan if call.scratch.reason else timestep

    def after_call(self, call: CallInfo, state: DiffusersRunState) -> None:
        for hook, own_state in call.scratch.saved or ():
            hook.state = own_state
        self._timestep = math.nan
        scratch = call.scratch
        reused = scratch.invocations - scratch.executions
        cached = reused > 0
        call.decision = "cached" if cached else "computed"
        call.reason = f"attention_reused:{reused}/{scratch.invocations}" if cached else (scratch.reason or "schedule")
        state.counters(call.branch).record(cached, scratch.key)

    def extra_state(self, state: DiffusersRunState) -> list[Any]:
        return list((state.strategy_state or {}).values())


class PyramidAttentionBroadcastDriver(AttentionReuseDriver):
    strategy = "pab"
    option_rules = OptionRules(checks=_attention_options("spatial", "temporal", "cross"),
                               refused={"current_timestep_callback": _TIMESTEP_SOURCE})

    def build_config(self) -> Any:
        from diffusers.hooks.pyramid_attention_broadcast import PyramidAttentionBroadcastConfig

        options = dict(self.options)
        ranges = [f"{kind}_attention_block_skip_range" for kind in ("spatial", "temporal", "cross")]
        if all(options.get(name) is None for name in ranges):
            options[ranges[0]] = 2  # diffusers' own fallback (it would warn and mutate the config)
        return PyramidAttentionBroadcastConfig(**options, current_timestep_callback=self.current_timestep)

    def describe(self) -> dict[str, Any]:
        return {"diffusers_config": _plain_fields(self.diffusers_config)}


class FasterCacheDriver(AttentionReuseDriver):
    strategy = "fastercache"
    option_rules = OptionRules(
        checks={**_attention_options("spatial", "temporal"),
                "attention_weight_callback": _constant_weight},  # a number: the constant weight
        refused={"current_timestep_callback": _TIMESTEP_SOURCE,
                 **{name: _CFG_CACHE for name in (
                     "is_guidance_distilled", "tensor_format", "unconditional_batch_skip_range",
                     "unconditional_batch_timestep_skip_range", "low_frequency_weight_update_timestep_range",
                     "high_frequency_weight_update_timestep_range", "alpha_low_frequency", "alpha_high_frequency",
                     "low_frequency_weight_callback", "high_frequency_weight_callback",
                     "_unconditional_conditional_input_kwargs_identifiers")}},
    )

    def build_config(self) -> Any:
        from diffusers.hooks.faster_cache import FasterCacheConfig

        options = dict(self.options)
        options.setdefault("attention_weight_callback", lambda _module: 0.5)  # diffusers' default weight
        unused = lambda _module: 1.0  # noqa: E731 - frequency weights belong to the CFG cache, which is off
        return FasterCacheConfig(**options, is_guidance_distilled=True, current_timestep_callback=self.current_timestep,
                                 low_frequency_weight_callback=unused, high_frequency_weight_callback=unused)

    def describe(self) -> dict[str, Any]:
        return {"diffusers_config": _plain_fields(self.diffusers_config),
                "cfg_cache": "off (is_guidance_distilled=True)"}


def _plain_fields(config: Any) -> dict[str, Any]:
    import dataclasses

    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if not callable(getattr(config, f.name)) and not f.name.startswith("_")}
