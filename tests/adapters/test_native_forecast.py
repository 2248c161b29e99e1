"""Forecasts in the sampler's time (options.forecast_axis / options.forecast) and presets that record
the model class they were calibrated on.

The exactness tests use a model whose blocks add a polynomial of the timestep to their input: with
a fixed input, every residual and the call's output are that polynomial, so a forecast of order k
over the *time* axis is exact on any spacing of the timesteps, and the same forecast over the step
index is not (the spacing below is uneven, like a shifted flow-matching schedule).
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from phyai_cache import DiTCacheConfigError, Row, enable_dit_cache, load_config
from phyai_cache.adapters.native.history import ResidualHistory

# Uneven, decreasing timesteps (dense at the start, like Flux's shifted sigmas)
SIGMAS = [1.0, 0.97, 0.93, 0.87, 0.8, 0.7, 0.58, 0.43, 0.25]


def quadratic(sigma: float) -> float:
    return 0.7 * sigma**2 - 1.3 * sigma + 0.4


def test_newton_history_is_exact_on_a_polynomial_in_time_with_uneven_spacing():
    history = ResidualHistory(2, "newton")
    for step in (0, 1, 4):
        history.update(step, torch.full((3,), quadratic(SIGMAS[step]), dtype=torch.float64), SIGMAS[step])
    for step in (5, 6, 8):
        expected = torch.full((3,), quadratic(SIGMAS[step]), dtype=torch.float64)
        torch.testing.assert_close(history.predict(step, SIGMAS[step]), expected, rtol=0, atol=1e-12)
    # The same points over the step index miss: the signal is smooth in time, not in steps.
    by_step = ResidualHistory(2, "newton")
    for step in (0, 1, 4):
        by_step.update(step, torch.full((3,), quadratic(SIGMAS[step]), dtype=torch.float64))
    assert (by_step.predict(8) - quadratic(SIGMAS[8])).abs().max() > 1e-2


def test_taylor_order_one_over_time_is_exact_on_a_line_and_plain_reuse_ignores_the_axis():
    history = ResidualHistory(1, "taylor")
    for step in (0, 3):
        history.update(step, torch.tensor([2.0 * SIGMAS[step] + 1.0], dtype=torch.float64), SIGMAS[step])
    torch.testing.assert_close(history.predict(7, SIGMAS[7]), torch.tensor([2.0 * SIGMAS[7] + 1.0],
                                                                            dtype=torch.float64))
    reuse = ResidualHistory(0)
    reuse.update(0, torch.ones(2), SIGMAS[0])
    assert torch.equal(reuse.predict(5, SIGMAS[5]), torch.ones(2))


class PolyBlock(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.scale * temb[:, None, None]


class PolyDiT(nn.Module):
    """Each block adds ``scale * p(timestep)`` (p quadratic): residuals exactly quadratic in time."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(PolyBlock(s) for s in (1.0, -0.5, 2.0))

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        temb = 0.7 * timestep.double() ** 2 - 1.3 * timestep.double() + 0.4
        for block in self.blocks:
            hidden_states = block(hidden_states, temb)
        return hidden_states * 1.0


def _config(axis: str, skip_call: bool, **extra) -> dict:
    options = {"forecast": "newton", "forecast_axis": axis, "skip_call": skip_call}
    return dict(enabled=True, backend="native", strategy="taylorseer", taylorseer_order=2, warmup_steps=3,
                cache_interval=3, blocks="blocks", options=options, **extra)


