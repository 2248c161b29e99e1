"""A rank that fails mid-run never leaves its peers blocked forever in a cache collective.

Two gloo ranks. The groups the cache uses are created with a 5 s timeout (``new_group(timeout=)``):
the cache's collectives wait at most that long. Scenarios, in order:

1. sequence parallel, rank 1 raises before its step-3 call and stays alive (a server that goes on):
   rank 0, waiting in the step-3 decision all-reduce, gets a ``DistributedCacheError`` naming its
   rank, the group and the step; its next run refuses at once instead of waiting again.
2. CFG parallel with shared decisions, the leader (rank 0) raises before step 3: the follower,
   waiting for the leader's decision, gets the error.
3. rank 1 is configured with a longer warmup: the ranks' first measured steps meet in one
   all-reduce, and both are told instead of mixing two steps' statistics.
4. rank 1's process dies at step 3: rank 0 gets the error.

The whole test is bounded by the spawn deadline; nothing here asserts on durations.
"""

from __future__ import annotations

import datetime
import os

import pytest

from phyai_cache import enable_dit_cache
from phyai_cache_lab.testing.distributed import (
    RankFailure,
    attempt,
    build_tokenwise_dit,
    denoise_cfg,
    denoise_sharded,
    inputs,
    run_ranks,
)

pytestmark = pytest.mark.slow

STEPS = 8
CONFIG = dict(enabled=True, backend="native", strategy="fbcache", threshold=0.15, warmup_steps=1)
FAILING_STEP = 3


class Injected(RuntimeError):
    """The failure a rank raises on purpose."""


def _fail_at(model, step, action):
    """Run ``action`` just before the model's ``step``-th call (before the cache sees the call)."""
    calls = {"n": 0}

    def hook(module, args):
        if calls["n"] == step:
            action()
        calls["n"] += 1

    return model.register_forward_pre_hook(hook)


def _raise():
    raise Injected("injected failure")


def failure_worker(rank, world_size):
    import torch.distributed as dist

    short = datetime.timedelta(seconds=5)
    groups = [dist.new_group([0, 1], timeout=short) for _ in range(3)]
    out = {}

    # 1. sequence parallel: rank 1 raises and goes on (reaches the barrier below, alive).
    model = build_tokenwise_dit()
    x, cond = inputs(model)
    handle = enable_dit_cache(model, blocks="layers", process_group=groups[0], **CONFIG)
    layout = handle._lifecycle.target.parallel
    if rank == 1:
        _fail_at(model, FAILING_STEP, _raise)
    run = lambda: denoise_sharded(model, x, cond, steps=STEPS, handle=handle, shard=(rank, 2))  # noqa: E731
    out["raises"] = attempt(run)
    out["raises_stats_completed"] = handle.last_run.completed
    if rank == 0:
        collectives = layout.collectives
        out["raises_next_run"] = attempt(run)
        out["next_run_collectives"] = layout.collectives - collectives
    dist.barrier()

    # 2. CFG parallel, shared decisions: the leader raises, the follower waits for its decision.
    model = build_tokenwise_dit()
    handle = enable_dit_cache(model, blocks="layers", cfg_group=groups[1], separate_cfg=False, **CONFIG)
    if rank == 0:
        _fail_at(model, FAILING_STEP, _raise)
    out["cfg"] = attempt(lambda: denoise_cfg(model, x, cond, steps=STEPS, guidance=2.0, handle=handle,
                                              cfg_group=groups[1]))
    dist.barrier()

    # 3. misconfigured ranks: rank 1 warms up one step longer, so the ranks' first measured steps
    # (1 on rank 0, 2 on rank 1) meet in the same all-reduce. Their tags disagree: both are told.
    model = build_tokenwise_dit()
    handle = enable_dit_cache(model, blocks="layers", process_group=groups[2], **{**CONFIG, "warmup_steps": 1 + rank})
    out["out_of_step"] = attempt(lambda: denoise_sharded(model, x, cond, steps=STEPS, handle=handle, shard=(rank, 2)))
    dist.barrier()
    return out


def dying_worker(rank, world_size):
    """3. sequence parallel: rank 1's process dies at step 3 (no result, no cleanup)."""
    import torch.distributed as dist

    group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=5))
    model = build_tokenwise_dit()
    x, cond = inputs(model)
    handle = enable_dit_cache(model, blocks="layers", process_group=group, **CONFIG)
    if rank == 1:
        _fail_at(model, FAILING_STEP, lambda: os._exit(3))
    return attempt(lambda: denoise_sharded(model, x, cond, steps=STEPS, handle=handle, shard=(rank, 2)))


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(failure_worker, 2, deadline_s=120)


def test_peer_raises_waiting_rank_gets_a_clear_error(ranks):
    assert ranks[1]["raises"][0] == "Injected"
    kind, message = ranks[0]["raises"]
    assert kind == "DistributedCacheError"
    assert "decision all-reduce over ranks [0, 1]" in message and f"step {FAILING_STEP}" in message
    assert "on rank 0" in message and "group timeout 5 s" in message
    assert "destroy the process group" in message and "enable the cache again" in message
    assert ranks[0]["raises_stats_completed"] is False  # the run that waited ended as raised, its state dropped


def test_after_a_failure_the_layout_refuses_at_once(ranks):
    kind, message = ranks[0]["raises_next_run"]
    assert kind == "DistributedCacheError" and "an earlier cache collective on this layout failed" in message
    assert ranks[0]["next_run_collectives"] == 0  # refused before issuing any collective


def test_cfg_follower_waiting_for_a_failed_leader_gets_a_clear_error(ranks):
    assert ranks[0]["cfg"][0] == "Injected"  # the leader raised before deciding step 3
    kind, message = ranks[1]["cfg"]
    assert kind == "DistributedCacheError"
    assert "CFG decision broadcast over ranks [0, 1]" in message and f"step {FAILING_STEP}" in message
    assert "on rank 1" in message


def test_ranks_at_different_decisions_are_told_not_mixed(ranks):
    for rank, step in ((0, 1), (1, 2)):
        kind, message = ranks[rank]["out_of_step"]
        assert kind == "DistributedCacheError"
        assert "met in the cache's decision all-reduce at different decision points" in message
        # the toy loop passes its timestep by position: its one call per step is branch call0
        assert f"step {step} of branch 'call0'" in message


def test_dead_peer_ends_the_wait_with_a_clear_error():
    with pytest.raises(RankFailure) as failure:
        run_ranks(dying_worker, 2, deadline_s=90)
    # Only the process that was killed on purpose has no result.
    assert set(failure.value.errors) == {1} and "exited with code 3" in failure.value.errors[1]
    kind, message = failure.value.results[0]
    assert kind == "DistributedCacheError" and f"step {FAILING_STEP}" in message
