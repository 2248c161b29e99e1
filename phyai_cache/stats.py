"""What a cached run did: one :class:`RunStats` per run, the same shape for every backend."""

from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

logger = logging.getLogger("phyai_cache")


@dataclass
class StepRecord:
    """One transformer call: a denoising step of one CFG branch."""

    step: int
    branch: str
    decision: str  # "computed", "cached", or "raised" (the call failed; not a step)
    reason: str  # why: "warmup", "inactive", "no_cache", "above_threshold", "cached", ...
    diff: float | None  # the measured decision statistic (relative L1), when it was measured
    blocks_computed: int
    # Strategy-specific figures of this step: a verified forecaster's estimated error
    # ("forecast_error"), MagCache's ratio while calibrating ("mag_ratio"), TeaCache's input and
    # output changes ("input_change", "output_change"), ...
    measures: dict[str, float] = field(default_factory=dict)
    skipped_call: bool = False  # the whole transformer call was skipped and its output forecast


@dataclass
class RunStats:
    """Counts, timings and memory of one run (one pipeline call or one ``handle.run()`` scope).

    Steps are counted per transformer call: with two CFG branches, 20 denoising steps are 40 steps
    here, and ``records`` says which branch each belongs to. ``blocks_total`` is what an uncached
    run would have executed; ``blocks_computed`` counts block forwards that really ran.

    ``peak_memory_bytes`` (``memory_kind`` says which): on CUDA, the device's
    ``max_memory_allocated`` when the run raised it (``"cuda_max_allocated"``, exact), otherwise the
    largest ``memory_allocated`` sampled at run start, after each transformer call and at run end
    (``"cuda_allocated_sampled"``, a lower bound: the run stayed below an earlier peak); on CPU, the
    largest resident set size of the process sampled at the same points (``"cpu_rss_sampled"``).
    The process-wide CUDA peak counter is never reset: phyai and its users read it too.
    ``cache_bytes`` is the largest amount of tensor memory the cache itself held during the run.
    """

    backend: str
    strategy: str
    num_inference_steps: int | None = None
    steps_total: int = 0
    steps_computed: int = 0
    steps_cached: int = 0
    blocks_total: int = 0
    blocks_computed: int = 0
    calls_skipped: int = 0  # cached steps whose whole transformer call was skipped (options.skip_call)
    calls_failed: int = 0  # transformer calls that raised (records say "raised"); not counted as steps
    latency_s: float = 0.0
    peak_memory_bytes: int | None = None
    memory_kind: str = "cpu_rss_sampled"
    cache_bytes: int = 0
    completed: bool = True
    # What went wrong without stopping the run, once per kind: {"timestep_unread": message, ...}.
    warnings: dict[str, str] = field(default_factory=dict)
    records: list[StepRecord] = field(default_factory=list)

    @property
    def branches(self) -> list[str]:
        return list(dict.fromkeys(r.branch for r in self.records))

    @property
    def steps_per_branch(self) -> dict[str, int]:
        """Calls per branch: with CFG on a correctly split run, each equals the denoising steps."""
        counts: dict[str, int] = {}
        for record in self.records:
            counts[record.branch] = counts.get(record.branch, 0) + 1
        return counts

    @property
    def reached_model(self) -> bool:
        """False when no transformer call went through the cache during the run (0 steps): the
        transformer was bypassed or replaced, so nothing was cached or counted. Logged as a WARNING."""
        return self.steps_total > 0

    @property
    def cached_fraction(self) -> float:
        return self.steps_cached / self.steps_total if self.steps_total else 0.0

    @property
    def compute_fraction(self) -> float:
        """blocks_computed / blocks_total: the ideal time ratio at equal block cost."""
        return self.blocks_computed / self.blocks_total if self.blocks_total else 1.0

    def add(self, record: StepRecord, blocks_per_call: int) -> None:
        if record.decision == "raised":  # a failed call is no step: its retry is (docs/serving.md)
            self.calls_failed += 1
            self.records.append(record)
            return
        self.steps_total += 1
        if record.decision == "cached":
            self.steps_cached += 1
            self.calls_skipped += record.skipped_call
        else:
            self.steps_computed += 1
        self.blocks_total += blocks_per_call
        self.blocks_computed += record.blocks_computed
        self.records.append(record)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["branches"] = self.branches
        data["steps_per_branch"] = self.steps_per_branch
        data["cached_fraction"] = self.cached_fraction
        data["compute_fraction"] = self.compute_fraction
        data["reached_model"] = self.reached_model
        return data

    def summary(self) -> str:
        memory = "n/a" if self.peak_memory_bytes is None else f"{self.peak_memory_bytes / 2**20:.1f} MiB"
        status = "" if self.completed else " (run raised)"
        if self.calls_failed:
            status += f", {self.calls_failed} failed call(s) retried or abandoned"
        if not self.reached_model:
            status += " -- WARNING: no transformer call went through the cache (0 steps): nothing was cached"
        if self.warnings:
            status += f" -- WARNINGS: {', '.join(self.warnings)}"
        return (
            f"phyai_cache {self.backend}/{self.strategy}: {self.steps_cached}/{self.steps_total} steps cached, "
            f"{self.blocks_computed}/{self.blocks_total} blocks computed, {self.latency_s * 1e3:.1f} ms, "
            f"peak {memory} ({self.memory_kind}), cache {self.cache_bytes / 2**20:.2f} MiB{status}"
        )


