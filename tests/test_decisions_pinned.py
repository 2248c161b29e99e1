"""Refactors of the decision path must not change a single decision of a shipped preset.

The pinned file was recorded before the decision logic moved into phyai_cache/decision.py; a
fresh recording must match it decision for decision and reason for reason, with measured diffs
equal to 1e-4 relative (they are float32 means on the same inputs). A preset added later is pinned
when it is added: its entries are appended, the older entries are never rewritten.
"""

from __future__ import annotations

import json

import pytest
from preset_decisions import PINNED, record


@pytest.mark.slow
def test_every_shipped_preset_takes_the_pinned_decisions():
    pinned = json.loads(PINNED.read_text())
    fresh = record()
    assert set(fresh) == set(pinned)
    for key, rows in pinned.items():
        got = fresh[key]
        assert [r[:4] for r in got] == [r[:4] for r in rows], key
        for mine, theirs in zip(got, rows):
            if theirs[4] is None:
                assert mine[4] is None, (key, mine)
            else:
                assert mine[4] == pytest.approx(theirs[4], rel=1e-4, abs=1e-6), (key, mine)
