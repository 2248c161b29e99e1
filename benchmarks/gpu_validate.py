"""GPU validation of phyai_cache: caching next to CUDA graphs and torch.compile, timing, memory, syncs.

    python benchmarks/gpu_validate.py --out gpu_validate_out          # a CUDA machine, about 3-4 minutes
    python benchmarks/gpu_validate.py --dry-run --out /tmp/gpu_dry    # CPU, tiny sizes, a few seconds

Sections, each recorded on its own (an error in one is written into the report and the rest run):

* ``guard``: a cached transformer call captured with ``torch.cuda.graph`` inside a run, and a cached
  pipeline call captured whole, must both raise GraphCaptureError; the same cached transformer
  called outside a run (uncached) must capture and replay like eager.
* ``phyai_graphs``: a runner shaped like phyai's Qwen-Image 2.1 runner (one CUDA graph per CFG branch of
  the whole transformer, captured at step 1, replayed after; phyai_cache_lab.testing.qwen_image_21) with a
  whole-call config attached: computed steps replay, cached steps forecast, decisions and outputs
  equal the eager runner's, a forecast never aliases the graph's static output, and a block-level
  config is refused at attach.
* ``host_syncs``: host syncs per transformer call for each native strategy, counted by the aten ops
  torch runs (phyai_cache_lab.testing.syncs) and by ``torch.cuda.set_sync_debug_mode("warn")``.
* ``reference_eager``: the trained reference model (``phyai_cache_lab.reference``), uncached against every
  native preset: median of interleaved pairwise latency ratios, PSNR against the uncached images.
* ``memory``: ``RunStats.peak_memory_bytes`` on the large model, on both CUDA paths: exact
  (``cuda_max_allocated``, the run raised the device peak) and sampled (``cuda_allocated_sampled``, a
  larger allocation came first).
* ``large_eager``: a random-weight FluxTransformer2DModel of Flux's width, for timing only.
* ``cuda_graph``: the uncached transformer captured once and replayed (static buffers), against eager
  and against the cached eager runs.
* ``compiled_reference`` / ``compiled_large``: regional torch.compile of the blocks, uncached and cached,
  against eager outputs and decisions.
* ``graphed_blocks_reference``: each block under CUDA graphs (dynamo's ``cudagraphs`` backend) with the
  cache deciding on the host around them, against eager outputs and decisions.

Writes ``report.json`` and ``report.md`` to ``--out`` after every section (a run cut short keeps what
it measured). Exit code 0 when every section ran and every check passed, 1 otherwise, 2 when CUDA is
missing (use ``--dry-run`` on CPU: the same code with tiny sizes, simulating only the capture itself).
See docs/gpu.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import platform
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # validate this checkout's phyai_cache, not whichever copy is installed

import phyai_cache  # noqa: E402
from phyai_cache import GraphCaptureError, enable_dit_cache, list_presets  # noqa: E402
from phyai_cache.config import preset_path  # noqa: E402
from phyai_cache.tuning import psnr  # noqa: E402
from phyai_cache.tuning.measure import interleaved_pairs  # noqa: E402
from phyai_cache_lab.testing.syncs import HostSyncCounter  # noqa: E402

STRATEGIES = ("fbcache", "dbcache", "taylorseer")
BALANCED = tuple(f"{strategy}-balanced" for strategy in STRATEGIES)
# Random weights show no step-to-step redundancy: the presets' thresholds barely hit on the large
# model, so two mechanism configs force the two extremes (as benchmarks/native_efficiency.py does).
FORCED = "fbcache threshold 10 (forced hits)"
LARGE_CONFIGS: dict[str, dict[str, Any]] = {
    **{name: {"preset": name} for name in BALANCED},
    "fbcache threshold 0 (never hits: overhead)": dict(strategy="fbcache", threshold=0.0, warmup_steps=0),
    FORCED: dict(strategy="fbcache", threshold=10.0, warmup_steps=2),
}
MATCH_DB = 40.0  # "matches eager": compiled/graphed outputs against eager ones of the same config


@dataclass(frozen=True)
class Sizes:
    steps: int  # reference model
    pairs: int
    batch: int
    large_heads: int
    large_head_dim: int
    large_double: int
    large_single: int
    large_image_side: int  # image tokens = side^2
    large_text_tokens: int
    large_text_dim: int
    large_steps: int
    large_pairs: int
    configs: int | None  # configs per comparison (None: all); host_syncs always checks every strategy


GPU_SIZES = Sizes(steps=20, pairs=5, batch=10, large_heads=24, large_head_dim=128, large_double=4, large_single=8,
                  large_image_side=32, large_text_tokens=128, large_text_dim=4096, large_steps=20, large_pairs=3,
                  configs=None)
DRY_SIZES = Sizes(steps=3, pairs=1, batch=2, large_heads=2, large_head_dim=16, large_double=1, large_single=2,
                  large_image_side=4, large_text_tokens=4, large_text_dim=32, large_steps=3, large_pairs=1,
                  configs=1)  # one config per comparison: the code path is the same for each
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Context:
    """What every section gets: options, device, sizes, the checks list, and the shared large model."""

    args: argparse.Namespace
    device: torch.device
    sizes: Sizes
    checks: list[dict[str, Any]] = field(default_factory=list)
    _large: tuple | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def reference_dtype(self) -> torch.dtype:
        return DTYPES[self.args.reference_dtype]

    @property
    def large_dtype(self) -> torch.dtype:
        return DTYPES[self.args.large_dtype or ("bf16" if self.cuda else "fp32")]

    def check(self, name: str, passed: bool, detail: str) -> None:
        self.checks.append({"name": name, "passed": bool(passed), "detail": detail})

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def large(self) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
        """The large random-weight transformer and its inputs, built once (on the device directly)."""
        if self._large is None:
            self._large = (build_large_model(self), large_inputs(self))
        return self._large


# -- timing and comparison --------------------------------------------------------------------------


def timed(ctx: Context, fn: Callable[[], Any]) -> tuple[float, Any]:
    ctx.sync()
    start = time.perf_counter()
    output = fn()
    ctx.sync()
    return time.perf_counter() - start, output


def paired(ctx: Context, baseline: Callable[[], Any], candidate: Callable[[], Any], pairs: int) -> dict[str, Any]:
    """speedup = median over interleaved pairs of t_baseline / t_candidate: the bench's own
    :func:`interleaved_pairs` (who runs first alternates, so drifts in clock or load hit both sides),
    each run timed between device syncs."""
    baseline(), candidate()  # warm-up: allocator, kernels, autotuning, compilation
    timing = interleaved_pairs(lambda _seed: timed(ctx, baseline), lambda _seed: timed(ctx, candidate), range(pairs))
    return {"speedup": timing.speedup, "ratios": timing.ratios,
            "baseline_ms": timing.latency_plain_s * 1e3, "candidate_ms": timing.latency_cached_s * 1e3}


def psnr_db(output: torch.Tensor, reference: torch.Tensor, data_range: float | None = None) -> float:
    reference = reference.float().cpu()
    span = float(reference.max() - reference.min()) if data_range is None else data_range
    return psnr(output.float().cpu(), reference, span or 1.0)


def stats_row(stats: phyai_cache.RunStats) -> dict[str, Any]:
    return {
        "steps_cached": stats.steps_cached, "steps_total": stats.steps_total,
        "blocks_computed": stats.blocks_computed, "blocks_total": stats.blocks_total,
        "ideal_speedup": stats.blocks_total / max(stats.blocks_computed, 1),
        "peak_memory_bytes": stats.peak_memory_bytes, "memory_kind": stats.memory_kind,
        "cache_bytes": stats.cache_bytes,
        "decisions": "".join("C" if r.decision == "cached" else "." for r in stats.records),
    }


# -- the reference model ----------------------------------------------------------------------------


def native_presets() -> list[str]:
    return [name for name in list_presets() if name.split("-")[0] in STRATEGIES]


def preset_target_psnr(name: str) -> float | None:
    return yaml.safe_load(preset_path(name).read_text())["preset"].get("target_psnr_db")


def load_reference(ctx: Context) -> Any:
    from phyai_cache_lab.reference import load_pipeline

    return load_pipeline(dtype=ctx.reference_dtype, device=ctx.device)


def reference_kwargs(ctx: Context) -> dict[str, Any]:
    """One generation's pipeline arguments: ``batch`` digits, the held-out seed, a fresh generator."""
    from phyai_cache_lab.reference import call_kwargs

    labels = [index % 10 for index in range(ctx.sizes.batch)]
    return call_kwargs(labels, num_inference_steps=ctx.sizes.steps, seed=ctx.args.seed,
                       dtype=ctx.reference_dtype, device=ctx.device)


