"""Step-level batches (serving) on a sequence-parallel model: 2 gloo ranks, each with half the tokens.

Three requests with their own configs and CFG modes share every forward (tests/support/toy_serving.py's
loop). Every row group is decided on its own rows; on two ranks all groups' sums travel in ONE
all-reduce per forward, and every request takes the decisions it takes in one process.
"""

from __future__ import annotations

import pytest
import torch
from toy_serving import ToyJob, step_batch

from phyai_cache import enable_dit_cache
from phyai_cache_lab.testing.distributed import build_tokenwise_dit, run_ranks

pytestmark = pytest.mark.slow

THRESHOLD = 0.22
REQUESTS = [  # seed, guidance, separate_cfg
    (0, None, True),
    (1, 3.0, True),
    (2, 3.0, False),
]


def _serve(per_row, group=None, shard=(0, 1)):
    model = build_tokenwise_dit()
    handle = enable_dit_cache(model, blocks="layers", enabled=True, backend="native", threshold=0.0,
                              process_group=group)
    jobs = []
    for seed, guidance, separate in REQUESTS:
        request = handle.open_request(threshold=THRESHOLD, warmup_steps=1, separate_cfg=separate)
        job = ToyJob(request, seed, guidance)
        job.x = job.x.chunk(shard[1], dim=1)[shard[0]].clone()  # this rank's tokens
        jobs.append(job)
    forwards = 0
    while not all(job.done for job in jobs):
        step_batch(handle=handle, model=model, jobs=jobs, per_row=per_row)
        forwards += 1
    layout = handle._lifecycle.target.parallel
    out = {"outputs": [job.x for job in jobs], "forwards": forwards,
           "collectives": layout.collectives if layout else 0,
           "records": [[(r.step, r.branch, r.decision, r.reason, r.diff) for r in job.request.stats.records]
                       for job in jobs]}
    for job in jobs:
        job.request.close()
    return out


def serving_worker(rank, world_size):
    import torch.distributed as dist

    return {mode: _serve(per_row, dist.group.WORLD, (rank, world_size))
            for mode, per_row in (("per_row", True), ("per_batch", False))}


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(serving_worker, 2, deadline_s=120)


@pytest.fixture(scope="module")
def solo():
    return {mode: _serve(per_row) for mode, per_row in (("per_row", True), ("per_batch", False))}


@pytest.mark.parametrize("mode", ["per_row", "per_batch"])
def test_every_request_decides_as_in_one_process(ranks, solo, mode):
    assert ranks[0][mode]["records"] == ranks[1][mode]["records"]  # bit-identical on both ranks
    for got, want in zip(ranks[0][mode]["records"], solo[mode]["records"]):
        assert [r[:4] for r in got] == [r[:4] for r in want]
        measured = [(g[4], w[4]) for g, w in zip(got, want) if w[4] is not None]
        assert all(g == pytest.approx(w, rel=1e-5) and abs(w - THRESHOLD) > 1e-3 for g, w in measured)
    for request, (got_first, got_second) in enumerate(zip(ranks[0][mode]["outputs"], ranks[1][mode]["outputs"])):
        whole = torch.cat([got_first, got_second], dim=1)
        assert torch.allclose(whole, solo[mode]["outputs"][request], atol=1e-6)
    decisions = {r[2] for records in solo[mode]["records"] for r in records}
    assert decisions == {"cached", "computed"}


def test_one_collective_per_forward_that_measures(ranks, solo):
    records = solo["per_row"]["records"]
    # Forward i carries step i of every request; it reduces once if any of its row groups measured.
    steps = {r[0] for request in records for r in request if r[4] is not None}
    assert ranks[0]["per_row"]["collectives"] == ranks[1]["per_row"]["collectives"] == len(steps)
    assert len(steps) < ranks[0]["per_row"]["forwards"]  # warmup forwards reduce nothing
