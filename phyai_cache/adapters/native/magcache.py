"""MagCache's statistic for the native engine (strategy ``magcache``; see phyai_cache/strategies/magcache.py).

The magnitude ratio of step t is ``gamma_t = mean_tokens(||r_t|| / ||r_(t-1)||)``, where ``r`` is the
residual of the whole block chain (output minus input of the hidden stream) and the norm is taken
per token. MagCache observes that gamma follows the same curve for every prompt of a model, so it is
measured once (``phyai-cache calibrate``) and stored as ``options.mag_ratios``. At run time, over a
streak of skipped steps the predicted error is ``err = sum |1 - prod gamma|``; the step is skipped
while ``err < threshold``. The arithmetic (accumulated ratio, error and streak, reset on every
computed step, nearest interpolation of the ratios to the run's step count) is exactly diffusers'
``MagCacheHeadHook``, so one threshold and one ratio list take the same decisions on both backends
(``tests/adapters/test_same_meaning.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ...decision import Decision
from ...errors import CacheStateError, DiTCacheConfigError
from ...runtime import RunState
from ...strategies.magcache import ratios_for_steps
from .method import Method, StepInputs


class MagCacheMethod(Method):
    """Accumulated magnitude-ratio error of one branch; nothing is measured on the device."""

    decides_before_call = True

    def __init__(self, options: Mapping[str, Any], run: RunState) -> None:
        super().__init__(options, run)
        self.check_run(options, run)
        self.ratios: list[float] = []
        if not self.calibrating:
            self.ratios = ratios_for_steps(options["mag_ratios"], run.stats.num_inference_steps)
        self.ratio, self.error = 1.0, 0.0
        self.candidate: tuple[float, float] | None = None
        self.previous_norms: torch.Tensor | None = None  # calibration: per-token norms of the last residual

    @classmethod
    def check_run(cls, options: Mapping[str, Any], run: RunState) -> None:
        if run.stats.num_inference_steps is None and not options.get("calibrate"):
            raise CacheStateError(
                "magcache needs the run's step count to place its calibrated ratios: call the pipeline with "
                "num_inference_steps, use handle.run(num_inference_steps=N) in a custom loop, or "
                "handle.open_request(..., num_inference_steps=N) for a served request")

    @classmethod
    def prepare_options(cls, options: dict[str, Any], model_class: str | None) -> dict[str, Any]:
        if "mag_ratios" in options or options.get("calibrate"):
            return options
        shipped = shipped_ratios(model_class)
        if shipped is not None:
            return {**options, "mag_ratios": shipped}
        raise DiTCacheConfigError(
            "options.mag_ratios", None,
            f"a list of per-step magnitude ratios calibrated for {model_class or 'this model'}",
            hint="MagCache's ratios are checkpoint-specific (diffusers ships FLUX.1-dev's only); measure them with "
                 "`phyai-cache calibrate --strategy magcache` or phyai_cache.calibrate(pipe, call_kwargs, "
                 "strategy='magcache'), which writes them into a preset")

    def _candidate(self, step: int) -> tuple[float, float]:
        gamma = self.ratios[step] if step < len(self.ratios) else 1.0
        ratio = self.ratio * gamma
        return ratio, self.error + abs(1.0 - ratio)

    def measure(self, inputs: StepInputs) -> float:
        self.candidate = self._candidate(inputs.step)
        inputs.call.measures["mag_error"] = self.candidate[1]
        return self.candidate[1]

    def committed(self, inputs: StepInputs, decision: Decision) -> None:
        if decision.cached:  # also a step that followed another branch: its own error still grows
            self.ratio, self.error = self.candidate or self._candidate(inputs.step)
        else:
            self.ratio, self.error = 1.0, 0.0
        self.candidate = None

    def computed(self, inputs: StepInputs, output: torch.Tensor) -> None:
        if not self.calibrating:
            return
        residual = chain_residual(inputs.hidden, output)
        norms = torch.linalg.norm(residual.float(), dim=-1)
        if self.previous_norms is None or self.previous_norms.shape != norms.shape:
            ratio = 1.0  # diffusers logs 1.0 for the first step too
        else:
            ratio = float((norms / (self.previous_norms + 1e-8)).mean().item())
        self.previous_norms = norms
        inputs.call.measures["mag_ratio"] = ratio

    def tensors(self) -> list[torch.Tensor | None]:
        return [self.previous_norms]


def chain_residual(hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> torch.Tensor:
    """Output minus input of the hidden stream; when the chain's last blocks return text and image
    tokens together, the image tokens are the last ones (as diffusers' MagCache assumes)."""
    if hidden_out.shape == hidden_in.shape:
        return hidden_out - hidden_in
    if hidden_out.ndim == 3 and hidden_in.ndim == 3 and hidden_out.shape[2] == hidden_in.shape[2]:
        return hidden_out[:, -hidden_in.shape[1]:] - hidden_in
    raise CacheStateError(f"the block chain maps hidden states {tuple(hidden_in.shape)} to {tuple(hidden_out.shape)}; "
                          "a magnitude ratio needs an output of the input's shape")


def shipped_ratios(model_class: str | None) -> list[float] | None:
    """The FLUX.1-dev ratios diffusers ships, for FluxTransformer2DModel (what diffusers' MagCache uses
    there too); None for other models or without diffusers."""
    if model_class != "FluxTransformer2DModel":
        return None
    try:
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS
    except ImportError:
        return None
    return [float(v) for v in FLUX_MAG_RATIOS]
