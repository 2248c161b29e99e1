"""phyai's own collectives: the cache on phyai's real ``wn`` Cosmos3 scheduler over 2 gloo ranks.

Each rank initialises ``phyai.parallel`` over gloo with ``cfg=2`` (phyai's mesh ``dp, cfg, ep, sp,
cp, tp``), builds phyai's real tiny Cosmos3 and runs phyai's unmodified
``Cosmos3T2VWNScheduler``: cfg rank 0 computes the cond branch, cfg rank 1 the uncond one, and the
scheduler all-gathers both velocities every step through ``phyai.parallel``. The cache is the
native fbcache on the transformer's ``gen_layers``, given phyai's groups by
``phyai_collectives.cache_groups()``, attached to the scheduler with
``phyai_cache.integrations.phyai.attach`` (the engine default shares CFG decisions; a request's own
``dit_cache`` asks for separate CFG), and once enabled on the transformer alone. The one-process
reference is phyai's ``ws1`` scheduler in this process, attached the same way.

Checked: with shared CFG both ranks take the leader's (cond) decisions, which equal the one-process
decisions; with separate CFG each rank's decisions equal the one-process decisions of its branch; each rank's
calls are counted in the runner's branch;
threshold 0 is bit-identical to the uncached ``wn`` run; every cache collective went through
``phyai.parallel`` (counted at its backend) and none through ``torch.distributed`` directly; a rank
that raises leaves its peer a ``DistributedCacheError``, not a hang. Nothing is mocked but the two
GPU kernels ``phyai_cache_lab.testing.phyai`` stands in for.
"""

from __future__ import annotations

import collections
import copy
import re

import pytest
import torch

from phyai_cache import DiTCacheConfigError, enable_dit_cache
from phyai_cache.distributed import Communicator

STEPS = 12
CONFIG = dict(enabled=True, backend="native", strategy="fbcache", threshold=0.01)
BLOCKS = "gen_layers"
FAILING_STEP = 3


def _records(stats, branch=None):
    """(step, decision, reason, statistic) of a run's calls, of one branch or all (a rank runs one)."""
    return [(r.step, r.decision, r.reason, r.diff) for r in stats.records if branch in (None, r.branch)]


class CollectiveCounter:
    """Counts the collectives phyai.parallel's backends execute, and torch.distributed calls made
    outside them (what the cache would issue if it bypassed phyai)."""

    def __init__(self) -> None:
        import phyai.parallel as parallel
        import torch.distributed as dist

        self.phyai = collections.Counter()
        self.direct = collections.Counter()
        self._inside = False
        for backend in parallel.get_dispatcher().registry.all():
            backend.execute = self._phyai_op(backend.execute)
        for name in ("all_reduce", "broadcast", "all_gather"):
            setattr(dist, name, self._torch_op(name, getattr(dist, name)))

    def _phyai_op(self, execute):
        def counted(*, op, **kwargs):
            self.phyai[op.value] += 1
            self._inside = True
            try:
                return execute(op=op, **kwargs)
            finally:
                self._inside = False

        return counted

    def _torch_op(self, name, function):
        def counted(*args, **kwargs):
            if not self._inside:
                self.direct[name] += 1
            return function(*args, **kwargs)

        return counted

    def snapshot(self):
        return dict(self.phyai), dict(self.direct)


