"""EasyCache's statistic for the native engine (strategy ``easycache``; see phyai_cache/strategies/easycache.py).

EasyCache (Zhou et al. 2025) needs no calibration: it measures at run time how strongly the model
transforms its input. On every computed step c (after the first) the *transformation rate*
``k = mean|y_c - y_c'| / mean|x_c - x_c'|`` relates the change of the output ``y`` to the change of
the input ``x`` between the last two computed steps c' and c. On a later step t, the output change
is predicted from the input change alone, ``k * mean|x_t - x_(t-1)| / mean|y_c|``, and accumulated
over the streak; the step reuses the cache while the accumulated prediction stays below
``threshold`` and every computed step resets it.

Here ``x`` is the block chain's hidden input and ``y`` its hidden output (the quantities the native
engine approximates); when whole calls are skipped (``options.skip_call``) they are the transformer
call's ``hidden_states`` argument and its output, as in the paper's implementation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ...decision import Decision
from ...runtime import RunState
from .method import Method, StepInputs, mean_abs


class EasyCacheMethod(Method):
    """Transformation rate, previous inputs and the accumulated predicted change of one branch."""

    decides_before_call = True

    def __init__(self, options: Mapping[str, Any], run: RunState) -> None:
        super().__init__(options, run)
        # k and mean|y| stay on the device: the only host sync is the measure's (one per judged step)
        self.rate: torch.Tensor | None = None  # k
        self.previous_input: torch.Tensor | None = None  # x at the previous step (computed or not)
        self.computed_input: torch.Tensor | None = None  # x at the last computed step
        self.computed_output: torch.Tensor | None = None  # y at the last computed step
        self.output_scale: torch.Tensor | None = None  # mean|y| at the last computed step
        self.accumulated = 0.0
        self.candidate: float | None = None

    def gap(self, inputs: StepInputs) -> str | None:
        if self.rate is None or self.previous_input is None or self.previous_input.shape != inputs.hidden.shape:
            return "no_rate"  # fewer than two computed steps so far: no rate to predict with
        return None

    def measure(self, inputs: StepInputs) -> float:
        change = mean_abs(inputs.hidden - self.previous_input)
        predicted = float((self.rate * change / self.output_scale.clamp_min(1e-12)).item())
        self.candidate = self.accumulated + predicted
        inputs.call.measures["predicted_change"] = predicted
        return self.candidate

    def committed(self, inputs: StepInputs, decision: Decision) -> None:
        if decision.cached:
            if self.candidate is None:  # followed another branch: still account for this step's change
                self.candidate = self.measure(inputs) if self.gap(inputs) is None else self.accumulated
            self.accumulated = self.candidate
        else:
            self.accumulated = 0.0
        self.candidate = None
        self.previous_input = inputs.hidden

    def computed(self, inputs: StepInputs, output: torch.Tensor) -> None:
        x, y = inputs.hidden, output
        if self.computed_output is not None and self.computed_output.shape == y.shape \
                and self.computed_input is not None and self.computed_input.shape == x.shape:
            input_change = mean_abs(x - self.computed_input)
            output_change = mean_abs(y - self.computed_output)
            self.rate = output_change / input_change.clamp_min(1e-12)
        self.computed_input, self.computed_output = x, y
        self.output_scale = mean_abs(y)

    def tensors(self) -> list[torch.Tensor | None]:
        # previous_input and computed_input are the same tensor after a computed step: count once
        distinct = {id(t): t for t in (self.previous_input, self.computed_input, self.computed_output) if t is not None}
        return list(distinct.values())
