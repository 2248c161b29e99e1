"""CUDA graphs in phyai's runners: decided at runner.forward, computed steps replay, cached steps forecast.

A CUDA graph cannot exist on a CPU. The runner (shaped like phyai's Qwen-Image 2.1 runner: one graph
per branch of the whole transformer, captured at step 1, replayed after) uses RecordingCudaGraph, which
has phyai's CudaGraph interface, records captures and replays, answers torch's capture query with True
while capturing (so a cache hook inside the captured function raises GraphCaptureError as on a GPU),
and returns its static output by reference. benchmarks/gpu_validate.py (section phyai_graphs) runs the
same checks with real graphs on a GPU.
"""

from __future__ import annotations

import ast
import inspect

import pytest
import torch

from phyai_cache import DiTCacheConfigError, GraphCaptureError
from phyai_cache.integrations.phyai import attach
from phyai_cache_lab.testing.phyai import load_phyai, phyai_source
from phyai_cache_lab.testing.qwen_image_21 import (
    QwenImage21Request,
    QwenImage21Scheduler,
    RecordingCudaGraph,
    build_scheduler,
)

STEPS = 8
WHOLE_CALL = {
    "taylorseer": dict(enabled=True, strategy="taylorseer", options={"skip_call": True}),
    "magcache": dict(enabled=True, strategy="magcache", threshold=10.0, warmup_steps=2,
                     options={"mag_ratios": [1.0], "skip_call": True}),
}


def _decisions(stats) -> list[tuple]:
    return [(r.step, r.branch, r.decision, r.reason) for r in stats.records]


def _run(config, **runner_options):
    scheduler = build_scheduler(**runner_options)
    with attach(scheduler, config) as cache:
        request = QwenImage21Request(num_inference_steps=STEPS)
        out = scheduler.step(request)
        return out, cache.last_run, scheduler.runner.log, request


@pytest.mark.parametrize("strategy", list(WHOLE_CALL))
def test_computed_steps_replay_and_cached_steps_forecast_with_the_eager_decisions(strategy):
    out, stats, log, _ = _run(WHOLE_CALL[strategy], use_cuda_graph=True)
    eager_out, eager_stats, eager_log, _ = _run(WHOLE_CALL[strategy], use_cuda_graph=False)
    assert _decisions(stats) == _decisions(eager_stats) and stats.steps_cached > 0
    assert torch.equal(out, eager_out)
    assert stats.calls_skipped == stats.steps_cached and stats.blocks_computed == eager_stats.blocks_computed
    for branch in ("cond", "uncond"):
        computed = [r.step for r in stats.records if r.branch == branch and r.decision == "computed"]
        events = [event.split(":")[1] for event in log if event.startswith(f"{branch}:")]
        # step 0 eager (it stores the prefix), one capture at the first computed prefix step, and then
        # one replay per computed step; a cached step neither replays nor runs anything
        assert events == ["eager", "capture"] + ["replay"] * (len(computed) - 1), (branch, events)
        assert computed[0] == 0
    assert [e.split(":")[1] for e in eager_log].count("replay") == 0


