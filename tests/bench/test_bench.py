"""The benchmark on a tiny sweep of the reference model: JSON schema, Markdown, failures as rows, CLI."""

from __future__ import annotations

import json
import math

import pytest

from phyai_cache.cli import main
from phyai_cache_lab.bench import BenchOptions, SweepEntry, reference_workload, run_bench
from phyai_cache_lab.bench.report import markdown, write_json

STEPS, BATCH = 6, 2
# The documented row fields (docs/benchmarks.md, "JSON fields"); a rename is a schema change.
ROW_FIELDS = {
    "name", "backend", "strategy", "steps", "presets", "status", "error", "config", "warnings", "on_frontier",
    "latency_uncached_s", "latency_cached_s", "speedup", "speedup_pairs", "ideal_speedup", "steps_total",
    "steps_cached", "blocks_total", "blocks_computed", "compute_fraction", "peak_memory_bytes", "memory_kind",
    "cache_bytes", "psnr_db", "ssim", "max_abs", "agreement", "agreement_uncached", "same_class_as_uncached",
    "workload_metrics",
}
TOP_FIELDS = {"schema", "created", "elapsed_s", "environment", "options", "baselines", "skipped", "rows"}


class _Broken(Exception):
    pass


def _poisoning_factory(poisoned: set[int]):
    """reference_workload whose n-th created pipeline (0 = the uncached one) fails inside its call."""
    created = []

    def factory(steps, batch_size, cfg_scale):
        workload = reference_workload(steps, batch_size, cfg_scale)
        make = workload.make_pipeline

        def make_pipeline():
            pipe = make()
            if len(created) in poisoned:
                def step(*args, **kwargs):
                    raise _Broken("scheduler exploded")
                pipe.scheduler.step = step
            created.append(pipe)
            return pipe

        workload.make_pipeline = make_pipeline
        return workload

    return factory


@pytest.fixture(scope="module")
def report():
    entries = [
        SweepEntry("fbcache t=0.4 o=1", "native", "fbcache", {"threshold": 0.4, "taylorseer_order": 1}),
        SweepEntry("taylorseer n=2", "native", "taylorseer", {"cache_interval": 2}),
        SweepEntry("too many blocks", "native", "dbcache", {"front_blocks": 4, "back_blocks": 3}),
        SweepEntry("crashes", "native", "fbcache", {"threshold": 0.2}),
    ]
    options = BenchOptions(steps=(STEPS,), batch_size=BATCH, repeats=2)
    return run_bench(options, entries=entries, workload_factory=_poisoning_factory({4}))


def test_rows_carry_every_measurement(report):
    ok = [r for r in report.rows if r.status == "ok"]
    assert [r.name for r in ok] == ["fbcache t=0.4 o=1", "taylorseer n=2"]
    for row in ok:
        m = row.measured
        assert m["steps_total"] == STEPS and 0 < m["steps_cached"] < STEPS
        assert m["blocks_computed"] < m["blocks_total"]
        assert m["ideal_speedup"] == pytest.approx(m["blocks_total"] / m["blocks_computed"])
        assert m["speedup"] > 0 and len(m["speedup_pairs"]) == 2
        assert math.isfinite(m["psnr_db"]) and 0 < m["ssim"] <= 1
        assert 0 <= m["agreement"] <= 1 and 0 <= m["same_class_as_uncached"] <= 1
        assert m["peak_memory_bytes"] > 0
        assert row.sample is not None and row.sample.shape == (BATCH, 1, 16, 16)
        assert not row.warnings  # the uncached pipeline was not affected


def test_failed_configs_are_rows_and_the_sweep_goes_on(report):
    by_name = {r.name: r for r in report.rows}
    refused = by_name["too many blocks"]
    assert refused.status == "unsupported" and "front_blocks" in refused.error and not refused.measured
    crashed = by_name["crashes"]
    assert crashed.status == "error" and "_Broken: scheduler exploded" in crashed.error
    assert len(report.rows) == 4
    table = markdown(report)
    assert "error: _Broken: scheduler exploded" in table and "unsupported: DiTCacheConfigError" in table


def test_json_report_has_the_documented_schema(report, tmp_path):
    path = write_json(report, tmp_path / "bench.json")
    data = json.loads(path.read_text())  # strict JSON: no NaN or Infinity
    assert set(data) == TOP_FIELDS and data["schema"] == "phyai_cache.bench/1"
    assert data["options"]["steps"] == [STEPS] and data["options"]["seeds"] == [0, 1]
    assert {"steps", "latency_s", "agreement", "workload"} <= set(data["baselines"][0])
    for row in data["rows"]:
        assert set(row) == ROW_FIELDS
        assert (row["status"] == "ok") == (row["error"] is None) == (row["speedup"] is not None)
    assert any(row["on_frontier"] for row in data["rows"])


def test_cli_quick_bench_writes_json_markdown_and_figures(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["bench", "--quick", "--backends", "native", "--strategies", "fbcache", "--steps", str(STEPS),
                 "--batch-size", str(BATCH), "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr()
    assert "| config | backend |" in printed.out and "native/fbcache" in printed.out
    assert "runs" in printed.err  # the progress bar
    data = json.loads((out / "bench.json").read_text())
    assert data["command"].startswith("phyai-cache bench ") and "--quick" in data["command"] and data["rows"]
    assert (out / "bench.md").read_text().startswith("Command: `phyai-cache bench")
    pytest.importorskip("matplotlib")
    assert (out / f"bench_frontier_{STEPS}.png").stat().st_size > 0
    assert (out / f"bench_grid_{STEPS}.png").stat().st_size > 0


def test_progress_counts_every_run_exactly_once():
    seen = []
    entries = [SweepEntry("fbcache t=0.4", "native", "fbcache", {"threshold": 0.4}),
               SweepEntry("refused", "native", "dbcache", {"front_blocks": 4, "back_blocks": 3})]
    run_bench(BenchOptions(steps=(4,), batch_size=1, repeats=2), progress=lambda d, t, label: seen.append((d, t)),
              entries=entries)
    total = (1 + 2) + 2 * (1 + 2 * 2)  # baseline warm-up + seeds, then per config warm-up + pairs
    assert seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_cli_exits_1_when_a_config_errors_while_running(tmp_path, capsys, monkeypatch):
    """A refused config is a documented result (exit 0); one that crashes mid-run is a bug (exit 1).

    The CLI's run_bench is the real one given a fixed sweep whose second cached pipeline fails
    inside its call, so the crash happens in real bench code, not in a stand-in."""
    import functools

    import phyai_cache_lab.bench.runner as bench_runner

    entries = [SweepEntry("refused", "native", "dbcache", {"front_blocks": 4, "back_blocks": 3}),
               SweepEntry("fine", "native", "fbcache", {"threshold": 0.4}),
               SweepEntry("crashes", "native", "fbcache", {"threshold": 0.2})]
    real = functools.partial(run_bench, entries=entries, workload_factory=_poisoning_factory({3}))
    monkeypatch.setattr(bench_runner, "run_bench", real)
    args = ["bench", "--quick", "--steps", str(STEPS), "--batch-size", str(BATCH), "--no-figures",
            "--out", str(tmp_path)]
    assert main(args) == 1
    assert "3 configs: 1 measured, 1 unsupported (refused at enable), 1 errors" in capsys.readouterr().out

    real = functools.partial(run_bench, entries=entries[:2])
    monkeypatch.setattr(bench_runner, "run_bench", real)
    assert main(args) == 0
    assert "2 configs: 1 measured, 1 unsupported (refused at enable), 0 errors" in capsys.readouterr().out