def wn_worker(rank, world_size):
    from phyai_cache.integrations.phyai import attach
    from phyai_cache.integrations.phyai_collectives import cache_groups
    from phyai_cache_lab.testing import phyai
    from phyai_cache_lab.testing.distributed import attempt

    phyai.init_gloo_mesh(cfg=2)
    tiny = phyai.build_tiny_cosmos3()
    scheduler = phyai.cosmos3_wn_scheduler(tiny)
    request = phyai.cosmos3_request(tiny, steps=STEPS)
    counter = CollectiveCounter()
    groups = cache_groups()
    out = {"rank": rank, "groups": {name: (type(g).__name__, g.ranks) if g else None for name, g in groups.items()},
           "uncached": scheduler.step(request)}

    def generate(handle, run):
        layout = handle._lifecycle.target.parallel
        (phyai_before, direct_before), collectives = counter.snapshot(), layout.collectives
        output = run()
        phyai_after, direct_after = counter.snapshot()
        return {"output": output, "records": _records(handle.last_run), "branches": handle.last_run.branches,
                "collectives": layout.collectives - collectives,
                "phyai_ops": {op: n - phyai_before.get(op, 0) for op, n in phyai_after.items()},
                "direct_ops": {op: n - direct_before.get(op, 0) for op, n in direct_after.items()}}

    # phyai's way in: attach to the scheduler with phyai's groups; the engine default shares CFG
    # decisions, a request asks for separate CFG with its own dit_cache.
    cache = attach(scheduler, CONFIG, blocks=BLOCKS, separate_cfg=False, **groups)
    out["described"] = cache.handle.describe()["plan"]["parallel"]
    out["shared"] = generate(cache.handle, lambda: scheduler.step(request))
    separate = copy.copy(request)
    separate.dit_cache = {**CONFIG, "separate_cfg": True}
    out["separate"] = generate(cache.handle, lambda: scheduler.step(separate))
    cache.detach()

    # The cache on the transformer alone, one run scope around the scheduler's step.
    handle = enable_dit_cache(tiny.transformer, CONFIG, blocks=BLOCKS, threshold=0.0, separate_cfg=False, **groups)

    def scoped():
        with handle.run(num_inference_steps=STEPS):
            return scheduler.step(request)

    out["threshold0"] = generate(handle, scoped)
    handle.disable()

    # Last (the cfg axis is the world group, which a failed collective leaves unusable): rank 1
    # raises before its step-3 call and returns; rank 0, the CFG leader, waits in its step-3
    # decision broadcast.
    cache = attach(scheduler, CONFIG, blocks=BLOCKS, separate_cfg=False, **groups)
    layout = cache.handle._lifecycle.target.parallel
    if rank == 1:
        calls = {"n": 0}

        def fail_at_step(module, args):
            calls["n"] += 1
            if calls["n"] == FAILING_STEP + 1:
                raise RuntimeError("injected failure")

        tiny.transformer.register_forward_pre_hook(fail_at_step)
    out["failure"] = attempt(lambda: scheduler.step(request))
    if rank == 0:
        collectives = layout.collectives
        out["next_run"] = attempt(lambda: scheduler.step(request))
        out["next_run_collectives"] = layout.collectives - collectives
    return out


@pytest.fixture(scope="module")
def ranks():
    from phyai_cache_lab.testing.distributed import run_ranks

    return run_ranks(wn_worker, 2, deadline_s=300, group_timeout_s=30)


@pytest.fixture(scope="module")
def solo():
    """phyai's one-process ``ws1`` scheduler (cond then uncond per step), attached the same way."""
    from phyai_cache.integrations.phyai import attach
    from phyai_cache_lab.testing import phyai

    tiny = phyai.build_tiny_cosmos3()
    scheduler = phyai.cosmos3_scheduler(tiny)
    request = phyai.cosmos3_request(tiny, steps=STEPS)
    results = {}
    for mode, separate in (("shared", False), ("separate", True)):
        with attach(scheduler, CONFIG, blocks=BLOCKS, separate_cfg=separate) as cache:
            output = scheduler.step(request)
        results[mode] = {"output": output, "cond": _records(cache.last_run, "cond"),
                         "uncond": _records(cache.last_run, "uncond")}
    return results


def _same_decisions(got, expected):
    assert [r[:3] for r in got] == [r[:3] for r in expected]
    assert [r[3] for r in got] == [None if r[3] is None else pytest.approx(r[3], rel=1e-4) for r in expected]


@pytest.mark.slow
def test_cache_groups_from_phyai_mesh(ranks):
    for rank in ranks:  # model axes sp, cp, tp all have size 1: nothing to reduce
        assert rank["groups"] == {"process_group": None, "cfg_group": ("PhyaiCommunicator", (0, 1))}
        assert rank["described"]["communicators"] == ["phyai.parallel mesh 'model' axes ['cfg']"]
        assert rank["described"]["cfg_ranks"] == [0, 1] and rank["described"]["group_ranks"] == [rank["rank"]]


@pytest.mark.slow
def test_shared_cfg_both_ranks_take_the_cond_ranks_decisions(ranks, solo):
    leader, follower = ranks[0]["shared"]["records"], ranks[1]["shared"]["records"]
    _same_decisions(leader, solo["shared"]["cond"])
    assert [r[1] for r in follower] == [r[1] for r in leader]
    assert [r[2] for r in follower] == [r[2].replace("follows_cond", "follows_cfg_leader")
                                        for r in solo["shared"]["uncond"]]
    assert all(r[3] is None for r in follower)  # the follower measures nothing
    assert {"cached", "computed"} <= {r[1] for r in leader}, "the threshold must both cache and compute"
    for rank, branch in zip(ranks, ("cond", "uncond")):
        assert rank["shared"]["branches"] == rank["separate"]["branches"] == [branch]  # the runner's branch
        assert rank["shared"]["collectives"] == STEPS  # one decision exchange per step
        assert torch.allclose(rank["shared"]["output"], solo["shared"]["output"], atol=1e-5)


