"""Multi-process helpers for tests and benchmarks of multi-device runs (CPU, gloo, spawned processes).

* :func:`ulysses_flux`: a tiny Flux pipeline under diffusers' own Ulysses context parallelism.
* :func:`run_ranks` starts N processes with a real gloo process group (a ``file://`` store in a
  temporary directory, so only the local file system is used), runs one function on every rank
  and returns each rank's result; a rank that raises is reported with its traceback, and ranks
  still running after the deadline are killed (only the processes it started) and reported.
* :class:`TokenwiseDiT`: the toy DiT of :mod:`phyai_cache_lab.testing.toy` with token-wise blocks (no
  attention), so that sharding the tokens over ranks computes exactly the rows of the whole model:
  a sequence-parallel layout without a distributed attention.
* :func:`denoise_sharded` / :func:`denoise_cfg`: phyai-style loops for those layouts.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .toy import ToyDiT, timestep_embedding


class RankFailure(RuntimeError):
    """One or more ranks raised or did not finish; the message has every rank's story."""

    def __init__(self, message: str, errors: dict[int, str], results: dict[int, Any]) -> None:
        super().__init__(message)
        self.errors = errors  # rank -> traceback or what happened to it
        self.results = results  # rank -> result, for the ranks that returned one


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, deadline_s: float = 120.0,
              group_timeout_s: float = 60.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks joined by a gloo group.

    ``fn`` must be importable by name (a module-level function). Results travel through files
    (``torch.save``), so tensors come back intact. ``group_timeout_s`` is the default group's
    timeout; ``deadline_s`` bounds the whole call.
    """
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="phyai-ranks-") as folder:
        processes = [context.Process(target=_rank_main, daemon=True,
                                     args=(fn, rank, world_size, folder, group_timeout_s, args))
                     for rank in range(world_size)]
        for process in processes:
            process.start()
        end = time.monotonic() + deadline_s
        for process in processes:
            process.join(max(0.0, end - time.monotonic()))
        hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
        for rank in hung:
            processes[rank].kill()
            processes[rank].join()
        results, errors = {}, {}
        for rank, process in enumerate(processes):
            path = os.path.join(folder, f"rank{rank}.pt")
            if rank in hung:
                errors[rank] = f"still running after {deadline_s:g} s (killed)"
            elif not os.path.exists(path):
                errors[rank] = f"exited with code {process.exitcode} without a result"
            else:
                outcome = torch.load(path, weights_only=False)
                if "error" in outcome:
                    errors[rank] = outcome["error"]
                else:
                    results[rank] = outcome["result"]
    if errors:
        story = "\n".join(f"--- rank {rank}: {text}" for rank, text in sorted(errors.items()))
        raise RankFailure(f"{len(errors)} of {world_size} ranks failed:\n{story}", errors, results)
    return [results[rank] for rank in range(world_size)]


def _rank_main(fn: Callable[..., Any], rank: int, world_size: int, folder: str, group_timeout_s: float,
               args: tuple) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # N ranks share a few cores
    outcome: dict[str, Any]
    try:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'store')}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=group_timeout_s))
        outcome = {"result": fn(rank, world_size, *args)}
    except BaseException:
        outcome = {"error": traceback.format_exc()}
    torch.save(outcome, os.path.join(folder, f"rank{rank}.pt"))
    if dist.is_initialized():
        dist.destroy_process_group()


def attempt(run: Callable[[], Any]) -> tuple[str, str] | None:
    """Run one generation on a rank; return what it raised as (type name, message), or None (a rank's
    failure is a result to assert on, not the end of the worker)."""
    try:
        run()
        return None
    except Exception as error:  # noqa: BLE001 - tests assert on the type and message
        return (type(error).__name__, str(error))


# -- diffusers' own context parallelism on CPU ----------------------------------------------------


def ulysses_flux(ulysses_degree: int = 2, **transformer_overrides: Any) -> Any:
    """A tiny Flux pipeline (:func:`~phyai_cache_lab.testing.build_tiny_pipeline`) whose transformer runs
    diffusers' Ulysses context parallelism over the default group (call on every rank)."""
    from diffusers import ContextParallelConfig

    from .tiny import build_tiny_pipeline

    # diffusers (0.42.1) picks each rank's device as `rank % torch.accelerator.device_count()`: a
    # division by zero on a CPU-only torch, which has no accelerator (count 0). One "device" is
    # what a CPU rank has; this is the only thing patched. (Ring attention does not run on CPU:
    # it needs the attention's log-sum-exp, which diffusers' native SDPA backend does not return.)
    if torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1
    tiny = build_tiny_pipeline("flux", **transformer_overrides)
    tiny.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ulysses_degree))
    return tiny


