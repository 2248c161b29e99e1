"""CFG parallel, phyai style: rank 0 runs the cond branch, rank 1 the uncond one (2 gloo ranks).

The loop (:func:`phyai_cache_lab.testing.distributed.denoise_cfg`) all-gathers both velocities and
combines them every step, so both ranks carry the same latents; without a CFG group the same
function runs both branches in one process, which is the reference.
"""

from __future__ import annotations

import pytest
import torch

from phyai_cache import enable_dit_cache
from phyai_cache_lab.testing.distributed import denoise_cfg, inputs, run_ranks
from phyai_cache_lab.testing.toy import build_toy_dit

pytestmark = pytest.mark.slow

STEPS, GUIDANCE = 12, 3.0
CONFIG = dict(enabled=True, backend="native", strategy="fbcache", threshold=0.17, warmup_steps=2)
MODES = {"shared": False, "separate": True}


def _generate(separate_cfg, cfg_group=None):
    model = build_toy_dit()
    x, cond = inputs(model, tokens=16, seed=3)
    handle = enable_dit_cache(model, blocks="layers", cfg_group=cfg_group, separate_cfg=separate_cfg, **CONFIG)
    output = denoise_cfg(model, x, cond, steps=STEPS, guidance=GUIDANCE, handle=handle, cfg_group=cfg_group)
    layout = handle._lifecycle.target.parallel
    records = [(r.step, r.branch, r.decision, r.reason, r.diff) for r in handle.last_run.records]
    return {"output": output, "records": records, "collectives": layout.collectives if layout else 0}


def cfg_worker(rank, world_size):
    import torch.distributed as dist

    return {mode: _generate(separate, dist.group.WORLD) for mode, separate in MODES.items()}


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(cfg_worker, 2, deadline_s=120)


@pytest.fixture(scope="module")
def solo():
    return {mode: _generate(separate) for mode, separate in MODES.items()}


def _branch(records, name):
    return [r for r in records if r[1] == name]


@pytest.mark.parametrize("mode", MODES)
def test_outputs_equal_the_one_process_cfg_loop(ranks, solo, mode):
    for rank in ranks:
        assert torch.allclose(rank[mode]["output"], solo[mode]["output"], atol=1e-6)


def test_shared_cfg_the_cond_rank_decides_and_the_uncond_rank_follows(ranks, solo):
    cond, uncond = ranks[0]["shared"]["records"], ranks[1]["shared"]["records"]
    assert {r[1] for r in cond} == {"cond"} and {r[1] for r in uncond} == {"uncond"}
    expected_cond = _branch(solo["shared"]["records"], "cond")
    expected_uncond = _branch(solo["shared"]["records"], "uncond")
    assert [r[:4] for r in cond] == [r[:4] for r in expected_cond]
    assert [r[4] for r in cond] == pytest.approx([r[4] for r in expected_cond])
    # The follower takes every decision of the leader rank and measures nothing; where it computes
    # because the leader did, it says so (one process names the leader branch: follows_cond).
    assert [r[2] for r in uncond] == [r[2] for r in cond]
    assert [r[3] for r in uncond] == [r[3].replace("follows_cond", "follows_cfg_leader") for r in expected_uncond]
    assert all(r[4] is None for r in uncond)
    assert "follows_cfg_leader" in {r[3] for r in uncond} and "cached" in {r[3] for r in uncond}
    # One broadcast per step on both ranks, nothing else (no model group: nothing to reduce).
    assert ranks[0]["shared"]["collectives"] == ranks[1]["shared"]["collectives"] == STEPS


def test_separate_cfg_each_rank_decides_its_own_branch(ranks, solo):
    for rank, branch in zip(ranks, ("cond", "uncond")):
        mine, expected = rank["separate"]["records"], _branch(solo["separate"]["records"], branch)
        assert [r[:4] for r in mine] == [r[:4] for r in expected]
        assert [r[4] for r in mine] == pytest.approx([r[4] for r in expected])
        assert rank["separate"]["collectives"] == 0  # nothing is exchanged across the CFG group
    cond, uncond = ranks[0]["separate"]["records"], ranks[1]["separate"]["records"]
    assert [r[2] for r in cond] != [r[2] for r in uncond], "the branches must disagree somewhere to mean anything"