def reference_runner(ctx: Context, pipe: Any) -> Callable[[], torch.Tensor]:
    """One generation of the reference pipeline: images in [0, 1]."""
    from phyai_cache_lab.reference import latents_to_images

    @torch.no_grad()
    def run() -> torch.Tensor:
        return latents_to_images(pipe(**reference_kwargs(ctx)).images)

    return run


def first_transformer_kwargs(pipe: Any, run: Callable[[], Any]) -> dict[str, Any]:
    """The keyword arguments of the first transformer call of one (uncached) generation."""
    seen: list[dict[str, Any]] = []

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not seen:
            seen.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


# -- the large model --------------------------------------------------------------------------------


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Flux's split of the head dim over (text, row, column) positions: (16, 56, 56) for 128; all even."""
    first = max(2, head_dim // 8 // 2 * 2)
    second = (head_dim - first) // 2 // 2 * 2
    return first, second, head_dim - first - second


def build_large_model(ctx: Context) -> torch.nn.Module:
    """Flux's architecture, wider and deeper than the reference; random weights (timing and memory
    only). Built on the device directly: initialising billions of weights on a CPU takes minutes."""
    from diffusers import FluxTransformer2DModel

    s = ctx.sizes
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=s.large_double, num_single_layers=s.large_single,
            attention_head_dim=s.large_head_dim, num_attention_heads=s.large_heads,
            joint_attention_dim=s.large_text_dim, pooled_projection_dim=768, guidance_embeds=False,
            axes_dims_rope=rope_axes(s.large_head_dim),
        )
    return torch.nn.Module.to(model, dtype=ctx.large_dtype).eval().requires_grad_(False)


def large_inputs(ctx: Context) -> dict[str, torch.Tensor]:
    s = ctx.sizes
    generator = torch.Generator().manual_seed(0)
    tokens = s.large_image_side**2
    img_ids = torch.zeros(tokens, 3)
    img_ids[:, 1] = torch.arange(tokens) // s.large_image_side
    img_ids[:, 2] = torch.arange(tokens) % s.large_image_side
    tensors = dict(
        latents=torch.randn(1, tokens, 64, generator=generator),
        encoder_hidden_states=torch.randn(1, s.large_text_tokens, s.large_text_dim, generator=generator),
        pooled_projections=torch.randn(1, 768, generator=generator),
    )
    inputs = {k: v.to(ctx.device, ctx.large_dtype) for k, v in tensors.items()}
    inputs.update(img_ids=img_ids.to(ctx.device), txt_ids=torch.zeros(s.large_text_tokens, 3, device=ctx.device))
    return inputs


