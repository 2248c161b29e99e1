"""A small non-diffusers DiT and a phyai-style denoising loop, for tests and examples.

The model has its own block class and its own forward signature (``forward(x, t, cond)``), and the
loop calls it once per CFG branch per step, the way phyai's runners drive their transformers. It
shows what a caller of the native engine writes: ``blocks="layers"``, ``handle.run()`` around one
generation and ``handle.branch(...)`` around each branch's call.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * 1000.0 * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class ToyBlock(nn.Module):
    """Pre-norm attention + MLP block with adaptive scale/shift from the conditioning vector."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.modulation = nn.Linear(dim, 4 * dim)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        shift1, scale1, shift2, scale2 = self.modulation(emb)[:, None].chunk(4, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        x = x + self.attn(h, h, h, need_weights=False)[0]
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + self.mlp(h)


class ToyDiT(nn.Module):
    """Tokens in, velocity out; conditioned on a timestep and a class/prompt vector."""

    def __init__(self, channels: int = 8, dim: int = 32, depth: int = 6, heads: int = 2,
                 cond_dim: int = 16) -> None:
        super().__init__()
        self.dim = dim
        self.proj_in = nn.Linear(channels, dim)
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.cond_proj = nn.Linear(cond_dim, dim)
        self.layers = nn.ModuleList(ToyBlock(dim, heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.dim).to(x.dtype)) + self.cond_proj(cond)
        h = self.proj_in(x)
        for layer in self.layers:
            h = layer(h, emb)
        return self.proj_out(self.norm_out(h))


def build_toy_dit(seed: int = 0, **kwargs: Any) -> ToyDiT:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return ToyDiT(**kwargs).eval()


@torch.no_grad()
def denoise(model: ToyDiT, *, steps: int = 10, batch_size: int = 1, tokens: int = 16, seed: int = 0,
            cond_seed: int = 0, guidance: float | None = None, handle: Any = None,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Euler flow-matching sampler driving ``model`` like a phyai runner does.

    With ``guidance`` set, the model is called twice per step (cond, then uncond). If ``handle``
    (a :class:`~phyai_cache.CacheHandle`) is given, the loop is one ``handle.run()`` and each call is
    inside ``handle.branch(...)``.
    """
    channels = model.proj_in.in_features
    cond_dim = model.cond_proj.in_features
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, tokens, channels, generator=generator).to(dtype)
    cond = torch.randn(batch_size, cond_dim, generator=torch.Generator().manual_seed(cond_seed)).to(dtype)
    null = torch.zeros_like(cond)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    run = handle.run(num_inference_steps=steps) if handle is not None else contextlib.nullcontext()
    branch: Callable[[str], Any] = handle.branch if handle is not None else (lambda _: contextlib.nullcontext())
    with run:
        for i in range(steps):
            t = sigmas[i].expand(batch_size)
            with branch("cond"):
                velocity = model(x, t, cond)
            if guidance is not None:
                with branch("uncond"):
                    uncond = model(x, t, null)
                velocity = uncond + guidance * (velocity - uncond)
            x = x + (sigmas[i + 1] - sigmas[i]) * velocity
    return x
