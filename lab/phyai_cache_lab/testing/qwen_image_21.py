"""A stand-in for phyai's Qwen-Image 2.1 (model, runner, scheduler) and for phyai's ``CudaGraph``.

phyai's ``models/qwen_image_21/`` (public repository mingti-org/phyai, newer than the snapshot in
``../shared/phyai-src``) needs phyai layers the snapshot lacks, so it cannot run here. This module is
written from its call pattern, not from its code, and reproduces what the cache depends on:

* **the transformer** ``forward(hidden_states, timestep, condition, *, prefix_kv=None,
  return_prefix_kv=False, attn_ctx=None)`` returns an output dataclass ``(sample, prefix_kv)``. Without
  ``prefix_kv`` it runs the joint sequence (text, condition image, target image); the prefix (text and
  condition image) attends only to itself, so its K/V does not depend on the target, and with
  ``return_prefix_kv=True`` each block returns its prefix K/V. With ``prefix_kv`` (one pair per
  block) it runs the target tokens only, attending to the stored prefix. Its class is named like
  phyai's (module and qualified name), so the library finds its blocks as it will for phyai's;
* **each block** ``forward(hidden, modulation, condition, rope, *, prefix_kv=None,
  return_prefix_kv=False, attn_ctx=None)`` returns ``(hidden, kv | None)``;
* **the runner** ``forward(hidden_states, timestep, *, encoder_hidden_states, target_tokens,
  branch="cond")`` memoises each branch's condition and prefix K/V, runs step 0 of a branch with
  ``return_prefix_kv=True`` and later steps on the target tokens only, and (``use_cuda_graph``)
  captures one graph per branch of the whole transformer at its first prefix call (step 1) and
  replays it after; ``reset()`` forgets the request;
* **the scheduler** ``step(request)`` runs a flow-matching Euler loop with true CFG: per step, the cond
  then the uncond call, latents and timestep by position, the branch by keyword.

Graphs: a CUDA graph cannot exist on a CPU. :class:`RecordingCudaGraph` has phyai's ``CudaGraph``
interface (``capture(fn, example_inputs)``, ``replay(inputs)``, static input buffers, the output
returned by reference) and records every capture and replay; while it "captures", torch's capture
query answers True (as :func:`phyai_cache.graphs.stream_is_capturing` reads it), so any cache hook that
ran inside the captured function would raise ``GraphCaptureError`` as on a GPU. Its replay re-runs the
captured function on the static buffers and writes into the static output, which is what the graph's
kernels do. :class:`TorchCudaGraph` is the same interface over ``torch.cuda.graph``, for a GPU
(benchmarks/gpu_validate.py).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PrefixKV = tuple[torch.Tensor, torch.Tensor]

HIDDEN, HEADS, LATENT_CHANNELS, TEXT_DIM = 32, 2, 8, 16


# -- graphs ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def simulated_capture() -> Iterator[None]:
    """torch's stream-capture query answers True inside (a CPU cannot capture)."""
    saved = torch.cuda.is_initialized, torch.cuda.is_current_stream_capturing
    torch.cuda.is_initialized = torch.cuda.is_current_stream_capturing = lambda: True
    try:
        yield
    finally:
        torch.cuda.is_initialized, torch.cuda.is_current_stream_capturing = saved


class RecordingCudaGraph:
    """phyai's ``CudaGraph`` interface on a CPU, recording what happened (see the module doc)."""

    def __init__(self, *, num_warmup_iters: int = 1, log: list[str] | None = None) -> None:
        self.num_warmup_iters = num_warmup_iters
        self.log = log if log is not None else []
        self._fn: Callable[..., Any] | None = None
        self._input_buffers: dict[str, torch.Tensor] = {}
        self._output: Any = None

    @property
    def is_captured(self) -> bool:
        return self._fn is not None

    def input_buffer(self, name: str) -> torch.Tensor:
        return self._input_buffers[name]

    def capture(self, fn: Callable[..., Any], example_inputs: dict[str, torch.Tensor]) -> None:
        if self.is_captured:
            raise RuntimeError("already captured")
        self._input_buffers = {name: value.clone() for name, value in example_inputs.items()}
        for _ in range(self.num_warmup_iters):
            fn(**self._input_buffers)
        with simulated_capture():
            self._output = fn(**self._input_buffers)
        self._fn = fn
        self.log.append("capture")

    def replay(self, inputs: dict[str, torch.Tensor] | None = None) -> Any:
        if not self.is_captured:
            raise RuntimeError("replay() before capture()")
        for name, value in (inputs or {}).items():
            self._input_buffers[name].copy_(value)
        self._output.copy_(self._fn(**self._input_buffers))  # what the captured kernels write
        self.log.append("replay")
        return self._output  # by reference, refilled by every replay


