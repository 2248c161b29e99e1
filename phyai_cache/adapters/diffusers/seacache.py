"""seacache on diffusers' SeaCache (diffusers >= 0.41), reconfigured for every run.

SeaCache compares a *Spectral-Evolution-Aware* indicator between steps: the raw visual latents,
Wiener-filtered in frequency space with a gain that depends on the step's noise level ``sigma``
(``power_exp`` shapes the clean-signal prior). The relative L1 change is accumulated and the blocks
are skipped while the sum stays below ``threshold``; the skipped stack's residual is reused (order
0) or extrapolated linearly (order 1).

Mapping: ``threshold`` -> ``threshold``; ``warmup_steps`` (and the start of ``active_steps``) ->
``retention_steps``; the end of ``active_steps`` -> ``cache_end_steps = steps - end`` (0 without an
end); ``max_consecutive_cached`` -> ``max_consecutive_cached`` (null = diffusers' 0, unlimited);
``taylorseer_order`` -> ``residual_order`` (0 or 1); ``options.power_exp`` passes through.

What diffusers leaves to the caller, phyai_cache supplies: SeaCache runs only inside a
``cache_context(name, step_index=..., sigma=..., num_inference_steps=...)`` (otherwise it "fails
open" and never caches), so every call enters one with the branch's step, the run's step count and
``sigma = timestep / 1000`` (flow matching: the timesteps are ``sigma * 1000``); and it needs the
visual latents as ``(C, T, H, W)`` (``raw_vision_callback``), built in for Wan T2V and Cosmos 3 only,
so :func:`raw_vision` reads them for image and video models generally (5-D and 4-D latents, packed
tokens with ``img_ids`` such as Flux, with ``img_shapes`` such as QwenImage, or with
``num_frames``/``height``/``width`` such as LTX).

Where diffusers would fail open for good, the run fails instead: a call without a readable timestep
or latents raises :class:`~phyai_cache.errors.CacheStateError` before it runs (the first call of a
run already shows it), and a model whose first and last blocks return different streams (Flux2),
on which SeaCache never records a residual, is refused at enable time (``model.check_block_cache``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ...calls import CallSignature
from ...config import DiTCacheConfig
from ...errors import CacheStateError, DiTCacheConfigError
from ...runtime import CallInfo, RunState
from ...strategies._options import OptionRules, positive_number
from .driver import DiffusersRunState, Driver
from .model import BlockHooks, TimestepReader


class SeaCacheDriver(Driver):
    strategy = "seacache"
    uses_context = True
    option_rules = OptionRules(
        checks={"power_exp": positive_number},
        unified={"threshold": "threshold", "residual_order": "taylorseer_order",
                 "retention_steps": "warmup_steps (or the start of active_steps)",
                 "cache_end_steps": "active_steps (its end)", "max_consecutive_cached": "max_consecutive_cached"},
        refused={"raw_vision_callback": "phyai_cache supplies it: the call's latents as (C, T, H, W) per sample "
                                        "(diffusers' own reader for Wan T2V and Cosmos 3)"},
    )
    # SeaCache looks the block arguments up by the names the registry declares; it records the residual
    # only when the tail's output matches the head's input (shape and streams)
    block_hooks = BlockHooks(
        head_tail_failure="diffusers' SeaCache never records a residual between them, so it would cache no step")
    per_branch_state = "diffusers' seacache keeps its state per CFG branch"

    @classmethod
    def check_config(cls, config: DiTCacheConfig) -> None:
        if config.taylorseer_order not in (None, 0, 1):
            raise DiTCacheConfigError(
                "taylorseer_order", config.taylorseer_order, "0 or 1 for seacache on backend 'diffusers'",
                hint="diffusers' SeaCache reuses (0) or linearly extrapolates (1) the residual")
        super().check_config(config)

    def build_config(self) -> Any:
        from diffusers.hooks.sea_cache import SeaCacheConfig

        return SeaCacheConfig(**self._config_kwargs(None))

    def _config_kwargs(self, steps: int | None) -> dict[str, Any]:
        end = self.rules.end
        cap = self.config.max_consecutive_cached
        order = self.config.taylorseer_order
        return dict(
            threshold=self.config.threshold,
            residual_order=1 if order is None else order,
            retention_steps=max(self.rules.warmup_steps, self.rules.start),
            cache_end_steps=0 if end is None or steps is None else max(steps - end, 0),
            max_consecutive_cached=0 if cap is None else cap,
            raw_vision_callback=self._raw_vision,
            **self.options,
        )

    def before_apply(self, installation: Any) -> None:
        super().before_apply(installation)
        self.timesteps = TimestepReader(installation.transformer, installation.target.pipeline)
        self.builtin = _builtin_adapter(installation.transformer)
        if self.builtin:  # diffusers' own reader knows these models better than the generic one
            self.diffusers_config.raw_vision_callback = None

    def _raw_vision(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> list[torch.Tensor] | None:
        call = self.lifecycle.current_call()
        return call.scratch.saved if call is not None else raw_vision(module, args, kwargs)  # read in before_call

    # -- run time -------------------------------------------------------------------------------

    def begin_run(self, run: RunState, state: DiffusersRunState) -> None:
        steps = run.stats.num_inference_steps
        if steps is None:
            raise CacheStateError(
                "seacache on backend 'diffusers' needs the run's step count: call the pipeline with "
                "num_inference_steps, or use handle.run(num_inference_steps=N) in a custom loop")
        fresh = self._config_kwargs(steps)
        for name, value in fresh.items():
            if name == "raw_vision_callback" and self.builtin:
                continue
            setattr(self.diffusers_config, name, value)

    def context_kwargs(self, call: CallInfo) -> dict[str, Any] | None:
        timestep = self.timesteps.require(call.args, call.kwargs, self.strategy)
        sigma = min(max(timestep / 1000.0, 0.0), 1.0)
        return {"step_index": call.step, "sigma": sigma, "num_inference_steps": call.run.stats.num_inference_steps}

    def before_call(self, call: CallInfo, state: DiffusersRunState) -> None:
        call.scratch.reason = self.rules.must_compute(call.step)
        if not self.builtin:
            call.scratch.saved = self._require_vision(call)

    def _require_vision(self, call: CallInfo) -> list[torch.Tensor]:
        # Without the latents diffusers runs every call in full ("fails open") and says so once in a
        # log line; the layout is the model's call convention, so the first call already tells.
        vision = raw_vision(self.installation.transformer, call.args, call.kwargs or {})
        if vision is None:
            raise CacheStateError(
                f"seacache on backend 'diffusers' cannot read the visual latents of this "
                f"{self.model_class} call, so its indicator never forms and it would cache no step; readable: "
                f"hidden_states as (B, C, [T,] H, W) latents, or packed (B, tokens, C) with img_shapes, "
                f"num_frames/height/width or img_ids covering every token")
        return vision

    def after_call(self, call: CallInfo, state: DiffusersRunState) -> None:
        hook_state = self._state()
        # The root hook clears the per-call flags when the call returns; the streak counter stays.
        cached = call.blocks_computed == 0 and hook_state is not None and hook_state.consecutive_cached > 0
        counters = state.counters(call.branch)
        if cached:
            call.decision, call.reason = "cached", "cached"
            call.diff = float(hook_state.accumulated_distance)
        else:
            call.decision = "computed"
            call.reason = call.scratch.reason or _compute_reason(hook_state, counters)
        counters.record(cached, call.scratch.key)

    def _state(self) -> Any:
        for hook in self.find_hooks("state_manager"):
            if hasattr(hook, "raw_vision_callback"):  # the root hook
                manager = hook.state_manager
                return manager.get_state() if manager._context is not None else None
        return None

    def describe(self) -> dict[str, Any]:
        config = {f.name: getattr(self.diffusers_config, f.name) for f in dataclasses.fields(self.diffusers_config)
                  if f.name != "raw_vision_callback"}
        return {"diffusers_config": config,
                "raw_vision": "diffusers' own adapter" if getattr(self, "builtin", False) else "phyai_cache's reader",
                "per_run": "cache_end_steps; per call: cache_context(step_index, sigma, num_inference_steps)"}


def _compute_reason(hook_state: Any, counters: Any) -> str:
    if counters.key is None:
        return "no_cache"
    if hook_state is not None and not hook_state.gate_should_compute:
        return "no_residual"  # the indicator allowed a hit, but diffusers had no residual to reuse
    return "above_threshold"


def _builtin_adapter(transformer: torch.nn.Module) -> bool:
    name = type(transformer).__name__
    config = getattr(transformer, "config", None)
    if name == "Cosmos3OmniTransformer":
        return True
    return name == "WanTransformer3DModel" and getattr(config, "in_channels", 0) == getattr(config, "out_channels", -1)


def raw_vision(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> list[torch.Tensor] | None:
    """The call's visual latents as SeaCache wants them: one ``(C, T, H, W)`` tensor per sample."""
    signature = CallSignature.of(module)
    hidden = signature.hidden_states(args, kwargs)
    if not isinstance(hidden, torch.Tensor):
        return None
    if hidden.ndim == 5:  # (B, C, T, H, W): video models
        return list(hidden.unbind(0))
    if hidden.ndim == 4:  # (B, C, H, W)
        return [sample.unsqueeze(1) for sample in hidden.unbind(0)]
    if hidden.ndim != 3:
        return None
    batch, tokens, channels = hidden.shape
    shapes = signature.read(args, kwargs, "img_shapes")
    if shapes is not None:  # QwenImage-style: [(frames, height, width)] per sample (or one list for all)
        first = shapes[0]
        return _unpack(hidden, *(first[0] if isinstance(first, list) else first)[:3])
    sizes = [signature.read(args, kwargs, name) for name in ("num_frames", "height", "width")]
    if all(isinstance(size, int) for size in sizes):  # LTX-style: the token grid, frame-major
        return _unpack(hidden, *sizes)
    ids = signature.read(args, kwargs, "img_ids")
    if isinstance(ids, torch.Tensor) and ids.shape[-2] == tokens and ids.shape[-1] >= 3:
        ids = ids[0] if ids.ndim == 3 else ids  # Flux: (tokens, 3) = (frame, row, column)
        rows, columns = ids[:, -2].long(), ids[:, -1].long()
        rows, columns = rows - rows.min(), columns - columns.min()
        height, width = int(rows.max()) + 1, int(columns.max()) + 1
        if height * width != tokens:
            return None
        grid = hidden.new_zeros(batch, height, width, channels)
        grid[:, rows, columns] = hidden
        return [sample.permute(2, 0, 1).unsqueeze(1) for sample in grid.unbind(0)]
    return None


def _unpack(hidden: torch.Tensor, frames: int, height: int, width: int) -> list[torch.Tensor] | None:
    """Packed ``(B, frames * height * width, C)`` tokens, frame-major, as ``(C, T, H, W)`` per sample;
    None when the grid does not match the tokens (another layout: no indicator rather than a wrong one)."""
    batch, tokens, channels = hidden.shape
    if frames * height * width != tokens:
        return None
    return [sample.reshape(frames, height, width, channels).permute(3, 0, 1, 2) for sample in hidden.unbind(0)]