def large_runner(ctx: Context, model: Callable[..., Any], handle: Any = None) -> Callable[[], torch.Tensor]:
    """A plain Euler loop, one transformer call per step, one ``handle.run()`` per generation."""
    inputs = ctx.large()[1]
    steps = ctx.sizes.large_steps

    @torch.no_grad()
    def run() -> torch.Tensor:
        x = inputs["latents"].clone()
        sigmas = torch.linspace(1.0, 0.0, steps + 1, device=ctx.device)
        with handle.run(num_inference_steps=steps) if handle is not None else contextlib.nullcontext():
            for i in range(steps):
                velocity = model(hidden_states=x, encoder_hidden_states=inputs["encoder_hidden_states"],
                                 pooled_projections=inputs["pooled_projections"],
                                 timestep=sigmas[i].expand(1).to(x.dtype), img_ids=inputs["img_ids"],
                                 txt_ids=inputs["txt_ids"], return_dict=False)[0]
                x = x + (sigmas[i + 1] - sigmas[i]) * velocity
        return x

    return run


def enable_large(model: torch.nn.Module, name: str) -> Any:
    settings = LARGE_CONFIGS[name]
    if "preset" in settings:
        return enable_dit_cache(model, settings["preset"], backend="native")
    return enable_dit_cache(model, enabled=True, backend="native", **settings)


def weights_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# -- CUDA graphs ------------------------------------------------------------------------------------


class GraphedForward:
    """One uncached transformer call captured into a CUDA graph and replayed with static buffers.

    The first call copies its tensor arguments into static buffers, warms up on a side stream and
    captures; later calls copy their tensors into the same buffers and replay. Later calls must keep
    the tensor shapes and the non-tensor arguments of the first. With ``capture=False`` (CPU dry
    run) each call runs the forward eagerly on the static buffers, which checks the buffer plumbing.
    """

    def __init__(self, forward: Callable[..., Any], capture: bool, warmup: int = 2) -> None:
        self.forward, self.capture, self.warmup = forward, capture, warmup
        self.inputs: dict[str, torch.Tensor] | None = None
        self.constants: dict[str, Any] = {}
        self.outputs: Any = None
        self.graph: Any = None
        self.replays = 0

    def __call__(self, **kwargs: Any) -> Any:
        tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        constants = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
        if self.inputs is None:
            self.inputs, self.constants = {k: v.clone() for k, v in tensors.items()}, constants
            if self.capture:
                self._capture()
        else:
            self._load(tensors, constants)
        if self.graph is not None:
            self.graph.replay()
            self.replays += 1
        else:
            self.outputs = self.forward(**self.inputs, **self.constants)
        return _clone(self.outputs)  # the caller may keep it; the next replay overwrites the buffers

    def _load(self, tensors: dict[str, torch.Tensor], constants: dict[str, Any]) -> None:
        if constants != self.constants or tensors.keys() != self.inputs.keys():
            changed = (k for k in constants.keys() | self.constants.keys() if constants.get(k) != self.constants.get(k))
            differ = sorted({*(tensors.keys() ^ self.inputs.keys()), *changed})
            raise ValueError(f"arguments {differ} differ from the captured call; capture one graph per variant")
        for name, value in tensors.items():
            if value.shape != self.inputs[name].shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)} differs from the captured "
                                 f"{tuple(self.inputs[name].shape)}; capture one graph per shape")
            self.inputs[name].copy_(value)

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: lazy init, autotuning, allocator
            for _ in range(self.warmup):
                self.forward(**self.inputs, **self.constants)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self.forward(**self.inputs, **self.constants)


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    return value


@contextlib.contextmanager
def capturing(ctx: Context) -> Iterator[None]:
    """Stream capture into a throw-away graph; on CPU (dry run) the capture query is simulated,
    since capture itself cannot exist there."""
    if ctx.cuda:
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            yield
        return
    from phyai_cache_lab.testing.qwen_image_21 import simulated_capture

    with simulated_capture():
        yield


def refused_under_capture(ctx: Context, fn: Callable[[], Any]) -> dict[str, Any]:
    try:
        with capturing(ctx):
            fn()
    except Exception as error:  # noqa: BLE001 - what was raised is the finding
        refusal = _find_in_chain(error, GraphCaptureError)
        return {"refused": refusal is not None, "raised": type(error).__name__, "message": str(refusal or error)}
    return {"refused": False, "raised": None, "message": "the cached call ran under capture"}


def _find_in_chain(error: BaseException | None, kind: type) -> BaseException | None:
    """``error`` or an exception it was raised while handling (capture_end may raise over ours)."""
    while error is not None:
        if isinstance(error, kind):
            return error
        error = error.__context__ or error.__cause__
    return None


# -- sections ---------------------------------------------------------------------------------------


def environment(ctx: Context) -> dict[str, Any]:
    info: dict[str, Any] = {
        "phyai_cache": phyai_cache.__version__, "phyai_cache_path": str(Path(phyai_cache.__file__).parent),
        "commit": git_commit(), "torch": torch.__version__, "python": platform.python_version(),
        "device": str(ctx.device), "dry_run": ctx.args.dry_run, "sizes": asdict(ctx.sizes),
        "reference_dtype": str(ctx.reference_dtype), "large_dtype": str(ctx.large_dtype),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }
    with contextlib.suppress(ImportError):
        import diffusers

        info["diffusers"] = diffusers.__version__
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return info


def git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        return done.stdout.strip() or None
    return None


