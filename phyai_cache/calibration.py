"""Calibration as a product feature: measure what a strategy needs on the user's own pipeline.

MagCache needs the model's per-step magnitude ratios, TeaCache the polynomial that turns the
modulated-input change into an output-change estimate. Peers hard-code them per model (and diffusers
ships MagCache's for FLUX.1-dev only). :func:`calibrate` runs the user's pipeline with the strategy in
calibration mode on the native engine (``options.calibrate: true``: every step computes, so the
outputs are the uncached ones, and the strategy's statistic records what it sees per step and CFG
branch), then fits the options the strategy declares (:class:`phyai_cache.strategies.Calibration`).

The result goes into ``options`` of a config or a preset; the same ``options.mag_ratios`` drives
both the native and the diffusers MagCache, so MagCache works on every model family::

    result = phyai_cache.calibrate(pipe, {"prompt": "...", "num_inference_steps": 28}, strategy="magcache")
    enable_dit_cache(pipe, result.config(threshold=0.06))        # or result.write_preset("my-magcache.yaml")

Several calls (seeds, prompts, step counts) make a steadier calibration: ratios are averaged per
step count (a run of another step count uses its own list, or the longest one interpolated), the
polynomial is fitted on every (step, branch) pair.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import DiTCacheConfig
from .errors import DiTCacheConfigError
from .stats import StepRecord
from .strategies import get_strategy, strategy_names

CallArguments = Mapping[str, Any] | Callable[[int], Mapping[str, Any]]


@dataclass
class CalibrationResult:
    """The calibrated options of one strategy and what they were measured on."""

    strategy: str
    options: dict[str, Any]
    runs: int
    steps: list[int]  # the step count of each calibration run
    records: list[list[StepRecord]] = field(default_factory=list, repr=False)
    calibrated_on: str | None = None  # the transformer class the runs were on (DiTCacheConfig.calibrated_on)

    def config(self, **fields: Any) -> DiTCacheConfig:
        """An enabled config of the strategy with the calibrated options (``fields`` added; options
        given there are merged over the calibrated ones)."""
        options = {**self.options, **dict(fields.pop("options", None) or {})}
        fields.setdefault("calibrated_on", self.calibrated_on)
        return DiTCacheConfig(enabled=True, strategy=self.strategy, options=options, **fields)

    def to_preset(self, name: str, details: Mapping[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
        config = self.config(**fields).to_dict()
        spec = get_strategy(self.strategy)
        always = ("enabled", "backend", "strategy", "options", "calibrated_on")
        kept = {k: v for k, v in config.items()
                if k in always or (k in spec.fields and v is not None and not (k == "active_steps" and v == [0, None]))}
        return {"preset": {"name": name, "trades": f"{self.strategy} with options calibrated on this pipeline "
                                                   "(threshold not tuned)",
                           "calibrated": False, "calibration_runs": self.runs, "calibration_steps": self.steps,
                           **dict(details or {})},
                "dit_cache": kept}

    def write_preset(self, path: str | Path, name: str | None = None, details: Mapping[str, Any] | None = None,
                     **fields: Any) -> Path:
        """Write a preset YAML (``preset:`` + ``dit_cache:`` with the calibrated ``options``)."""
        path = Path(path)
        data = self.to_preset(name or path.stem, details, **fields)
        header = (f"# {data['preset']['name']}: {self.strategy} options measured by phyai_cache.calibrate on "
                  f"{self.runs} run(s) ({', '.join(str(s) for s in sorted(set(self.steps)))} steps).\n")
        path.write_text(header + yaml.safe_dump(data, sort_keys=False, width=110), encoding="utf-8")
        return path


def calibrate(pipe: Any, call_kwargs: CallArguments | Sequence[CallArguments], strategy: str = "magcache", *,
              seeds: Sequence[int] = (0,), blocks: Any = None, separate_cfg: bool | str = "auto",
              options: Mapping[str, Any] | None = None) -> CalibrationResult:
    """Measure what ``strategy`` needs on ``pipe`` and return the calibrated options.

    ``call_kwargs``: the keyword arguments of one pipeline call, a function ``seed -> kwargs`` (called
    for each of ``seeds``), or a list of either (e.g. one per step count). ``pipe`` must not have a
    cache enabled; it is left as it was. ``blocks`` as for :func:`phyai_cache.enable_dit_cache`;
    ``options`` adds strategy options that shape the measurement (e.g. teacache's ``probe``).
    """
    import torch

    from .api import enable_dit_cache, get_cache_handle
    from .lifecycle import resolve_target

    if strategy not in strategy_names():
        raise DiTCacheConfigError("strategy", strategy, ", ".join(repr(s) for s in strategy_names()))
    spec = get_strategy(strategy)
    if spec.calibration is None:
        calibrated = [s for s in strategy_names() if get_strategy(s).calibration is not None]
        raise DiTCacheConfigError("strategy", strategy, "a strategy with something to calibrate: "
                                  + ", ".join(repr(s) for s in calibrated),
                                  hint=f"{strategy!r} needs no calibration")
    if get_cache_handle(pipe) is not None or get_cache_handle(getattr(pipe, "transformer", None)) is not None:
        raise DiTCacheConfigError("target", f"<{type(pipe).__name__}>", "a pipeline without a cache enabled",
                                  hint="calibration runs the pipeline uncached; call disable_dit_cache(pipe) first")
    calls = _calls(call_kwargs, seeds)
    config = DiTCacheConfig(enabled=True, backend="native", strategy=strategy, separate_cfg=separate_cfg,
                            options={**dict(options or {}), "calibrate": True})
    records, steps = [], []
    handle = enable_dit_cache(pipe, config, blocks=blocks)
    try:
        with torch.no_grad():
            for kwargs in calls:
                pipe(**kwargs)
                run = handle.last_run
                records.append(list(run.records))
                steps.append(run.num_inference_steps or max((r.step for r in run.records), default=-1) + 1)
    finally:
        handle.disable()
    try:
        fitted = spec.calibration.fit(records)
    except ValueError as error:
        raise DiTCacheConfigError("call_kwargs", f"{len(calls)} call(s)", "calls that run the transformer for at "
                                  "least three steps", hint=str(error)) from error
    model_class = type(resolve_target(pipe).transformer).__name__
    return CalibrationResult(strategy, fitted, len(calls), steps, records, model_class)


def _calls(call_kwargs: Any, seeds: Sequence[int]) -> list[dict[str, Any]]:
    items = call_kwargs if isinstance(call_kwargs, (list, tuple)) else [call_kwargs]
    calls: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, Mapping):
            calls.append(dict(item))
        elif callable(item):
            calls.extend(dict(item(seed)) for seed in seeds)
        else:
            raise DiTCacheConfigError("call_kwargs", item, "a mapping of pipeline call arguments, a function "
                                      "seed -> mapping, or a list of them")
    if not calls:
        raise DiTCacheConfigError("call_kwargs", call_kwargs, "at least one pipeline call")
    return calls


__all__ = ["CalibrationResult", "calibrate"]
