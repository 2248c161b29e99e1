"""The phyai-cache command line."""

from __future__ import annotations

import json

import pytest
import yaml

from phyai_cache.cli import main


def test_backends_table_and_json(capsys):
    assert main(["backends"]) == 0
    assert "native" in capsys.readouterr().out
    assert main(["backends", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert any(b["name"] == "native" and b["strategies"]["fbcache"]["available"] for b in data)


def test_presets_and_show(capsys):
    assert main(["presets"]) == 0
    assert "fbcache-balanced" in capsys.readouterr().out
    assert main(["show", "fbcache-fast", "--set", "threshold=0.3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["threshold"] == 0.3 and shown["enabled"] is True


def test_validate_good_and_bad(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("pipeline: flux\ndit_cache:\n  enabled: true\n  threshold: 0.1\n")
    assert main(["validate", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("dit_cache:\n  enabled: true\n  strategy: fbcahce\n")
    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "dit_cache.strategy" in err and "did you mean 'fbcache'" in err


@pytest.mark.slow
def test_demo_on_tiny_pipeline(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main(["demo", "--model", "tiny", "--steps", "6", "--repeats", "1",
                 "--set", "threshold=10", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "steps cached" in text and "speedup" in text
    result = json.loads(out.read_text())
    assert result["stats"]["steps_cached"] > 0
    assert result["quality"]["psnr_db"] > 0


@pytest.mark.parametrize("command", [["demo"], ["bench"], ["tune", "--target-psnr", "40"],
                                     ["calibrate", "--strategy", "magcache"], ["serve"], ["bench-serving"]])
def test_every_command_refuses_a_thread_count_below_one(command, capsys):
    """``--threads`` is declared once (cli_options) for every command that takes it, and checked there."""
    with pytest.raises(SystemExit, match=r"--threads: got 0; allowed: an integer >= 1"):
        main([*command, "--threads", "0"])