def guard(ctx: Context) -> dict[str, Any]:
    """Each part is checked as soon as it ran, so a later failure cannot hide an earlier finding.
    Every argument is on the device before capture starts: a host-to-device copy inside the capture
    would fail before the guard is reached."""
    pipe = load_reference(ctx)
    transformer_kwargs = first_transformer_kwargs(pipe, reference_runner(ctx, pipe))
    pipeline_kwargs = reference_kwargs(ctx)
    result: dict[str, Any] = {"simulated_capture": not ctx.cuda}
    with enable_dit_cache(pipe, "fbcache-balanced", backend="native") as handle:
        with handle.run():
            in_run = result["transformer_call_in_run"] = refused_under_capture(
                ctx, lambda: pipe.transformer(**transformer_kwargs))
        ctx.check("guard: cached transformer call captured inside a run is refused", in_run["refused"],
                  in_run["message"])
        whole = result["pipeline_call"] = refused_under_capture(ctx, lambda: pipe(**pipeline_kwargs))
        ctx.check("guard: cached pipeline call captured whole is refused", whole["refused"], whole["message"])
        outside = result["uncached_outside_run"] = uncached_capture(ctx, pipe.transformer, transformer_kwargs)
    ctx.check("guard: a call outside a run is captured and replays like eager", outside["psnr_db"] >= MATCH_DB,
              f"PSNR {outside['psnr_db']:.1f} dB against eager, captured={outside['captured']} {outside['error']}")
    return result


@torch.no_grad()
def uncached_capture(ctx: Context, transformer: torch.nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The cached transformer called outside a run (uncached) under capture: allowed, and the replay
    must equal eager. An error (say, a model that is not capturable) is recorded, not raised."""
    eager = transformer(**kwargs)[0]
    graphed = GraphedForward(transformer.forward, capture=ctx.cuda)
    try:
        first, second = graphed(**kwargs)[0], graphed(**kwargs)[0]
    except Exception as error:  # noqa: BLE001 - recorded as the finding
        return {"captured": False, "replays": 0, "psnr_db": -math.inf, "error": f"{type(error).__name__}: {error}"}
    return {"captured": graphed.graph is not None, "replays": graphed.replays,
            "psnr_db": min(psnr_db(first, eager), psnr_db(second, eager)), "error": ""}


PHYAI_GRAPH_CONFIG = dict(enabled=True, strategy="taylorseer", options={"skip_call": True})


def phyai_graphs(ctx: Context) -> dict[str, Any]:
    """Replay-or-skip on a phyai-shaped graph runner (real graphs on a GPU; recorded ones in a dry run)."""
    from phyai_cache.integrations.phyai import attach
    from phyai_cache_lab.testing import qwen_image_21 as qwen

    graph_class = qwen.TorchCudaGraph if ctx.cuda else qwen.RecordingCudaGraph
    steps = 8  # a tiny model: the same size on every machine

    def run(use_cuda_graph: bool, clone: bool = True) -> tuple[torch.Tensor, Any, Any, list]:
        scheduler = qwen.build_scheduler(use_cuda_graph=use_cuda_graph, graph_class=graph_class,
                                         clone_graph_output=clone)
        scheduler.runner.transformer.to(ctx.device)
        with attach(scheduler, PHYAI_GRAPH_CONFIG) as cache:
            request = qwen.QwenImage21Request(num_inference_steps=steps)
            out = scheduler.step(request)
            return out, cache.last_run, scheduler.runner, request.outputs

    eager, eager_stats, _, _ = run(False)
    graphed, stats, runner, outputs = run(True, clone=False)
    decisions = [(r.step, r.branch, r.decision, r.reason) for r in stats.records]
    equal = decisions == [(r.step, r.branch, r.decision, r.reason) for r in eager_stats.records]
    replays = sum(event.endswith(":replay") for event in runner.log)
    captures = sum(event.endswith(":capture") for event in runner.log)
    expected_replays = sum(r.decision == "computed" and r.step > 0 for r in stats.records)
    statics = {graph._output.data_ptr() for graph in runner.graphs.values()}
    aliased = [r.step for r, output in zip(stats.records, outputs) if r.skipped_call and output.data_ptr() in statics]
    row = {"steps_cached": stats.steps_cached, "steps_total": stats.steps_total, "decisions_equal_eager": equal,
           "psnr_vs_eager_db": psnr_db(graphed, eager), "captured": captures}
    ctx.check("phyai graphs: decisions equal the eager runner's", equal, f"{stats.steps_cached} cached of "
              f"{stats.steps_total}")
    ctx.check("phyai graphs: output matches the eager runner's", row["psnr_vs_eager_db"] >= MATCH_DB,
              f"PSNR {row['psnr_vs_eager_db']:.1f} dB")
    ctx.check("phyai graphs: one capture per branch, a replay per computed step after step 0",
              captures == 2 and replays == expected_replays and stats.steps_cached > 0,
              f"{captures} captures, {replays} replays, {expected_replays} computed steps after step 0")
    ctx.check("phyai graphs: no forecast aliases a graph's static output", not aliased, f"aliased at {aliased}")
    try:
        attach(qwen.build_scheduler(use_cuda_graph=True, graph_class=graph_class), enabled=True, strategy="fbcache")
        refused = "attached"
    except phyai_cache.DiTCacheConfigError as error:
        refused = str(error)
    ctx.check("phyai graphs: a block-level config is refused at attach", "use_cuda_graph" in refused, refused[:200])
    return {"simulated_capture": not ctx.cuda, "taylorseer skip_call": row}


def host_syncs(ctx: Context) -> dict[str, Any]:
    pipe = load_reference(ctx)
    run = reference_runner(ctx, pipe)
    baseline = count_syncs(ctx, pipe, run)
    rows = {}
    for name in BALANCED:
        handle = enable_dit_cache(pipe, name, backend="native")
        try:
            rows[name] = count_syncs(ctx, pipe, run, handle)
        finally:
            handle.disable()
        rows[name].update(sync_excess(rows[name], baseline))
        check_syncs(ctx, name, rows[name])
    return {"uncached": baseline, **rows}


def check_syncs(ctx: Context, name: str, row: dict[str, Any]) -> None:
    """At most one extra sync per call, only on calls whose decision was measured, and (so the
    counter is known to see it) at least one when some decision was measured."""
    limit = 0 if name.startswith("taylorseer") else 1
    measured = sum(row["measured"])
    ctx.check(f"host syncs: {name} adds at most {limit} per transformer call",
              row["max_extra_per_call"] <= limit and row["unmeasured_calls_with_extra"] == 0
              and (row["extra_total"] >= 1 or measured == 0),
              f"max {row['max_extra_per_call']} extra per call, {row['extra_total']} in {len(row['per_call'])} "
              f"calls, {measured} measured decisions")


def count_syncs(ctx: Context, pipe: Any, run: Callable[[], Any], handle: Any = None) -> dict[str, Any]:
    """Syncs per transformer call (aten ops) and, on CUDA, the sync-debug warnings of the whole run."""
    with warnings.catch_warnings(record=True) as caught, sync_debug(ctx):
        warnings.simplefilter("always")
        with HostSyncCounter(pipe.transformer) as counter:
            run()
    row: dict[str, Any] = {"per_call": counter.per_call, "total": counter.total, "ops": sorted(set(counter.ops))}
    if ctx.cuda:
        row["sync_debug_warnings"] = sum("synchroniz" in str(w.message) for w in caught)
    if handle is not None:
        row["measured"] = [r.diff is not None for r in handle.last_run.records]
    return row


@contextlib.contextmanager
def sync_debug(ctx: Context) -> Iterator[None]:
    if not ctx.cuda:
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def sync_excess(row: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    extra = [cached - plain for cached, plain in zip(row["per_call"], baseline["per_call"])]
    result = {"extra_per_call": extra, "extra_total": sum(extra), "max_extra_per_call": max(extra, default=0),
              "unmeasured_calls_with_extra": sum(1 for e, m in zip(extra, row["measured"]) if e > 0 and not m)}
    if "sync_debug_warnings" in row:
        result["sync_debug_extra_per_call"] = (row["sync_debug_warnings"] - baseline["sync_debug_warnings"]) / max(
            len(extra), 1)
    return result


def memory(ctx: Context) -> dict[str, Any]:
    """RunStats' peak on the large model, on the exact and on the sampled CUDA path."""
    model = ctx.large()[0]
    weights = weights_bytes(model)
    with enable_large(model, FORCED) as handle:
        run = large_runner(ctx, model, handle)
        plain_peak = peak_of_uncached(ctx, large_runner(ctx, model))
        reset_peak(ctx)  # this script owns its process; the library itself never resets the counter
        run()
        exact = stats_row(handle.last_run)
        exact["device_max_allocated"] = torch.cuda.max_memory_allocated(ctx.device) if ctx.cuda else None
        spike_bytes = allocate_above_peak(ctx)
        run()
        sampled = stats_row(handle.last_run)
    check_memory_kinds(ctx, exact, sampled, weights)
    return {"weights_bytes": weights, "uncached_peak_bytes": plain_peak, "spike_bytes": spike_bytes,
            "runs": {"first run (raises the device peak)": exact, "after a larger allocation": sampled}}


def reset_peak(ctx: Context) -> None:
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)