def test_a_forecast_is_never_the_graphs_static_output():
    """phyai returns a graph's outputs by reference. With a runner that hands the static buffer out
    uncloned, each forecast is a tensor of its own, and no later replay changes it or the history it
    came from (the run equals the cloning runner's)."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Recording(QwenImage21Scheduler):
        def predict(self, request, *args):
            output = super().predict(request, *args)
            seen.append((output, output.clone()))
            return output

    scheduler = Recording(build_scheduler(use_cuda_graph=True, clone_graph_output=False).runner)
    with attach(scheduler, WHOLE_CALL["taylorseer"]) as cache:
        out = scheduler.step(QwenImage21Request(num_inference_steps=STEPS))
        records = cache.last_run.records
    statics = {graph._output.data_ptr() for graph in scheduler.runner.graphs.values()}
    forecasts = [seen[i] for i, record in enumerate(records) if record.skipped_call]
    assert forecasts and all(output.data_ptr() not in statics for output, _ in forecasts)
    assert all(torch.equal(output, at_return) for output, at_return in forecasts)  # unchanged by later replays
    assert torch.equal(out, _run(WHOLE_CALL["taylorseer"], use_cuda_graph=True)[0])


@pytest.mark.parametrize("config", [dict(enabled=True, strategy="fbcache", threshold=0.3),
                                    dict(enabled=True, strategy="taylorseer")])
def test_a_block_level_config_is_refused_at_attach_naming_what_works(config):
    scheduler = build_scheduler(use_cuda_graph=True)
    with pytest.raises(DiTCacheConfigError) as info:
        attach(scheduler, config)
    message = str(info.value)
    assert info.value.field == "options.skip_call" and "use_cuda_graph" in message
    for name in ("taylorseer", "magcache", "easycache", "enabled: false"):
        assert name in message
    assert "forward" not in vars(scheduler.runner) and "step" not in vars(scheduler)


def test_a_request_asking_for_a_block_level_config_fails_alone():
    scheduler = build_scheduler(use_cuda_graph=True)
    reference = build_scheduler(use_cuda_graph=True).step(QwenImage21Request(num_inference_steps=STEPS))
    with attach(scheduler, WHOLE_CALL["taylorseer"]) as cache:
        with pytest.raises(DiTCacheConfigError, match="use_cuda_graph") as info:
            scheduler.step(QwenImage21Request(num_inference_steps=STEPS, dit_cache="fbcache-balanced"))
        assert "dit_cache" in str(info.value) and scheduler.runner.log == []  # refused before any step
        off = scheduler.step(QwenImage21Request(num_inference_steps=STEPS, dit_cache=False))
        assert torch.equal(off, reference)  # the cache off: every step computed, bit-identical
        assert {r.reason for r in cache.last_run.records} == {"disabled"}
        assert cache.last_run.blocks_computed == cache.last_run.blocks_total
        scheduler.step(QwenImage21Request(num_inference_steps=STEPS))
        assert cache.last_run.steps_cached > 0


def test_without_the_runner_level_decision_the_capture_is_refused():
    """The negative control of the capture check: graphs switched on behind the cache's back (attached
    as an eager runner) put the cache's hooks inside the captured function, and the guard refuses."""
    scheduler = build_scheduler(use_cuda_graph=False)
    with attach(scheduler, WHOLE_CALL["taylorseer"]):
        scheduler.runner.use_cuda_graph = True
        with pytest.raises(GraphCaptureError):
            scheduler.step(QwenImage21Request(num_inference_steps=STEPS))


class WholeLoopRunner:
    """Shaped like pi05's expert runner: forward(noise) runs the whole sampling loop (one graph)."""

    use_cuda_graph = True

    def __init__(self) -> None:
        self.transformer = torch.nn.Linear(2, 2)

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        return noise

    def reset(self) -> None:
        pass


def test_a_runner_that_runs_the_whole_loop_is_refused_at_attach():
    with pytest.raises(DiTCacheConfigError, match="whole sampling loop") as info:
        attach(WholeLoopRunner(), WHOLE_CALL["taylorseer"])
    assert "WholeLoopRunner.forward(noise)" in str(info.value)


def test_stand_ins_match_phyai():
    """pi05's real expert runner takes only the noise (read from phyai's source: importing it needs
    phyai's compiled extension), and RecordingCudaGraph has phyai's CudaGraph interface."""
    if phyai_source() is None:
        pytest.skip("phyai's source snapshot is not here")
    source = phyai_source() / "phyai/src/phyai/models/pi05/model_runner_pi05.py"
    tree = ast.parse(source.read_text())
    runner = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "PI05ExpertRunner")
    forward = next(n for n in runner.body if isinstance(n, ast.FunctionDef) and n.name == "forward")
    assert [a.arg for a in forward.args.args] == list(inspect.signature(WholeLoopRunner.forward).parameters)
    load_phyai()
    from phyai.runtime.cuda_graph_manager import CudaGraph

    for method in ("capture", "replay"):
        ours = inspect.signature(getattr(RecordingCudaGraph, method))
        theirs = inspect.signature(getattr(CudaGraph, method))
        assert list(ours.parameters) == list(theirs.parameters), method
    assert {"is_captured", "input_buffer"} <= set(dir(RecordingCudaGraph))