@pytest.mark.slow
def test_separate_cfg_each_rank_decides_its_own_branch_as_one_process_does(ranks, solo):
    for rank, branch in zip(ranks, ("cond", "uncond")):
        _same_decisions(rank["separate"]["records"], solo["separate"][branch])
        assert rank["separate"]["collectives"] == 0  # nothing crosses the CFG axis
        assert torch.allclose(rank["separate"]["output"], solo["separate"]["output"], atol=1e-5)
    cond, uncond = (rank["separate"]["records"] for rank in ranks)
    assert [r[1] for r in cond] != [r[1] for r in uncond], "the branches must disagree somewhere to mean anything"


@pytest.mark.slow
def test_threshold_zero_is_bit_identical_to_the_uncached_wn_run(ranks):
    for rank in ranks:
        assert torch.equal(rank["threshold0"]["output"], rank["uncached"])
        assert {r[1] for r in rank["threshold0"]["records"]} == {"computed"}
    assert torch.equal(ranks[0]["uncached"], ranks[1]["uncached"])  # phyai's combine: same latents on both ranks


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["threshold0", "shared", "separate"])
def test_cache_collectives_go_through_phyai_parallel(ranks, mode):
    for rank in ranks:
        run = rank[mode]
        assert not any(run["direct_ops"].values())  # nothing went around phyai
        # phyai's all-gather is the scheduler's own (one per step); every all-reduce is the cache's.
        assert run["phyai_ops"].get("all_gather") == STEPS
        assert run["phyai_ops"].get("all_reduce", 0) == run["collectives"]


@pytest.mark.slow
def test_a_rank_that_raises_leaves_its_peer_an_error_not_a_hang(ranks):
    assert ranks[1]["failure"] == ("RuntimeError", "injected failure")
    kind, message = ranks[0]["failure"]
    assert kind == "DistributedCacheError"
    assert "CFG decision broadcast over ranks [0, 1] (phyai.parallel mesh 'model' axes ['cfg'])" in message
    assert f"step {FAILING_STEP}" in message and "on rank 0" in message
    kind, message = ranks[0]["next_run"]
    assert kind == "DistributedCacheError" and "an earlier cache collective on this layout failed" in message
    assert ranks[0]["next_run_collectives"] == 0  # refused before issuing any collective


# -- in one process: the arguments ------------------------------------------------------------------


@pytest.fixture(scope="module")
def phyai_mesh():
    from phyai_cache_lab.testing import phyai

    return phyai.build_tiny_cosmos3()  # phyai's parallel state for a world of one, and a model


def test_on_a_world_of_one_every_axis_has_size_one_and_nothing_is_exchanged(phyai_mesh):
    from phyai_cache.integrations.phyai_collectives import cache_groups

    groups = cache_groups()
    assert groups == {"process_group": None, "cfg_group": None}
    handle = enable_dit_cache(phyai_mesh.transformer, CONFIG, blocks=BLOCKS, **groups)
    assert handle._lifecycle.target.parallel is None
    handle.disable()


@pytest.mark.parametrize("arguments, field, value", [
    ({"model_axes": ("sp", "pp")}, "model_axes", "'pp'"),
    ({"model_axes": ("dp", "tp")}, "model_axes", "'dp'"),
    ({"model_axes": ("tp", "tp")}, "model_axes", "['tp', 'tp']"),
    ({"model_axes": ("cfg", "tp")}, "cfg_axis", "'cfg'"),
    ({"cfg_axis": "cfgs"}, "cfg_axis", "'cfgs'"),
    ({"mesh": "draft"}, "mesh", "'draft'"),
])
def test_bad_axes_are_refused_naming_the_argument(phyai_mesh, arguments, field, value):
    from phyai_cache.integrations.phyai_collectives import cache_groups

    with pytest.raises(DiTCacheConfigError, match=rf"dit_cache\.{field}: got {re.escape(value)}") as error:
        cache_groups(**arguments)
    assert error.value.field == field


class ElsewhereCommunicator(Communicator):
    """A communicator whose members do not include this process (a caller's mistake)."""

    name, rank, ranks = "ranks 1 and 2", 0, (1, 2)

    def all_reduce_sum(self, tensor):
        raise AssertionError("never called")

    broadcast_first = all_reduce_sum


def test_a_communicator_without_this_rank_is_refused_before_anything_changes(phyai_mesh):
    transformer = phyai_mesh.transformer
    before = dict(transformer.__dict__)
    for argument in ("process_group", "cfg_group"):
        with pytest.raises(DiTCacheConfigError, match=rf"dit_cache\.{argument}.*a group containing this rank \(0\)"):
            enable_dit_cache(transformer, CONFIG, blocks=BLOCKS, **{argument: ElsewhereCommunicator()})
    assert transformer.__dict__ == before
