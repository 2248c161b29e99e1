"""``phyai-cache serve`` and ``phyai-cache bench-serving`` on tiny traces."""

from __future__ import annotations

import json

import pytest

from phyai_cache.cli import main


@pytest.mark.slow
def test_serve_prints_every_request_and_a_summary(capsys):
    assert main(["serve", "--requests", "4", "--steps", "4", "--rate", "100"]) == 0
    out = capsys.readouterr().out
    assert out.count("\nr00") == 4 and "transformer calls" in out and "row-blocks computed" in out


@pytest.mark.slow
def test_bench_serving_writes_json_markdown_and_a_figure(tmp_path, capsys):
    assert main(["bench-serving", "--requests", "6", "--steps", "4", "--rounds", "1", "--max-rows", "4",
                 "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "serving.json").read_text())
    assert set(data["summary"]["modes"]) == {"uncached", "per_batch", "per_row"}
    assert data["summary"]["per_row_decisions_identical_to_solo"] == 6
    assert (tmp_path / "serving.md").read_text().startswith("Trace: 6 requests")
    assert (tmp_path / "serving.png").stat().st_size > 0


def test_unknown_tier_is_refused_with_the_known_ones(capsys):
    with pytest.raises(SystemExit, match="known: uncached, quality, balanced, fast"):
        main(["serve", "--tiers", "fastest"])