def _run(model: nn.Module, handle, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad(), handle.run():
        return [model(x, torch.full((x.shape[0],), s, dtype=torch.float64)) for s in SIGMAS]


@pytest.mark.parametrize("skip_call", [False, True], ids=["block-level", "whole-call"])
def test_time_axis_forecast_is_exact_on_a_polynomial_model_and_step_axis_is_not(skip_call):
    model = PolyDiT()
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    with torch.no_grad():
        uncached = [model(x, torch.full((2,), s, dtype=torch.float64)) for s in SIGMAS]
    handle = enable_dit_cache(model, **_config("time", skip_call))
    cached = _run(model, handle, x)
    stats = handle.last_run
    handle.disable()
    assert stats.steps_cached >= 4 and not stats.warnings
    for step, (got, want) in enumerate(zip(cached, uncached)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9, msg=f"step {step}")
    handle = enable_dit_cache(model, **_config("step", skip_call))
    by_step = _run(model, handle, x)
    handle.disable()
    assert max((a - b).abs().max().item() for a, b in zip(by_step, uncached)) > 1e-3


class NoTimeDiT(nn.Module):
    """A model whose forward has no timestep argument the cache can read."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(3, 3) for _ in range(3))

    def forward(self, hidden_states: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden_states = hidden_states + block(hidden_states) * conditioning
        return hidden_states


def test_without_a_readable_time_the_forecast_falls_back_to_the_step_index_and_says_so(caplog):
    model = NoTimeDiT()
    x = torch.randn(1, 4, 3)
    outputs = {}
    for axis in ("time", "step"):
        handle = enable_dit_cache(model, **{**_config(axis, True), "taylorseer_order": 1})
        with torch.no_grad(), handle.run(), caplog.at_level(logging.WARNING, logger="phyai_cache"):
            outputs[axis] = [model(x, torch.tensor(s)) for s in SIGMAS]
        outputs[axis + " warnings"] = dict(handle.last_run.warnings)
        handle.disable()
    assert "forecast_time_unread" in outputs["time warnings"]
    assert "NoTimeDiT" in outputs["time warnings"]["forecast_time_unread"]
    assert "forecast_time_unread" not in outputs["step warnings"]
    assert all(torch.equal(a, b) for a, b in zip(outputs["time"], outputs["step"]))
    assert sum("forecast_axis 'time'" in r.getMessage() for r in caplog.records) == 1  # once per run


def test_a_half_precision_timestep_is_not_used_as_time():
    model = PolyDiT()
    handle = enable_dit_cache(model, **_config("time", True))
    with torch.no_grad(), handle.run():
        for s in SIGMAS[:4]:
            model(torch.zeros(1, 2, 2, dtype=torch.float64), torch.full((1,), s, dtype=torch.bfloat16))
    assert "bfloat16" in handle.last_run.warnings["forecast_time_unread"]
    handle.disable()


def test_every_row_of_a_step_batch_forecasts_at_its_own_time():
    """Two requests started three steps apart share each batch; each row is forecast at its own
    timestep (a row forecast at its neighbour's time would miss the polynomial)."""
    model = PolyDiT()
    handle = enable_dit_cache(model, **_config("time", True))
    x = {name: torch.randn(1, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
         for i, name in enumerate(("early", "late"))}
    requests = {name: handle.open_request(handle.config, num_inference_steps=len(SIGMAS)) for name in x}
    steps, worst = {"early": 0, "late": -3}, 0.0
    with torch.no_grad():
        while steps["late"] < len(SIGMAS):
            active = [name for name in x if 0 <= steps[name] < len(SIGMAS)]
            t = torch.cat([torch.full((1,), SIGMAS[steps[name]], dtype=torch.float64) for name in active])
            with handle.batch([Row(requests[name]) for name in active]):
                out = model(torch.cat([x[name] for name in active]), t)
            for row, name in enumerate(active):  # the blocks' scales sum to 2.5
                expected = x[name] + 2.5 * (0.7 * t[row] ** 2 - 1.3 * t[row] + 0.4)
                worst = max(worst, (out[row:row + 1] - expected).abs().max().item())
            for name in steps:
                steps[name] += 1
    cached = {name: sum(r.decision == "cached" for r in requests[name].stats.records) for name in x}
    for request in requests.values():
        request.close()
    handle.disable()
    assert min(cached.values()) >= 2, cached
    assert worst < 1e-9


def test_forecast_options_are_checked_by_name():
    with pytest.raises(DiTCacheConfigError, match="options.forecast_axis") as error:
        enable_dit_cache(PolyDiT(), **{**_config("sigma", False)})
    assert "'time', 'step'" in str(error.value)
    with pytest.raises(DiTCacheConfigError, match="options.forecast"):
        enable_dit_cache(PolyDiT(), **{**_config("time", False), "options": {"forecast": "cubic"}})


# -- presets that travel --------------------------------------------------------------------------


def test_a_config_calibrated_on_another_model_class_warns_once_naming_the_tuning_command(caplog):
    config = load_config("taylorseer-quality")
    assert config.calibrated_on == "FluxTransformer2DModel"  # recorded by the preset
    with caplog.at_level(logging.WARNING, logger="phyai_cache"):
        for _ in range(2):
            handle = enable_dit_cache(PolyDiT(), config, blocks="blocks")
            handle.disable()
    warnings = [r.getMessage() for r in caplog.records if "calibrated on" in r.getMessage()]
    assert len(warnings) == 1
    assert "FluxTransformer2DModel" in warnings[0] and "PolyDiT" in warnings[0]
    assert "phyai-cache tune" in warnings[0] and "phyai-cache calibrate" in warnings[0]


class RequestPolyDiT(PolyDiT):
    """Its own class name: the warning is once per process for each pair of classes."""


def test_a_request_or_override_with_a_preset_of_another_class_warns_once_too(caplog):
    """Serving: the handle's default may be the model's own, while a request asks for a shipped preset."""
    handle = enable_dit_cache(RequestPolyDiT(), enabled=False, blocks="blocks")
    with caplog.at_level(logging.WARNING, logger="phyai_cache"):
        for _ in range(2):
            handle.open_request("taylorseer-quality", num_inference_steps=20).close()
            with handle.override("taylorseer-quality"):
                pass
    warnings = [r.getMessage() for r in caplog.records if "calibrated on" in r.getMessage()]
    assert len(warnings) == 1 and "RequestPolyDiT" in warnings[0]
    handle.disable()


def test_a_config_calibrated_on_the_same_class_or_recording_none_does_not_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="phyai_cache"):
        for calibrated_on in ("PolyDiT", None):
            handle = enable_dit_cache(PolyDiT(), **_config("time", False), calibrated_on=calibrated_on)
            handle.disable()
    assert not [r for r in caplog.records if "calibrated on" in r.getMessage()]
    with pytest.raises(DiTCacheConfigError, match="calibrated_on"):
        load_config({"enabled": True, "calibrated_on": 3})


# -- calibrated schedules (options.schedule) ------------------------------------------------------


def _computed_steps(handle) -> list[int]:
    return [r.step for r in handle.last_run.records if r.decision != "cached"]


def test_a_schedule_computes_the_steps_calibrated_for_the_runs_step_count():
    model = PolyDiT()
    schedule = {str(len(SIGMAS)): [0, 1, 2, 6], "20": [0, 5]}
    handle = enable_dit_cache(model, **{**_config("time", True), "options": {"skip_call": True, "schedule": schedule}})
    with torch.no_grad(), handle.run(num_inference_steps=len(SIGMAS)):
        outputs = [model(torch.ones(1, 2, 2, dtype=torch.float64), torch.full((1,), s, dtype=torch.float64))
                   for s in SIGMAS]
    assert _computed_steps(handle) == [0, 1, 2, 6] and not handle.last_run.warnings
    assert len(outputs) == len(SIGMAS)
    with torch.no_grad(), handle.run(num_inference_steps=6):  # no schedule for 6 steps: the interval decides
        for s in SIGMAS[:6]:
            model(torch.ones(1, 2, 2, dtype=torch.float64), torch.full((1,), s, dtype=torch.float64))
    assert _computed_steps(handle) == [0, 1, 2, 3]  # warmup 3, then every 3rd
    assert "schedule_missing" in handle.last_run.warnings
    handle.disable()


@pytest.mark.parametrize("schedule, field", [
    ({"9": [1, 4]}, "options.schedule.9"),  # step 0 must compute: nothing to forecast from before it
    ({"9": [0, 9]}, "options.schedule.9"),  # past the last step
    ({"9": [0, 0, 3]}, "options.schedule.9"),
    ({"nine": [0, 3]}, "options.schedule"),
    ([0, 3], "options.schedule"),
])
def test_a_bad_schedule_is_refused_naming_the_field(schedule, field):
    with pytest.raises(DiTCacheConfigError, match=field.replace(".", r"\.")):
        enable_dit_cache(PolyDiT(), **{**_config("time", True), "options": {"schedule": schedule}})
