"""A tiny step-level serving loop over the toy DiT (random weights), for fast serving tests.

Each request is (config, seed, guidance); every step, the loop puts the current step of the chosen
requests into one call of the model (cond and uncond rows of a request side by side) inside
``handle.batch(rows)``, exactly what a serving engine does; ``solo`` runs one request alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from phyai_cache import Row

STEPS = 6
TOKENS = 8


@dataclass
class ToyJob:
    request: Any  # phyai_cache.Request
    seed: int
    guidance: float | None
    x: torch.Tensor = None
    cond: torch.Tensor = None
    step: int = 0
    decisions: list = field(default_factory=list)

    def __post_init__(self) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        self.x = torch.randn(1, TOKENS, 8, generator=generator)
        self.cond = torch.randn(1, 16, generator=generator)

    @property
    def branches(self) -> tuple[str, ...]:
        return ("cond", "uncond") if self.guidance is not None else ("cond",)

    @property
    def done(self) -> bool:
        return self.step >= STEPS


SIGMAS = torch.linspace(1.0, 0.0, STEPS + 1)


@torch.no_grad()
def step_batch(model: torch.nn.Module, handle: Any, jobs: list[ToyJob], per_row: bool = True) -> None:
    """One call of ``model`` with the current step of every job in ``jobs`` (in that order)."""
    x, t, cond, rows = [], [], [], []
    for job in jobs:
        for branch in job.branches:
            x.append(job.x)
            t.append(SIGMAS[job.step].reshape(1))
            cond.append(job.cond if branch == "cond" else torch.zeros_like(job.cond))
            rows.append(Row(job.request, branch))
    with handle.batch(rows, per_row=per_row):
        velocity = model(torch.cat(x), torch.cat(t), torch.cat(cond))
    offset = 0
    for job in jobs:
        v = velocity[offset:offset + len(job.branches)]
        offset += len(job.branches)
        if job.guidance is not None:
            v = v[1:2] + job.guidance * (v[0:1] - v[1:2])
        job.x = job.x + (SIGMAS[job.step + 1] - SIGMAS[job.step]) * v
        job.step += 1


def solo(model: torch.nn.Module, handle: Any, config: Any, seed: int, guidance: float | None
         ) -> tuple[torch.Tensor, list]:
    """The request generated alone: (output, per-step decisions)."""
    request = handle.open_request(config, num_inference_steps=STEPS)
    job = ToyJob(request, seed, guidance)
    while not job.done:
        step_batch(model, handle, [job])
    request.close()
    return job.x, decisions(request)


def decisions(request: Any) -> list[tuple[int, str, str, str]]:
    """Per step: (step, branch, decision, reason); failed calls (retried) are no steps."""
    return [(r.step, r.branch, r.decision, r.reason) for r in request.stats.records if r.decision != "raised"]


def close_leftover_requests(handle: Any) -> None:
    """Fixture teardown: close what a failing test left open, so it cannot leak into the next."""
    table = handle._lifecycle.requests
    for request_id in handle.open_requests:
        table.close(table._runs[request_id], completed=False)