class TorchCudaGraph(RecordingCudaGraph):
    """The same interface over a real ``torch.cuda.CUDAGraph`` (a GPU only)."""

    def capture(self, fn: Callable[..., Any], example_inputs: dict[str, torch.Tensor]) -> None:
        self._input_buffers = {name: value.clone() for name, value in example_inputs.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(1, self.num_warmup_iters)):
                fn(**self._input_buffers)
        torch.cuda.current_stream().wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._output = fn(**self._input_buffers)
        self._fn = fn
        self.log.append("capture")

    def replay(self, inputs: dict[str, torch.Tensor] | None = None) -> Any:
        for name, value in (inputs or {}).items():
            self._input_buffers[name].copy_(value)
        self._graph.replay()
        self.log.append("replay")
        return self._output


# -- the model ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PreparedCondition:
    text: torch.Tensor  # (batch, text tokens, hidden)
    prefix_length: int  # text + condition image tokens
    target_tokens: int


@dataclass(frozen=True)
class ModelOutput:
    sample: torch.Tensor
    prefix_kv: tuple[PrefixKV, ...] | None = None


class Rope(nn.Module):
    """A fixed position table added to queries and keys (the model's rotary table stand-in)."""

    def __init__(self, positions: int = 256) -> None:
        super().__init__()
        angles = torch.arange(positions)[:, None] * torch.linspace(0.1, 1.0, HIDDEN // HEADS)[None]
        self.register_buffer("table", 0.1 * torch.sin(angles), persistent=False)

    def apply(self, query: torch.Tensor, key: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = self.table[start:start + query.shape[1]][None, :, None]
        return query + positions, key + positions


class QwenImage21Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.out = nn.Linear(HIDDEN, HIDDEN)
        self.mlp = nn.Sequential(nn.Linear(HIDDEN, 2 * HIDDEN), nn.GELU(), nn.Linear(2 * HIDDEN, HIDDEN))

    def forward(self, hidden: torch.Tensor, modulation: tuple[torch.Tensor, torch.Tensor],
                condition: PreparedCondition, rope: Rope, *, prefix_kv: PrefixKV | None = None,
                return_prefix_kv: bool = False, attn_ctx: Any = None) -> tuple[torch.Tensor, PrefixKV | None]:
        scale, gate = modulation
        batch, tokens, _ = hidden.shape
        query, key, value = (part.reshape(batch, tokens, HEADS, HIDDEN // HEADS)
                             for part in self.qkv(F.layer_norm(hidden, (HIDDEN,)) * (1 + scale)).chunk(3, -1))
        start = condition.prefix_length if prefix_kv is not None else 0
        query, key = rope.apply(query, key, start)
        prefix = condition.prefix_length
        extracted = (key[:, :prefix].clone(), value[:, :prefix].clone()) if return_prefix_kv else None
        if prefix_kv is not None:  # target tokens attend to the stored prefix and to themselves
            attended = _attention(query, torch.cat((prefix_kv[0], key), 1), torch.cat((prefix_kv[1], value), 1))
        else:  # the joint sequence: the prefix attends to itself only (a causal condition)
            attended = torch.cat((_attention(query[:, :prefix], key[:, :prefix], value[:, :prefix]),
                                  _attention(query[:, prefix:], key, value)), 1)
        hidden = hidden + gate * self.out(attended.flatten(2))
        hidden = hidden + gate * self.mlp(F.layer_norm(hidden, (HIDDEN,)))
        return hidden, extracted


def _attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    scores = torch.einsum("bqhd,bkhd->bhqk", query, key) / math.sqrt(query.shape[-1])
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), value)


class QwenImage21Transformer(nn.Module):
    def __init__(self, layers: int = 4) -> None:
        super().__init__()
        self.img_in = nn.Linear(LATENT_CHANNELS, HIDDEN)
        self.txt_in = nn.Linear(TEXT_DIM, HIDDEN)
        self.time_in = nn.Sequential(nn.Linear(16, HIDDEN), nn.SiLU(), nn.Linear(HIDDEN, 2 * HIDDEN))
        self.pos_embed = Rope()
        self.transformer_blocks = nn.ModuleList(QwenImage21Block() for _ in range(layers))
        self.proj_out = nn.Linear(HIDDEN, LATENT_CHANNELS)

    def prepare_condition(self, encoder_hidden_states: torch.Tensor, condition_tokens: int,
                          target_tokens: int) -> PreparedCondition:
        return PreparedCondition(self.txt_in(encoder_hidden_states),
                                 encoder_hidden_states.shape[1] + condition_tokens, target_tokens)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, condition: PreparedCondition, *,
                prefix_kv: tuple[PrefixKV, ...] | None = None, return_prefix_kv: bool = False,
                attn_ctx: Any = None) -> ModelOutput:
        if prefix_kv is not None and (return_prefix_kv or len(prefix_kv) != len(self.transformer_blocks)):
            raise ValueError("cached calls need one K/V pair per block and cannot extract again")
        hidden = self.img_in(hidden_states)
        if prefix_kv is None:
            hidden = torch.cat((condition.text, hidden), 1)
        # The target tokens are modulated by the timestep, the prefix by timestep 0 (it is clean).
        target = self._modulation(timestep)
        if prefix_kv is None:
            prefix = self._modulation(torch.zeros_like(timestep)).expand(-1, condition.prefix_length, -1)
            joint = torch.cat((prefix, target.expand(-1, hidden.shape[1] - condition.prefix_length, -1)), 1)
            modulation = tuple(joint.chunk(2, -1))
        else:
            modulation = tuple(target.chunk(2, -1))
        extracted = []
        for index, block in enumerate(self.transformer_blocks):
            hidden, layer_kv = block(hidden, modulation, condition, self.pos_embed,
                                     prefix_kv=prefix_kv[index] if prefix_kv is not None else None,
                                     return_prefix_kv=return_prefix_kv, attn_ctx=attn_ctx)
            if layer_kv is not None:
                extracted.append(layer_kv)
        return ModelOutput(self.proj_out(F.layer_norm(hidden, (HIDDEN,))),
                           tuple(extracted) if return_prefix_kv else None)

    def _modulation(self, timestep: torch.Tensor) -> torch.Tensor:
        phases = timestep.float()[:, None] * torch.arange(1, 9, device=timestep.device)[None]
        return self.time_in(torch.cat((phases.sin(), phases.cos()), -1))[:, None]


