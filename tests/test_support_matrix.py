"""The family x backend x strategy matrix over every DiT transformer class of the installed diffusers,
and the support table generated from it (docs/support.md).

The matrix runs once per session (about 40 s on one CPU thread); every test here reads it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import phyai_cache_lab.testing.families as families
from phyai_cache import DiTCacheConfigError, enable_dit_cache
from phyai_cache_lab.testing.families import FAILED, REFUSED, SERVED, family, run_family, run_matrix
from phyai_cache_lab.testing.support_table import installed_versions, render

SUPPORT_MD = Path(__file__).resolve().parents[1] / "docs" / "support.md"

# Enabling succeeds but the run is wrong, today. Each entry is an open finding (docs/support.md lists
# them): the test fails when one disappears (update this table and the docs) or a new one appears.
KNOWN_FINDINGS: dict[tuple[str, str, str], str] = {
    # None today: every earlier finding is now served or refused at enable time (see the git log).
}


@pytest.fixture(scope="module")
def matrix():
    return run_matrix()


def test_every_transformer_class_diffusers_exports_is_classified():
    """A newer diffusers adds classes: they must be added as a family, or listed with the reason."""
    assert families.unlisted_classes() == []
    listed = [f.model_class for f in families.FAMILIES] + [u.model_class for u in (*families.NOT_BUILT,
                                                                                   *families.NOT_DIT)]
    assert len(listed) == len(set(listed))
    assert set(listed) == set(families.exported_transformer_classes())
    assert len({f.name for f in families.FAMILIES}) == len(families.FAMILIES)


def test_every_family_builds_and_runs(matrix):
    assert matrix.unbuildable == []
    assert {c.family for c in matrix.cells} == {f.name for f in families.FAMILIES}
    assert len(matrix.cells) == len(families.FAMILIES) * len(matrix.combos)


def test_nothing_fails_at_run_time_except_the_known_findings(matrix):
    failed = {(c.family, c.backend, c.strategy): c.reason for c in matrix.cells if c.status == FAILED}
    assert set(failed) == set(KNOWN_FINDINGS), {k: failed.get(k) for k in set(failed) ^ set(KNOWN_FINDINGS)}
    for key, expected in KNOWN_FINDINGS.items():
        assert expected in failed[key], (key, failed[key])


def test_refusals_name_the_setting_and_what_is_allowed(matrix):
    refused = [c for c in matrix.cells if c.status == REFUSED]
    assert refused
    for cell in refused:
        assert re.match(r"(DiTCacheConfigError: dit_cache\.\S+: got .+; allowed: .+|BackendUnavailableError: .+)",
                        cell.reason), cell
        assert cell.short_reason and cell.family not in cell.short_reason


def test_the_native_engine_serves_every_family_it_does_not_refuse_for_a_reason(matrix):
    """Native refuses only the models that run their own code between blocks (known_blocks.py)."""
    for strategy in ("fbcache", "dbcache", "taylorseer"):
        cells = [c for c in matrix.cells if (c.backend, c.strategy) == ("native", strategy)]
        refused = {c.family for c in cells if c.status == REFUSED}
        assert refused == {"consisid", "latte", "wan-animate", "wan-vace"}, strategy
        assert all(c.status == SERVED for c in cells if c.family not in refused)
    for name in ("qwenimage21", "cosmos3"):  # phyai's own models
        assert all(matrix.cell(name, "native", s).status == SERVED for s in ("fbcache", "dbcache", "taylorseer"))


def test_served_cells_cached_steps_in_both_branches(matrix):
    for cell in matrix.cells:
        if cell.status == SERVED and cell.strategy == "textkv":  # exact: reuses text K/V, never caches a step
            assert cell.steps_total == 2 * families.STEPS and cell.steps_cached == 0, cell
        elif cell.status == SERVED:
            assert cell.steps_total == 2 * families.STEPS and 0 < cell.steps_cached < cell.steps_total, cell


# -- the checks of the matrix catch what they claim to catch ---------------------------------------


def test_a_refusal_that_changes_the_model_is_reported_as_a_failure(monkeypatch):
    def enable_that_leaves_a_hook(transformer, **kwargs):
        transformer.register_forward_pre_hook(lambda module, args: None)
        raise DiTCacheConfigError("strategy", "fbcache", "anything else")

    monkeypatch.setattr("phyai_cache.enable_dit_cache", enable_that_leaves_a_hook)
    cells = run_family(family("flux"), [("native", "fbcache")])
    assert cells[0].status == FAILED and "the model was changed" in cells[0].reason


# -- docs/support.md ------------------------------------------------------------------------------


def test_the_committed_support_table_is_up_to_date(matrix):
    committed = SUPPORT_MD.read_text()
    versions = ", ".join(f"{name} {value}" for name, value in installed_versions().items())
    if f"Measured on {versions}," not in committed:
        pytest.skip(f"docs/support.md was measured on other versions than the installed {versions}")
    assert render(matrix) == committed, "docs/support.md is stale: run `phyai-cache support --write docs/support.md`"


def test_the_table_lists_every_family_and_every_finding(matrix):
    text = render(matrix)
    for fam in families.FAMILIES:
        assert f"| {fam.name} | `{fam.model_class}` |" in text
    for unlisted in (*families.NOT_BUILT, *families.NOT_DIT):
        assert f"`{unlisted.model_class}`: {unlisted.reason}" in text
    assert len(re.findall(r"\| \*\*FAILED \(F\d+\)\*\*", text)) == len(KNOWN_FINDINGS)
    assert not re.search(r"0x[0-9a-f]{6,}|\d+\.\d+ ?(ms|s)\b", text)  # no addresses, no timings


def test_cli_check_reports_a_stale_table(tmp_path, monkeypatch, matrix):
    from phyai_cache.cli import main

    monkeypatch.setattr(families, "run_matrix", lambda: matrix)
    path = tmp_path / "support.md"
    assert main(["support", "--write", str(path)]) == 0
    assert main(["support", "--check", str(path)]) == 0
    path.write_text(path.read_text().replace("served", "refused", 1))
    assert main(["support", "--check", str(path)]) == 1


def test_refused_models_are_left_exactly_as_they_were():
    fam = family("sd3")
    transformer = fam.build()
    reference = families.denoise(fam, transformer)
    before = families.target_fingerprint(transformer)
    with pytest.raises(DiTCacheConfigError, match="CacheMixin"):
        enable_dit_cache(transformer, enabled=True, backend="diffusers", strategy="fbcache")
    assert families.target_fingerprint(transformer) == before
    assert all(torch.equal(a, b) for a, b in zip(families.denoise(fam, transformer), reference))