# -- a model whose tokens can be sharded exactly --------------------------------------------------


class TokenwiseBlock(nn.Module):
    """An adaptive-norm MLP block: every token is computed on its own (no attention)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.modulation = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(emb)[:, None].chunk(2, dim=-1)
        return x + self.mlp(self.norm(x) * (1 + scale) + shift)


class TokenwiseDiT(ToyDiT):
    """:class:`~phyai_cache_lab.testing.toy.ToyDiT` with token-wise blocks (``blocks="layers"``)."""

    def __init__(self, channels: int = 8, dim: int = 32, depth: int = 6, cond_dim: int = 16) -> None:
        super().__init__(channels=channels, dim=dim, depth=depth, heads=2, cond_dim=cond_dim)
        self.layers = nn.ModuleList(TokenwiseBlock(dim) for _ in range(depth))


def build_tokenwise_dit(seed: int = 0, **kwargs: Any) -> TokenwiseDiT:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TokenwiseDiT(**kwargs).eval()


def inputs(model: ToyDiT, *, tokens: int = 32, seed: int = 0, batch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The starting noise and the condition of one generation (same on every rank for one seed)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, tokens, model.proj_in.in_features, generator=generator)
    cond = torch.randn(batch_size, model.cond_proj.in_features, generator=generator)
    return x, cond


@torch.no_grad()
def denoise_sharded(model: ToyDiT, x: torch.Tensor, cond: torch.Tensor, *, steps: int, handle: Any = None,
                    shard: tuple[int, int] = (0, 1), before_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Euler flow matching on this rank's shard ``(index, count)`` of the tokens (a token-wise model
    needs nothing from the other shards). Returns the shard of the final latents."""
    index, count = shard
    x = x.chunk(count, dim=1)[index].clone()
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    scope = handle.run(num_inference_steps=steps) if handle is not None else _nothing()
    with scope:
        for i in range(steps):
            if before_step is not None:
                before_step(i)
            t = sigmas[i].expand(x.shape[0])
            x = x + (sigmas[i + 1] - sigmas[i]) * model(x, t, cond)
    return x


@torch.no_grad()
def denoise_cfg(model: ToyDiT, x: torch.Tensor, cond: torch.Tensor, *, steps: int, guidance: float, handle: Any,
                cfg_group: Any = None, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Classifier-free guidance, phyai style. Without ``cfg_group`` one process runs both branches
    (cond, then uncond) per step. With it (CFG parallel) the rank whose CFG rank is 0 runs cond and
    rank 1 runs uncond; both velocities are all-gathered and combined every step, so every rank
    carries the same latents and the result equals the one-process loop."""
    if cfg_group is not None:
        import torch.distributed as dist

        branches = ["cond" if dist.get_rank(cfg_group) == 0 else "uncond"]
    else:
        branches = ["cond", "uncond"]
    conds = {"cond": cond, "uncond": torch.zeros_like(cond)}
    index, count = shard
    x = x.chunk(count, dim=1)[index].clone()
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    with handle.run(num_inference_steps=steps):
        for i in range(steps):
            t = sigmas[i].expand(x.shape[0])
            velocities = {}
            for name in branches:
                with handle.branch(name):
                    velocities[name] = model(x, t, conds[name])
            if cfg_group is not None:
                both = [torch.empty_like(velocities[branches[0]]) for _ in range(2)]
                dist.all_gather(both, velocities[branches[0]].contiguous(), group=cfg_group)
                velocities = {"cond": both[0], "uncond": both[1]}
            velocity = velocities["uncond"] + guidance * (velocities["cond"] - velocities["uncond"])
            x = x + (sigmas[i + 1] - sigmas[i]) * velocity
    return x


def _nothing() -> Any:
    import contextlib

    return contextlib.nullcontext()


__all__ = ["RankFailure", "attempt", "TokenwiseBlock", "TokenwiseDiT", "build_tokenwise_dit", "denoise_cfg",
           "denoise_sharded", "inputs", "run_ranks", "timestep_embedding", "ulysses_flux"]
