"""benchmarks/gpu_validate.py on CPU: its dry run exercises every section up to where CUDA is needed
(the stream capture itself is simulated), so a GPU session only has to run it."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_validate.py"
COMPILED = ("compiled_reference", "graphed_blocks_reference", "compiled_large")


@pytest.fixture(scope="module")
def gpu_validate():
    spec = importlib.util.spec_from_file_location("gpu_validate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is imported
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def _report(out: Path) -> dict:
    assert (out / "report.md").read_text().startswith("# gpu_validate report")
    return json.loads((out / "report.json").read_text())


def _assert_all_ran_and_passed(report: dict, sections: list[str]) -> None:
    for name in sections:
        section = report["sections"][name]
        assert section["status"] == "ok", (name, section.get("traceback"))
    failed = [check for check in report["checks"] if not check["passed"]]
    assert not failed, failed


def test_dry_run_runs_every_section_and_every_check_passes(gpu_validate, tmp_path):
    assert gpu_validate.main(["--dry-run", "--out", str(tmp_path), "--skip", *COMPILED]) == 0
    report = _report(tmp_path)
    _assert_all_ran_and_passed(report, [name for name in gpu_validate.SECTIONS if name not in COMPILED])
    names = " ".join(check["name"] for check in report["checks"])
    for expected in ("guard: cached transformer call captured inside a run is refused",
                     "guard: cached pipeline call captured whole is refused",
                     "host syncs: taylorseer-balanced adds at most 0", "memory:", "cuda graph (large)",
                     "phyai graphs: one capture per branch", "phyai graphs: no forecast aliases"):
        assert expected in names
    guard = report["sections"]["guard"]["result"]
    assert guard["simulated_capture"] and "capture only uncached calls" in guard["pipeline_call"]["message"]
    assert report["sections"]["reference_eager"]["result"]["configs"]  # at least one preset was compared


@pytest.mark.slow
def test_dry_run_compiled_sections(gpu_validate, tmp_path):
    """On CPU graphed_blocks_reference is compiled_reference (eager backend): not run twice here."""
    run = ("compiled_reference", "compiled_large")
    others = [name for name in gpu_validate.SECTIONS if name not in (*run, "environment")]
    assert gpu_validate.main(["--dry-run", "--out", str(tmp_path), "--skip", *others]) == 0
    report = _report(tmp_path)
    _assert_all_ran_and_passed(report, list(run))
    compiled = report["sections"]["compiled_reference"]["result"]
    assert compiled["fbcache-balanced"]["decisions_equal_eager"]


def test_without_cuda_it_says_so_and_exits_2(gpu_validate, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert gpu_validate.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--dry-run" in err
    assert not (tmp_path / "report.json").exists()


def test_a_failing_section_is_recorded_and_the_others_still_run(gpu_validate, tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("boom")

    monkeypatch.setitem(gpu_validate.SECTIONS, "host_syncs", broken)
    keep = ("environment", "host_syncs", "memory")
    assert gpu_validate.main(["--dry-run", "--out", str(tmp_path), "--skip",
                              *[name for name in gpu_validate.SECTIONS if name not in keep]]) == 1
    sections = _report(tmp_path)["sections"]
    assert sections["host_syncs"]["status"] == "error" and "RuntimeError: boom" in sections["host_syncs"]["error"]
    assert sections["memory"]["status"] == "ok" and sections["compiled_large"]["status"] == "skipped"


def test_every_section_is_documented(gpu_validate):
    text = (ROOT / "docs" / "gpu.md").read_text()
    for name in gpu_validate.SECTIONS:
        assert name == "environment" or f"`{name}`" in text, name
    assert "docs/gpu.md" in (ROOT / "README.md").read_text()