# The library finds a model's blocks by its class's module and name (phyai_cache.known_blocks); named
# like phyai's class, the stand-in is found the way phyai's own model is.
QwenImage21Transformer.__module__ = "phyai.models.qwen_image_21.modeling_qwen_image_21"


def build_transformer(layers: int = 4, seed: int = 0) -> QwenImage21Transformer:
    torch.manual_seed(seed)
    return QwenImage21Transformer(layers).eval()


# -- runner and scheduler ----------------------------------------------------------------------------

class QwenImage21Runner:
    """phyai's runner rules (module doc). ``reextract`` runs every step on the joint sequence and
    stores the prefix again (a runner that never reuses it), ``clone_graph_output=False`` returns the
    graph's static output by reference (phyai's runner clones it)."""

    def __init__(self, transformer: QwenImage21Transformer, *, use_kv_cache: bool = True,
                 use_cuda_graph: bool = False, graph_class: type[RecordingCudaGraph] = RecordingCudaGraph,
                 reextract: bool = False, clone_graph_output: bool = True) -> None:
        self.transformer = transformer
        self.use_kv_cache = use_kv_cache
        self.use_cuda_graph = use_cuda_graph and use_kv_cache
        self.graph_class = graph_class
        self.reextract = reextract
        self.clone_graph_output = clone_graph_output
        self.conditions: dict[str, PreparedCondition] = {}
        self.prefixes: dict[str, tuple[PrefixKV, ...]] = {}
        self.graphs: dict[str, RecordingCudaGraph] = {}
        self.log: list[str] = []  # "<branch>:eager", "<branch>:capture", "<branch>:replay"

    def reset(self) -> None:
        self.conditions.clear()
        self.prefixes.clear()
        self.graphs.clear()

    @torch.no_grad()
    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, *, encoder_hidden_states: torch.Tensor,
                target_tokens: int, branch: str = "cond") -> torch.Tensor:
        condition = self.conditions.get(branch)
        if condition is None:
            condition = self.transformer.prepare_condition(
                encoder_hidden_states, hidden_states.shape[1] - target_tokens, target_tokens)
            self.conditions[branch] = condition
        prefix = None if self.reextract else self.prefixes.get(branch)
        if prefix is not None:
            hidden_states = hidden_states[:, -target_tokens:]
            if self.use_cuda_graph:
                return self.captured_forward(hidden_states, timestep, condition, prefix, branch)
        self.log.append(f"{branch}:eager")
        output = self.transformer(hidden_states, timestep, condition, prefix_kv=prefix,
                                  return_prefix_kv=self.use_kv_cache and prefix is None)
        if output.prefix_kv is not None:
            self.prefixes[branch] = output.prefix_kv
        return output.sample[:, -target_tokens:]

    def captured_forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, condition: PreparedCondition,
                         prefix: tuple[PrefixKV, ...], branch: str) -> torch.Tensor:
        graph = self.graphs.get(branch)
        inputs = {"hidden_states": hidden_states, "timestep": timestep}
        if graph is None:
            def forward(hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
                return self.transformer(hidden_states, timestep, condition, prefix_kv=prefix).sample

            graph = self.graphs[branch] = self.graph_class()
            graph.capture(forward, inputs)
            self.log.append(f"{branch}:capture")
        output = graph.replay(inputs)
        self.log.append(f"{branch}:replay")
        return output.clone() if self.clone_graph_output else output


@dataclass
class QwenImage21Request:
    num_inference_steps: int = 6
    seed: int = 0
    true_cfg_scale: float = 4.0
    cfg: bool = True
    batch_size: int = 1
    text_tokens: int = 6
    condition_tokens: int = 0  # > 0: an image to edit, whose latents run at step 0 only
    target_tokens: int = 16
    dit_cache: Any = None
    outputs: list[torch.Tensor] = field(default_factory=list)  # what the runner returned, per call


class QwenImage21Scheduler:
    def __init__(self, runner: QwenImage21Runner) -> None:
        self.runner = runner

    @torch.inference_mode()
    def step(self, request: QwenImage21Request) -> torch.Tensor:
        self.runner.reset()
        generator = torch.Generator().manual_seed(request.seed)
        batch = request.batch_size
        device = next(self.runner.transformer.parameters()).device

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator).to(device)

        text, negative = randn(batch, request.text_tokens, TEXT_DIM), randn(batch, request.text_tokens, TEXT_DIM)
        condition_latents = randn(batch, request.condition_tokens, LATENT_CHANNELS)
        latents = randn(batch, request.target_tokens, LATENT_CHANNELS)
        sigmas = torch.linspace(1.0, 0.0, request.num_inference_steps + 1, device=device)
        for index in range(request.num_inference_steps):
            model_input = torch.cat((condition_latents, latents), 1)
            timestep = sigmas[index].expand(batch)
            velocity = self.predict(request, model_input, timestep, text, "cond")
            if request.cfg:
                uncond = self.predict(request, model_input, timestep, negative, "uncond")
                velocity = uncond + request.true_cfg_scale * (velocity - uncond)
            latents = latents + (sigmas[index + 1] - sigmas[index]) * velocity
        return latents

    def predict(self, request: QwenImage21Request, model_input: torch.Tensor, timestep: torch.Tensor,
                text: torch.Tensor, branch: str) -> torch.Tensor:
        output = self.runner.forward(model_input, timestep, encoder_hidden_states=text,
                                     target_tokens=request.target_tokens, branch=branch)
        request.outputs.append(output)
        return output


def build_scheduler(layers: int = 4, seed: int = 0, **runner_options: Any) -> QwenImage21Scheduler:
    return QwenImage21Scheduler(QwenImage21Runner(build_transformer(layers, seed), **runner_options))