def peak_of_uncached(ctx: Context, run: Callable[[], Any]) -> int | None:
    """The device peak of one uncached generation (the same weights, called outside a run)."""
    if not ctx.cuda:
        return None
    reset_peak(ctx)
    run()
    return torch.cuda.max_memory_allocated(ctx.device)


def allocate_above_peak(ctx: Context) -> int:
    """Raise the device's peak above what the next run will reach, so that run takes the sampled path."""
    if not ctx.cuda:
        return 0
    size = max(torch.cuda.max_memory_allocated(ctx.device) - torch.cuda.memory_allocated(ctx.device), 0) + 2**28
    spike = torch.empty(size, dtype=torch.uint8, device=ctx.device)
    del spike
    return size


def check_memory_kinds(ctx: Context, exact: dict[str, Any], sampled: dict[str, Any], weights: int) -> None:
    if not ctx.cuda:
        ctx.check("memory: CPU runs report the sampled resident set size",
                  exact["memory_kind"] == sampled["memory_kind"] == "cpu_rss_sampled"
                  and sampled["peak_memory_bytes"] > 0, f"{exact['memory_kind']}, {sampled['peak_memory_bytes']} B")
        return
    ctx.check("memory: a run that raises the device peak reports it exactly",
              exact["memory_kind"] == "cuda_max_allocated"
              and exact["peak_memory_bytes"] == exact["device_max_allocated"],
              f"{exact['memory_kind']} {exact['peak_memory_bytes']} B, max_memory_allocated "
              f"{exact['device_max_allocated']} B")
    ctx.check("memory: a run below an earlier peak reports a sampled lower bound",
              sampled["memory_kind"] == "cuda_allocated_sampled"
              and weights <= sampled["peak_memory_bytes"] <= exact["peak_memory_bytes"],
              f"{sampled['memory_kind']} {sampled['peak_memory_bytes']} B (weights {weights} B, exact "
              f"{exact['peak_memory_bytes']} B)")


# -- workloads: the same eager / graph / compiled comparisons on both models ---------------------


