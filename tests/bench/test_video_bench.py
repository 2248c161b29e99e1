"""``phyai-cache bench --model video``: the same sweep on the video reference model (WanPipeline),
with the workload's temporal figures in every row. Tiny sizes: 5 steps, one clip of 8 frames."""

from __future__ import annotations

import json
import math

import pytest

from phyai_cache.cli import main
from phyai_cache_lab.bench import BenchOptions, SweepEntry, run_bench
from phyai_cache_lab.bench.models import MODELS, video_workload, workload_factory
from phyai_cache_lab.bench.report import markdown, write_json
from phyai_cache_lab.reference.video import load_video_metadata

STEPS = 5
LAYERS = load_video_metadata()["transformer_config"]["num_layers"]


@pytest.fixture(scope="module")
def report():
    entries = [SweepEntry("fbcache t=0.5", "native", "fbcache", {"threshold": 0.5}),
               SweepEntry("taylorseer n=2", "native", "taylorseer", {"cache_interval": 2})]
    return run_bench(BenchOptions(steps=(STEPS,), batch_size=1, repeats=1), entries=entries,
                     workload_factory=video_workload)


def test_video_rows_score_frames_and_time(report):
    baseline = report.baselines[0]
    assert "WanPipeline" in baseline.workload["model"] and baseline.workload["frames_per_clip"] == 8
    assert baseline.sample.shape == (8, 1, 16, 16)  # one clip = 8 frames, scored as images
    assert set(baseline.metrics) == {"temporal_psnr_db", "motion_accuracy"}
    for row in report.rows:
        assert row.status == "ok", row.error
        m = row.measured
        assert m["steps_total"] == STEPS and m["blocks_total"] == STEPS * LAYERS
        assert m["psnr_db"] > 20 and 0 < m["ssim"] <= 1 and 0 <= m["agreement"] <= 1
        assert set(m["workload_metrics"]) == {"temporal_psnr_db", "motion_accuracy"}
    cached = report.rows[1].measured  # taylorseer n=2 caches every other step after the first
    assert cached["steps_cached"] > 0 and math.isfinite(cached["psnr_db"])


def test_video_report_json_and_markdown(report, tmp_path):
    data = json.loads(write_json(report, tmp_path / "bench.json").read_text())
    assert data["baselines"][0]["workload_metrics"]["motion_accuracy"] is not None
    assert all(row["workload_metrics"] is not None for row in data["rows"])
    table = markdown(report)
    assert "| temporal PSNR | motion | note |" in table and "Temporal PSNR:" in table


def test_image_rows_have_no_workload_metrics_column():
    from phyai_cache_lab.bench.runner import Baseline, BenchReport

    plain = BenchReport(BenchOptions(), [Baseline(4, {}, 0.1, 1.0)], [], [], {})
    assert "temporal PSNR" not in markdown(plain)


def test_model_names():
    assert MODELS == ("reference", "video") and workload_factory("video") is video_workload
    with pytest.raises(ValueError, match="unknown bench model"):
        workload_factory("nope")


def test_cli_bench_model_video(tmp_path, capsys):
    code = main(["bench", "--model", "video", "--quick", "--backends", "native", "--strategies", "taylorseer",
                 "--steps", str(STEPS), "--batch-size", "1", "--no-figures", "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "bench: video reference" in printed and "temporal PSNR" in printed
    data = json.loads((tmp_path / "bench.json").read_text())
    assert "--model video" in data["command"] and "WanPipeline" in data["baselines"][0]["workload"]["model"]