@dataclass
class BatchStats:
    """One step-level batch forward (``handle.batch(rows)``): what each row group decided and how
    much of the batch's block work ran. ``row_blocks_computed / row_blocks_total`` is the share of
    row-blocks that really ran (the ideal time ratio at equal cost per row)."""

    rows: int
    row_blocks_total: int
    row_blocks_computed: int
    groups: list[dict[str, Any]] = field(default_factory=list)

    @property
    def compute_fraction(self) -> float:
        return self.row_blocks_computed / self.row_blocks_total if self.row_blocks_total else 1.0

    @classmethod
    def of(cls, calls: list[Any], rows: int, blocks_per_call: int) -> BatchStats:
        groups = [{"request": c.run.request_id, "branch": c.branch, "step": c.step,
                   "rows": c.rows.stop - c.rows.start, "decision": c.decision, "reason": c.reason, "diff": c.diff,
                   "blocks_computed": c.blocks_computed} for c in calls]
        computed = sum(g["rows"] * g["blocks_computed"] for g in groups)
        return cls(rows, rows * blocks_per_call, computed, groups)


class RunClock:
    """Latency and peak-memory measurement around one run, without side effects on the process."""

    def __init__(self, device: torch.device | None) -> None:
        self.cuda = device is not None and device.type == "cuda" and torch.cuda.is_available()
        self.device = device
        self.peak_sampled = 0
        self.cuda_peak_before = 0
        if self.cuda:
            torch.cuda.synchronize(device)
            # Read, never reset: resetting would change the process-wide figure others rely on.
            self.cuda_peak_before = torch.cuda.max_memory_allocated(device)
        self.sample()
        self.start = time.perf_counter()

    def sample(self) -> None:
        current = torch.cuda.memory_allocated(self.device) if self.cuda else current_rss_bytes()
        self.peak_sampled = max(self.peak_sampled, current)

    def stop(self, stats: RunStats) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        stats.latency_s = time.perf_counter() - self.start
        self.sample()
        stats.peak_memory_bytes, stats.memory_kind = self.peak_sampled, "cpu_rss_sampled"
        if self.cuda:
            peak_after = torch.cuda.max_memory_allocated(self.device)
            if peak_after > self.cuda_peak_before:  # the device's peak was reached inside this run
                stats.peak_memory_bytes, stats.memory_kind = int(peak_after), "cuda_max_allocated"
            else:
                stats.memory_kind = "cuda_allocated_sampled"


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; elsewhere the lifetime peak)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
