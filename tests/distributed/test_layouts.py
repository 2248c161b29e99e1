"""Four gloo ranks: data-parallel replicas of a sequence-parallel model, and sequence x CFG parallel.

The model is the toy DiT with token-wise blocks (:class:`~phyai_cache_lab.testing.distributed.TokenwiseDiT`):
sharding its tokens over ranks computes exactly the rows the whole model computes, so a
sequence-parallel layout needs no distributed attention. Groups come from ``dist.new_group``.

* 2 data-parallel replicas x 2 sequence-parallel ranks, a different generation per replica: the
  statistic is reduced over the replica's own pair only, so decisions agree within a replica, equal
  the one-process run of that replica's inputs, and differ across replicas where the inputs do.
* 2 sequence-parallel ranks x 2 CFG ranks (cond on ranks 0-1, uncond on ranks 2-3).
* what is refused on such layouts, before the model is touched.
"""

from __future__ import annotations

import pytest
import torch

from phyai_cache import enable_dit_cache
from phyai_cache_lab.testing.distributed import build_tokenwise_dit, denoise_cfg, denoise_sharded, inputs, run_ranks

pytestmark = pytest.mark.slow

STEPS, GUIDANCE, TOKENS = 10, 3.0, 32
CONFIG = dict(enabled=True, backend="native", strategy="fbcache", threshold=0.15, warmup_steps=1)


def _records(handle):
    return [(r.step, r.branch, r.decision, r.reason, r.diff) for r in handle.last_run.records]


def _replica(seed, group=None, shard=(0, 1)):
    model = build_tokenwise_dit()
    x, cond = inputs(model, tokens=TOKENS, seed=seed)
    handle = enable_dit_cache(model, blocks="layers", process_group=group, **CONFIG)
    output = denoise_sharded(model, x, cond, steps=STEPS, handle=handle, shard=shard)
    return {"output": output, "records": _records(handle)}


def _cfg(separate_cfg, group=None, cfg_group=None, shard=(0, 1)):
    model = build_tokenwise_dit()
    x, cond = inputs(model, tokens=TOKENS, seed=5)
    handle = enable_dit_cache(model, blocks="layers", process_group=group, cfg_group=cfg_group,
                              separate_cfg=separate_cfg, **CONFIG)
    output = denoise_cfg(model, x, cond, steps=STEPS, guidance=GUIDANCE, handle=handle, cfg_group=cfg_group,
                         shard=shard)
    layout = handle._lifecycle.target.parallel
    return {"output": output, "records": _records(handle), "collectives": layout.collectives if layout else 0}


def layouts_worker(rank, world_size):
    import torch.distributed as dist
    from snapshots import target_fingerprint

    # Every rank creates every group, in the same order (torch.distributed requires it).
    sequence = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    cfg = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    pair, position = rank // 2, rank % 2
    out = {
        "replica": _replica(seed=pair, group=sequence[pair], shard=(position, 2)),
        **{f"cfg_{mode}": _cfg(separate, sequence[pair], cfg[position], shard=(position, 2))
           for mode, separate in (("shared", False), ("separate", True))},
    }
    model = build_tokenwise_dit()
    before = target_fingerprint(model)
    refusals = {}
    for label, kwargs in {
        "cache_dit_replica": dict(backend="cache_dit", process_group=sequence[pair]),
        "cache_dit_unsharded": dict(backend="cache_dit"),
        "cache_dit_cfg": dict(backend="cache_dit", cfg_group=cfg[position]),
        "diffusers": dict(backend="diffusers", process_group=sequence[pair]),
        "cfg_overlaps_model_group": dict(process_group=sequence[pair], cfg_group=sequence[pair]),
        "not_a_member": dict(process_group=sequence[1 - pair]),
        "not_a_group": dict(process_group=[0, 1]),
    }.items():
        try:
            enable_dit_cache(model, blocks="layers", **{**CONFIG, **kwargs})
            refusals[label] = None
        except Exception as error:  # noqa: BLE001 - the test asserts on the type and message
            refusals[label] = (type(error).__name__, str(error))
    out["refusals"] = refusals
    out["untouched"] = target_fingerprint(model) == before
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(layouts_worker, 4, deadline_s=180)


