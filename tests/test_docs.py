"""The docs keep up with the code: every config field, strategy and preset is documented."""

from __future__ import annotations

from pathlib import Path

from phyai_cache import list_presets
from phyai_cache.config import BACKENDS, field_names
from phyai_cache.strategies import strategy_names

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_field_strategy_and_backend_is_in_the_reference():
    text = (ROOT / "docs" / "config-reference.md").read_text()
    for name in (*field_names(), *strategy_names(), *BACKENDS):
        assert f"`{name}`" in text, name


def test_readme_has_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert ".venv/bin/python -m pytest" in readme and ".venv/bin/python -m pytest" in ci
    assert "phyai-cache bench" in readme


def test_presets_say_what_they_trade():
    for name in list_presets():
        text = (ROOT / "configs" / f"{name}.yaml").read_text()
        assert "trades:" in text and "dit_cache:" in text