@dataclass
class Workload:
    """A model to compare on: how to get a fresh uncached target, run it, and cache it."""

    name: str
    fresh: Callable[[], Any]  # a new uncached target: a pipeline or a transformer
    runner: Callable[[Any, Any], Callable[[], torch.Tensor]]  # (target, handle or None) -> one generation
    enable: Callable[[Any, str], Any]  # (target, config name) -> CacheHandle
    configs: tuple[str, ...]  # compared eagerly
    main: tuple[str, ...]  # compared against graphs and compilation too
    pairs: int
    data_range: float | None  # PSNR range: 1.0 for images in [0, 1], None for the output's own range
    tier_checks: bool = False  # the configs are calibrated presets: check their PSNR tier

    @staticmethod
    def transformer(target: Any) -> torch.nn.Module:
        return getattr(target, "transformer", target)


def reference_workload(ctx: Context) -> Workload:
    # A pipeline call opens its own run, so the runner ignores the handle.
    return Workload("reference", fresh=lambda: load_reference(ctx), runner=lambda pipe, _: reference_runner(ctx, pipe),
                    enable=lambda pipe, name: enable_dit_cache(pipe, name, backend="native"),
                    configs=tuple(native_presets())[: ctx.sizes.configs], main=BALANCED[: ctx.sizes.configs],
                    pairs=ctx.sizes.pairs, data_range=1.0,
                    tier_checks=ctx.sizes.steps >= 20)  # tiers are calibrated on 20- and 50-step runs


def large_workload(ctx: Context) -> Workload:
    return Workload("large", fresh=lambda: copy.deepcopy(ctx.large()[0]),
                    runner=lambda model, handle: large_runner(ctx, model, handle), enable=enable_large,
                    configs=tuple(LARGE_CONFIGS)[: ctx.sizes.configs], main=(*BALANCED, FORCED)[: ctx.sizes.configs],
                    pairs=ctx.sizes.large_pairs,
                    data_range=None)


def eager_section(ctx: Context, w: Workload) -> dict[str, Any]:
    """Uncached against every config, both eager: speedup, what was cached, PSNR, memory."""
    plain_target, cached_target = w.fresh(), w.fresh()
    plain = w.runner(plain_target, None)
    reference = plain()
    rows = {}
    for name in w.configs:
        with w.enable(cached_target, name) as handle:
            cached = w.runner(cached_target, handle)
            row = paired(ctx, plain, cached, w.pairs)
            row.update(psnr_db=psnr_db(cached(), reference, w.data_range), **stats_row(handle.last_run))
        rows[name] = row
        target = preset_target_psnr(name) if w.tier_checks else None
        if target is not None:
            ctx.check(f"{w.name}: {name} meets its tier ({target:.0f} dB) on this device",
                      row["psnr_db"] >= target, f"PSNR {row['psnr_db']:.1f} dB against uncached")
    return {"reading": "speedup = t(uncached) / t(cached), both eager; psnr_db: cached against uncached output",
            "configs": rows}


def graph_section(ctx: Context, w: Workload) -> dict[str, Any]:
    """The uncached transformer captured once and replayed, against eager uncached and eager cached."""
    eager_target, graphed_target, cached_target = w.fresh(), w.fresh(), w.fresh()
    transformer = w.transformer(graphed_target)
    transformer.forward = GraphedForward(transformer.forward, capture=ctx.cuda)
    eager, graphed = w.runner(eager_target, None), w.runner(graphed_target, None)
    timing = paired(ctx, eager, graphed, w.pairs)  # speedup = t_eager / t_graphed
    match = psnr_db(graphed(), eager(), w.data_range)
    ctx.check(f"cuda graph ({w.name}): the replayed uncached transformer matches eager", match >= MATCH_DB,
              f"PSNR {match:.1f} dB, captured={transformer.forward.graph is not None}")
    rows: dict[str, Any] = {"reading": "row 1: speedup = t(eager) / t(graph), both uncached; other rows: speedup = "
                                       "t(uncached graph) / t(cached eager), above 1 when caching beats the graph",
                            "uncached graph vs eager": {**timing, "psnr_vs_eager_db": match,
                                                        "captured": transformer.forward.graph is not None}}
    for name in w.main:  # speedup = t_graphed_uncached / t_cached_eager: does caching beat graphs here?
        with w.enable(cached_target, name) as handle:
            row = paired(ctx, graphed, w.runner(cached_target, handle), w.pairs)
            rows[f"{name} (eager) vs uncached graph"] = {**row, **stats_row(handle.last_run)}
    return rows


def compiled_section(ctx: Context, w: Workload, backend: str, label: str = "compiled") -> dict[str, Any]:
    """Regionally compiled blocks: uncached against eager, then each config against the same config eager."""
    eager_target, plain_target, cached_target = w.fresh(), w.fresh(), w.fresh()
    how = compile_regionally(w.transformer(plain_target), backend, reset=True)
    compile_regionally(w.transformer(cached_target), backend, reset=False)
    eager, plain = w.runner(eager_target, None), w.runner(plain_target, None)
    first_call_s = timed(ctx, plain)[0]  # includes compilation
    timing = paired(ctx, eager, plain, w.pairs)  # speedup = t_eager / t_compiled
    match = psnr_db(plain(), eager(), w.data_range)
    ctx.check(f"{label} ({w.name}): uncached, matches eager", match >= MATCH_DB, f"PSNR {match:.1f} dB")
    rows: dict[str, Any] = {"how": how, "first_call_s": first_call_s,
                            "reading": "row 1: speedup = t(eager) / t(compiled), both uncached; config rows: speedup = "
                                       "t(compiled uncached) / t(compiled cached), psnr against the same config eager",
                            "uncached compiled vs eager": {**timing, "psnr_vs_eager_db": match}}
    for name in w.main:
        rows[name] = compiled_config(ctx, w, name, (eager_target, cached_target), plain, label)
    breaks = {str(reason): count for reason, count in torch._dynamo.utils.counters["graph_break"].items()}
    rows["graph_breaks"] = breaks
    ctx.check(f"{label} ({w.name}): the decision's host sync stays out of compiled code",
              not any("item" in reason for reason in breaks), f"{len(breaks)} distinct graph-break reasons")
    return rows


