"""RunClock: what peak memory means per device, and that measuring it has no side effects."""

from __future__ import annotations

import mmap

import pytest
import torch

from phyai_cache.stats import RunClock, RunStats, current_rss_bytes


def _stats() -> RunStats:
    return RunStats(backend="native", strategy="fbcache")


def test_cpu_peak_is_the_sampled_resident_set():
    clock = RunClock(torch.device("cpu"))
    before = current_rss_bytes()
    # A fresh anonymous 64 MiB mapping, touched page by page: it raises the resident set whatever
    # state the allocator is in (a torch tensor may reuse memory that is already resident after a
    # long test session, which made this test flaky in CI), and it is returned when closed, before
    # the run ends, so only the sample inside the run sees it.
    held = mmap.mmap(-1, 64 * 2**20)
    for offset in range(0, len(held), mmap.PAGESIZE):
        held[offset] = 1
    clock.sample()
    held.close()
    stats = _stats()
    clock.stop(stats)
    assert stats.memory_kind == "cpu_rss_sampled" and stats.latency_s > 0
    assert stats.peak_memory_bytes >= before + 60 * 2**20
    assert current_rss_bytes() < stats.peak_memory_bytes  # the mapping really went away


class FakeDevice:
    """Stands in for torch.cuda's allocator counters: this machine has no GPU."""

    def __init__(self, allocated: int, peak: int) -> None:
        self.allocated, self.peak = allocated, peak

    def allocate(self, nbytes: int) -> None:
        self.allocated += nbytes
        self.peak = max(self.peak, self.allocated)

    def free(self, nbytes: int) -> None:
        self.allocated -= nbytes


@pytest.fixture
def device(monkeypatch):
    fake = FakeDevice(allocated=100, peak=1000)  # an earlier run in the process peaked at 1000
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: fake.allocated)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: fake.peak)

    def reset(device=None):
        raise AssertionError("the process-wide CUDA peak counter must never be reset")

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    return fake


def test_cuda_run_that_raises_the_device_peak_reports_it_exactly(device):
    clock = RunClock(torch.device("cuda"))
    device.allocate(2000)  # inside a transformer call: peak 2100, freed before the next sample
    device.free(2000)
    clock.sample()
    stats = _stats()
    clock.stop(stats)
    assert (stats.peak_memory_bytes, stats.memory_kind) == (2100, "cuda_max_allocated")
    assert device.peak == 2100  # untouched by the measurement


def test_cuda_run_below_an_earlier_peak_reports_the_sampled_maximum(device):
    clock = RunClock(torch.device("cuda"))
    device.allocate(300)  # held across calls: sampled
    clock.sample()
    device.free(300)
    stats = _stats()
    clock.stop(stats)
    assert (stats.peak_memory_bytes, stats.memory_kind) == (400, "cuda_allocated_sampled")
    assert device.peak == 1000