@pytest.fixture(scope="module")
def solo():
    return {"replica": [_replica(seed) for seed in (0, 1)],
            "cfg_shared": _cfg(False), "cfg_separate": _cfg(True)}


def _well_posed(records):
    """Every measured value is far from the threshold (so float summation order cannot flip a decision)."""
    assert min(abs(r[4] - CONFIG["threshold"]) for r in records if r[4] is not None) > 1e-3


def _same_decisions(got, expected):
    assert [r[:4] for r in got] == [r[:4] for r in expected]
    assert [r[4] is None for r in got] == [r[4] is None for r in expected]
    assert [r[4] for r in got if r[4] is not None] == pytest.approx([r[4] for r in expected if r[4] is not None],
                                                                    rel=1e-5)


def test_replicas_agree_inside_and_differ_across(ranks, solo):
    expected = [replica["records"] for replica in solo["replica"]]
    assert [r[2] for r in expected[0]] != [r[2] for r in expected[1]], "the two inputs must decide differently"
    for records in expected:
        _well_posed(records)
    for pair in (0, 1):
        first, second = ranks[2 * pair]["replica"], ranks[2 * pair + 1]["replica"]
        assert first["records"] == second["records"]  # bit-identical within the replica
        _same_decisions(first["records"], expected[pair])
        whole = torch.cat([first["output"], second["output"]], dim=1)
        assert torch.allclose(whole, solo["replica"][pair]["output"], atol=1e-6)


@pytest.mark.parametrize("mode", ["shared", "separate"])
def test_sequence_times_cfg_parallel(ranks, solo, mode):
    key = f"cfg_{mode}"
    expected = solo[key]["records"]
    _well_posed(expected)
    for rank, (branch, _position) in enumerate([("cond", 0), ("cond", 1), ("uncond", 0), ("uncond", 1)]):
        mine = ranks[rank][key]["records"]
        want = [r for r in expected if r[1] == branch]
        if mode == "shared" and branch == "uncond":
            want = [(*r[:3], r[3].replace("follows_cond", "follows_cfg_leader"), r[4]) for r in want]
        _same_decisions(mine, want)
    for pair in ((0, 1), (2, 3)):
        whole = torch.cat([ranks[r][key]["output"] for r in pair], dim=1)
        assert torch.allclose(whole, solo[key]["output"], atol=1e-6)
    decisions = {r[2] for r in expected}
    assert decisions == {"cached", "computed"}
    measured = sum(r[4] is not None for r in expected if r[1] == "cond")
    if mode == "shared":  # cond ranks: one reduction per measured step + one broadcast per step; uncond: the broadcasts
        assert [ranks[r][key]["collectives"] for r in range(4)] == [measured + STEPS] * 2 + [STEPS] * 2
    else:
        measured_uncond = sum(r[4] is not None for r in expected if r[1] == "uncond")
        assert [ranks[r][key]["collectives"] for r in range(4)] == [measured] * 2 + [measured_uncond] * 2


def test_refusals_on_multi_rank_layouts(ranks):
    for rank in ranks:
        refusals = rank["refusals"]
        for label, needle in (("cache_dit_replica", "of a 4-rank world"),
                              ("cache_dit_unsharded", "4 ranks and this model is not sharded"),
                              ("cache_dit_cfg", "average the cond and uncond")):
            kind, message = refusals[label]
            assert kind == "BackendUnavailableError" and needle in message
            assert "backend='native'" in message
        kind, message = refusals["diffusers"]
        assert kind == "BackendUnavailableError" and "never reduce across ranks" in message
        kind, message = refusals["cfg_overlaps_model_group"]
        assert kind == "DiTCacheConfigError" and "dit_cache.cfg_group" in message
        kind, message = refusals["not_a_member"]
        assert kind == "DiTCacheConfigError" and "dit_cache.process_group" in message
        kind, message = refusals["not_a_group"]
        assert kind == "DiTCacheConfigError" and "ProcessGroup" in message
        assert rank["untouched"]