def compiled_config(ctx: Context, w: Workload, name: str, targets: tuple[Any, Any], plain: Callable, label: str
                    ) -> dict[str, Any]:
    """One config on compiled blocks: speedup over compiled uncached, and agreement with eager."""
    eager_target, cached_target = targets
    with w.enable(eager_target, name) as handle:
        eager_output = w.runner(eager_target, handle)()
        eager_decisions = stats_row(handle.last_run)["decisions"]
    with w.enable(cached_target, name) as handle:
        cached = w.runner(cached_target, handle)
        row = paired(ctx, plain, cached, w.pairs)
        row.update(psnr_vs_eager_db=psnr_db(cached(), eager_output, w.data_range), **stats_row(handle.last_run))
    row["decisions_equal_eager"] = row["decisions"] == eager_decisions
    if row["decisions_equal_eager"]:  # a flipped near-threshold decision is a different run, not an error
        ctx.check(f"{label} ({w.name}): {name} matches the eager cached run", row["psnr_vs_eager_db"] >= MATCH_DB,
                  f"PSNR {row['psnr_vs_eager_db']:.1f} dB, same decisions")
    return row


def compile_regionally(transformer: torch.nn.Module, backend: str, reset: bool) -> str:
    """Compile each block in place (diffusers' compile_repeated_blocks when the model declares them)."""
    if reset:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
    # Every cache config installs new block wrappers; past the recompile limit dynamo would quietly
    # fall back to eager and the "compiled" figures would be eager ones.
    for option in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, option):
            setattr(torch._dynamo.config, option, 64)
    if getattr(transformer, "_repeated_blocks", None) and hasattr(transformer, "compile_repeated_blocks"):
        transformer.compile_repeated_blocks(backend=backend)
        return f"transformer.compile_repeated_blocks(backend={backend!r})"
    for blocks in (transformer.transformer_blocks, transformer.single_transformer_blocks):
        for block in blocks:
            block.compile(backend=backend)
    return f"block.compile(backend={backend!r}) on every block"


def reference_eager(ctx: Context) -> dict[str, Any]:
    return eager_section(ctx, reference_workload(ctx))


def large_eager(ctx: Context) -> dict[str, Any]:
    return {"weights_bytes": weights_bytes(ctx.large()[0]), **eager_section(ctx, large_workload(ctx))}


def cuda_graph(ctx: Context) -> dict[str, Any]:
    return {"reference": graph_section(ctx, reference_workload(ctx)), "large": graph_section(ctx, large_workload(ctx))}


def compiled_reference(ctx: Context) -> dict[str, Any]:
    return compiled_section(ctx, reference_workload(ctx), ctx.args.compile_backend)


def graphed_blocks_reference(ctx: Context) -> dict[str, Any]:
    """Each block's forward under CUDA graphs (dynamo's cudagraphs backend: cudagraph trees, no
    inductor), the cache deciding on the host around them: the capture that works without engine
    changes (docs/architecture.md). On CPU the same path runs with the eager backend."""
    backend = "cudagraphs" if ctx.cuda else ctx.args.compile_backend
    return compiled_section(ctx, reference_workload(ctx), backend, label="per-block CUDA graphs")


def compiled_large(ctx: Context) -> dict[str, Any]:
    return compiled_section(ctx, large_workload(ctx), ctx.args.compile_backend)


SECTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {  # cheapest and most important first
    "environment": environment,
    "guard": guard,
    "phyai_graphs": phyai_graphs,
    "host_syncs": host_syncs,
    "reference_eager": reference_eager,
    "memory": memory,
    "large_eager": large_eager,
    "cuda_graph": cuda_graph,
    "compiled_reference": compiled_reference,
    "graphed_blocks_reference": graphed_blocks_reference,
    "compiled_large": compiled_large,
}


# -- running and reporting ----------------------------------------------------------------------------


def run_section(ctx: Context, name: str, started: float) -> dict[str, Any]:
    if name in ctx.args.skip:
        return {"status": "skipped", "reason": "--skip"}
    elapsed = time.perf_counter() - started
    if elapsed > ctx.args.budget_s:
        return {"status": "skipped", "reason": f"time budget spent ({elapsed:.0f} s > --budget-s {ctx.args.budget_s})"}
    start = time.perf_counter()
    try:
        result = SECTIONS[name](ctx)
        return {"status": "ok", "seconds": time.perf_counter() - start, "result": result}
    except Exception as error:  # noqa: BLE001 - one failing section must not lose the others
        ctx.check(f"section {name} ran", False, f"{type(error).__name__}: {error}")
        return {"status": "error", "seconds": time.perf_counter() - start,
                "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    finally:
        release_memory(ctx)


def release_memory(ctx: Context) -> None:
    """Free what a section left (its pipelines and model copies) before the next one measures."""
    import gc

    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


def write_report(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=_json_default, allow_nan=True))
    (out / "report.md").write_text(markdown(report))


