"""The step-level scheduler: one transformer call per step for the rows of every running request.

Modelled on how a serving engine drives a flow-matching DiT (phyai's Qwen-Image / Cosmos runners
run the same loop per request): per request, flow-match Euler sigmas and its own latents; per step,
``v = transformer(x, t)`` (with true CFG, a cond and an uncond row of the same request) and
``x <- x + (sigma_next - sigma) * v``. Here the steps of several requests share one call: rows are
concatenated in admission order and each row carries its own timestep.

The engine itself knows nothing about caching beyond describing its rows: with a cache handle, each
request is opened with its tier's config and each call is wrapped in ``handle.batch(rows)``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from phyai_cache.api import CacheHandle
from phyai_cache.config import DiTCacheConfig, load_config
from phyai_cache.requests import Request, Row
from phyai_cache.stats import RunStats


@dataclass(frozen=True)
class ServeRequest:
    """What a client submits: one image of digit ``label`` from noise ``seed``, in cache ``tier``."""

    request_id: str
    label: int
    seed: int
    tier: str = "uncached"
    arrival_s: float = 0.0
    num_inference_steps: int = 20
    cfg_scale: float | None = None

    @property
    def rows(self) -> int:
        return 2 if self.cfg_scale is not None else 1


@dataclass
class Completed:
    """A finished request: its output latents, when it arrived, started and finished, its cache stats."""

    request: ServeRequest
    latents: torch.Tensor
    admitted_s: float
    finished_s: float
    stats: RunStats | None

    @property
    def latency_s(self) -> float:
        return self.finished_s - self.request.arrival_s

    @property
    def decisions(self) -> list[tuple[int, str, str]]:
        return [(r.step, r.branch, r.decision) for r in self.stats.records] if self.stats else []


@dataclass
class _Job:
    spec: ServeRequest
    latents: torch.Tensor  # (1, tokens, channels), float32 like the pipeline's
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    embeds: list[tuple[torch.Tensor, torch.Tensor]]  # (prompt, pooled) per row: cond[, uncond]
    cache: Request | None
    admitted_s: float
    step: int = 0

    @property
    def done(self) -> bool:
        return self.step >= len(self.timesteps)


@dataclass
class EngineTotals:
    """What the engine did over a trace."""

    forwards: int = 0
    row_steps: int = 0
    busy_s: float = 0.0
    row_blocks_total: int = 0
    row_blocks_computed: int = 0
    batch_sizes: list[int] = field(default_factory=list)


class StepEngine:
    """A step-level batching scheduler over a (reference-model) FluxPipeline.

    ``handle``: a cache handle enabled on ``pipe`` with the native backend, or None to run uncached.
    ``tier_configs`` maps a request's tier to the config it opens with (None: uncached).
    ``per_row=False`` makes every batch compute unless all its rows would cache (what peers do).
    """

    def __init__(self, pipe: Any, handle: CacheHandle | None = None, max_rows: int = 16, per_row: bool = True,
                 tier_configs: Mapping[str, Any] | None = None) -> None:
        from .trace import TIERS

        if max_rows < 2:
            raise ValueError("max_rows must be >= 2 (a request with true CFG takes two rows)")
        self.pipe = pipe
        self.transformer = pipe.transformer
        # Read once, as a server knows where its model lives: diffusers' ModelMixin.device/.dtype walk
        # every submodule on each access (about 10 % of a reference-model call when read per call).
        self.device, self.dtype = self.transformer.device, self.transformer.dtype
        self.handle = handle
        self.max_rows = max_rows
        self.per_row = per_row
        # Resolved once: a server parses its tier presets at start-up, not per request.
        self.tier_configs = {tier: _resolve_tier(config)
                             for tier, config in (TIERS if tier_configs is None else tier_configs).items()}
        self.totals = EngineTotals()
        self._schedules: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._running: list[_Job] = []

    # -- the serving loop -----------------------------------------------------------------------

    def run(self, trace: list[ServeRequest], on_finish: Callable[[Completed], None] | None = None
            ) -> list[Completed]:
        """Serve ``trace`` in arrival order; returns the requests in the order they finished.

        Time is the wall clock since the start, except that idle gaps (nothing running, next
        arrival in the future) are skipped instead of slept through.
        """
        waiting = deque(sorted(trace, key=lambda r: r.arrival_s))
        finished: list[Completed] = []
        start, skipped = time.perf_counter(), 0.0

        def now() -> float:
            return time.perf_counter() - start + skipped

        while waiting or self._running:
            if not self._running and waiting and waiting[0].arrival_s > now():
                skipped += waiting[0].arrival_s - now()
            while waiting and waiting[0].arrival_s <= now() and self._fits(waiting[0]):
                self._admit(waiting.popleft(), now())
            began = time.perf_counter()
            self._step()
            self.totals.busy_s += time.perf_counter() - began
            for job in [j for j in self._running if j.done]:
                self._running.remove(job)
                done = self._retire(job, now())
                finished.append(done)
                if on_finish is not None:
                    on_finish(done)
        return finished

    def _fits(self, spec: ServeRequest) -> bool:
        return sum(j.spec.rows for j in self._running) + spec.rows <= self.max_rows

    def _admit(self, spec: ServeRequest, now: float) -> None:
        from phyai_cache_lab import reference

        latents, self._image_ids = self.pipe.prepare_latents(
            1, self.transformer.config.in_channels // 4, reference.IMAGE_SIZE, reference.IMAGE_SIZE,
            self.dtype, self.device, torch.Generator().manual_seed(spec.seed))
        timesteps, sigmas = self._schedule(spec.num_inference_steps, latents.shape[1])
        cond = reference.class_embeddings([spec.label], dtype=self.dtype, device=self.device)
        embeds = [(cond["prompt_embeds"], cond["pooled_prompt_embeds"])]
        if spec.cfg_scale is not None:
            null = reference.class_embeddings([spec.label], null=True, dtype=self.dtype, device=self.device)
            embeds.append((null["prompt_embeds"], null["pooled_prompt_embeds"]))
        self._running.append(_Job(spec, latents, timesteps, sigmas, embeds, self._open(spec), now))

    def _open(self, spec: ServeRequest) -> Request | None:
        if self.handle is None:
            return None
        if spec.tier not in self.tier_configs:
            raise ValueError(f"request {spec.request_id}: unknown tier {spec.tier!r}; "
                             f"known: {', '.join(self.tier_configs)}")
        return self.handle.open_request(self.tier_configs[spec.tier], request_id=spec.request_id,
                                        num_inference_steps=spec.num_inference_steps)

    def _retire(self, job: _Job, now: float) -> Completed:
        stats = None
        if job.cache is not None:
            job.cache.close()
            stats = job.cache.stats
        return Completed(job.spec, job.latents, job.admitted_s, now, stats)

    # -- one step of every running request ------------------------------------------------------

    @torch.no_grad()
    def _step(self) -> None:
        jobs = self._running
        inputs = self._batch_inputs(jobs)
        if self.handle is not None:
            rows = [Row(job.cache, branch) for job in jobs for branch in ("cond", "uncond")[: job.spec.rows]]
            with self.handle.batch(rows, per_row=self.per_row):
                velocity = self.transformer(**inputs, return_dict=False)[0]
            self._count(self.handle.last_batch)
        else:
            velocity = self.transformer(**inputs, return_dict=False)[0]
            self._count(None, rows=velocity.shape[0])
        offset = 0
        for job in jobs:
            v = velocity[offset:offset + job.spec.rows]
            offset += job.spec.rows
            if job.spec.cfg_scale is not None:
                v = v[1:2] + job.spec.cfg_scale * (v[0:1] - v[1:2])
            self._euler(job, v)

    def _batch_inputs(self, jobs: list[_Job]) -> dict[str, Any]:
        latents, timesteps, prompts, pooled = [], [], [], []
        for job in jobs:
            t = job.timesteps[job.step].expand(job.spec.rows).to(job.latents.dtype)
            for prompt, pool in job.embeds:
                latents.append(job.latents)
                prompts.append(prompt)
                pooled.append(pool)
            timesteps.append(t / 1000)
        device, dtype = self.device, self.dtype
        return {
            "hidden_states": torch.cat(latents),
            "timestep": torch.cat(timesteps),
            "guidance": None,
            "pooled_projections": torch.cat(pooled),
            "encoder_hidden_states": torch.cat(prompts),
            "txt_ids": torch.zeros(prompts[0].shape[1], 3, device=device, dtype=dtype),
            "img_ids": self._image_ids,
            "joint_attention_kwargs": {},
        }

    @staticmethod
    def _euler(job: _Job, velocity: torch.Tensor) -> None:
        """FlowMatchEulerDiscreteScheduler.step, exactly: float32 update, cast to the velocity's dtype."""
        dt = job.sigmas[job.step + 1] - job.sigmas[job.step]
        job.latents = (job.latents.to(torch.float32) + dt * velocity).to(velocity.dtype)
        job.step += 1

    def _schedule(self, steps: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The Flux pipeline's timesteps and sigmas for ``steps`` (computed once per step count)."""
        if steps not in self._schedules:
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

            scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
            config = scheduler.config
            mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                 config.get("base_shift", 0.5), config.get("max_shift", 1.15))
            sigmas = np.linspace(1.0, 1 / steps, steps)
            timesteps, _ = retrieve_timesteps(scheduler, steps, self.device, sigmas=sigmas, mu=mu)
            self._schedules[steps] = (timesteps, scheduler.sigmas.to(self.device))
        return self._schedules[steps]

    def _count(self, batch: Any, rows: int = 0) -> None:
        totals = self.totals
        totals.forwards += 1
        if batch is not None:
            totals.row_steps += batch.rows
            totals.row_blocks_total += batch.row_blocks_total
            totals.row_blocks_computed += batch.row_blocks_computed
            totals.batch_sizes.append(batch.rows)
        else:
            blocks = sum(len(b) for b in (self.transformer.transformer_blocks,
                                          self.transformer.single_transformer_blocks))
            totals.row_steps += rows
            totals.row_blocks_total += rows * blocks
            totals.row_blocks_computed += rows * blocks
            totals.batch_sizes.append(rows)


def _resolve_tier(config: Any) -> DiTCacheConfig:
    return DiTCacheConfig() if config is None else load_config(config)


def serve_one(pipe: Any, request: ServeRequest, handle: CacheHandle | None = None,
              tier_configs: Mapping[str, Any] | None = None) -> Completed:
    """``request`` generated alone (its own batch), the reference its batched run is compared with."""
    engine = StepEngine(pipe, handle, max_rows=max(2, request.rows), tier_configs=tier_configs)
    return engine.run([ServeRequest(**{**request.__dict__, "arrival_s": 0.0})])[0]