def _json_default(value: Any) -> Any:
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def markdown(report: dict[str, Any]) -> str:
    meta, sections, checks = report["meta"], report["sections"], report["checks"]
    env = sections.get("environment", {}).get("result", {})
    lines = [f"# gpu_validate report ({'dry run, CPU' if meta['dry_run'] else env.get('gpu', meta['device'])})", "",
             f"phyai_cache {env.get('phyai_cache', '?')}, torch {env.get('torch', '?')}, diffusers "
             f"{env.get('diffusers', '?')}; reference {env.get('reference_dtype', '?')}, large "
             f"{env.get('large_dtype', '?')}; {meta.get('seconds', 0):.0f} s in all.", "", "## Checks", "",
             "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {c['name']} | {'pass' if c['passed'] else '**FAIL**'} | {_cell(c['detail'])} |" for c in checks]
    lines += ["", "## Sections", "", "| section | status | seconds | note |", "|---|---|---|---|"]
    for name, section in sections.items():
        note = section.get("error") or section.get("reason") or ""
        lines.append(f"| {name} | {section['status']} | {section.get('seconds', 0):.1f} | {_cell(note)} |")
    for name, section in sections.items():
        if section["status"] == "ok" and name != "environment":
            lines += ["", f"## {name}", ""] + _tables(section["result"])
    return "\n".join(lines) + "\n"


ROW_FIELDS = ("speedup", "baseline_ms", "candidate_ms", "steps_cached", "steps_total", "ideal_speedup", "psnr_db",
              "psnr_vs_eager_db", "decisions_equal_eager", "peak_memory_bytes", "memory_kind", "cache_bytes",
              "max_extra_per_call", "extra_total", "sync_debug_extra_per_call", "refused", "captured", "message",
              "error")


def _tables(result: dict[str, Any], title: str = "") -> list[str]:
    """Every dict of rows (name -> dict with known fields) becomes a table; scalars become a list."""
    rows = {k: v for k, v in result.items() if isinstance(v, dict) and any(f in v for f in ROW_FIELDS)}
    nested = {k: v for k, v in result.items() if isinstance(v, dict) and k not in rows}
    scalars = {k: v for k, v in result.items() if not isinstance(v, (dict, list))}
    lines = [f"### {title}", ""] if title and (rows or scalars) else []
    lines += [f"- {k}: {_fmt(v)}" for k, v in scalars.items()]
    if rows:
        fields = [f for f in ROW_FIELDS if any(f in row for row in rows.values())]
        lines += ["", "| config | " + " | ".join(fields) + " |", "|---" * (len(fields) + 1) + "|"]
        for name, row in rows.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(row.get(f, "")) for f in fields) + " |")
    for key, value in nested.items():
        lines += [""] + _tables(value, f"{title} / {key}".strip(" /"))
    return lines


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return _cell(value)


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")[:300]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_validate_out"), help="report folder")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: every section, capture simulated")
    parser.add_argument("--reference-dtype", choices=sorted(DTYPES), default="fp32",
                        help="the reference model's dtype (fp32: comparable with its CPU calibration)")
    parser.add_argument("--large-dtype", choices=sorted(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--compile-backend", default=None, help="default inductor (eager in a dry run)")
    parser.add_argument("--seed", type=int, default=200, help="reference seed (200: a held-out calibration seed)")
    parser.add_argument("--skip", nargs="*", default=[], choices=sorted(SECTIONS), help="sections to leave out")
    parser.add_argument("--only", nargs="*", default=None, choices=sorted(SECTIONS),
                        help="run just these sections (environment always runs)")
    parser.add_argument("--budget-s", type=float, default=180.0,
                        help="a section due to start after this many seconds is skipped (default 180: the "
                             "last section, the large model's compilation, then ends near 4 minutes)")
    parser.add_argument("-v", "--verbose", action="store_true", help="phyai_cache's per-run INFO lines")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device = "cpu"
    if args.only is not None:
        args.skip += [name for name in SECTIONS if name not in args.only and name != "environment"]
    args.compile_backend = args.compile_backend or ("eager" if args.dry_run else "inductor")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_validate: no CUDA device (torch {torch.__version__}, built with CUDA {torch.version.cuda}). "
              "Run it on a CUDA machine, or pass --dry-run to exercise every section on CPU with tiny sizes.",
              file=sys.stderr)
        return 2
    logging.getLogger("phyai_cache").setLevel(logging.INFO if args.verbose else logging.WARNING)
    ctx = Context(args, device, DRY_SIZES if args.dry_run or device.type == "cpu" else GPU_SIZES)
    report: dict[str, Any] = {"meta": {"device": str(device), "dry_run": args.dry_run, "argv": sys.argv[1:]},
                              "sections": {}, "checks": ctx.checks}
    started = time.perf_counter()
    for name in SECTIONS:
        print(f"gpu_validate: {name} ...", file=sys.stderr, flush=True)
        report["sections"][name] = run_section(ctx, name, started)
        report["meta"]["seconds"] = time.perf_counter() - started
        write_report(args.out, report)  # after every section: a run cut short keeps what it measured
    return summarise(report, args.out)


def summarise(report: dict[str, Any], out: Path) -> int:
    failed = [c["name"] for c in report["checks"] if not c["passed"]]
    errors = [n for n, s in report["sections"].items() if s["status"] == "error"]
    skipped = [n for n, s in report["sections"].items() if s["status"] == "skipped"]
    print(f"gpu_validate: {len(report['checks']) - len(failed)}/{len(report['checks'])} checks passed, "
          f"{len(errors)} section errors {errors or ''}, skipped {skipped or 'none'}; report in {out}/report.md",
          file=sys.stderr)
    for name in failed:
        print(f"  FAILED: {name}", file=sys.stderr)
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
