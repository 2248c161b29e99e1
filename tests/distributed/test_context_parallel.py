"""diffusers' own context parallelism (Ulysses) on a tiny Flux, 2 gloo ranks, with the native engine.

Real process groups, real diffusers context parallelism (``enable_parallelism`` with
``ContextParallelConfig(ulysses_degree=2)``: the transformer's split hooks shard the image and text
tokens over the ranks and every attention runs an all-to-all), real pipelines. The only thing
patched is ``torch.accelerator.device_count`` (diffusers divides by it; it is 0 on a CPU-only torch),
see :func:`phyai_cache_lab.testing.distributed.ulysses_flux`.

Ring attention does not run here: diffusers' ring needs the attention's log-sum-exp, which its
native (SDPA) CPU backend does not return, so only Ulysses is exercised on CPU.

One spawn runs every scenario (imports dominate: ~15 s per rank on a shared CPU); each test below
checks one property of the collected results against the same model run in this process.
"""

from __future__ import annotations

import pytest
import torch

from phyai_cache import enable_dit_cache
from phyai_cache_lab.testing import build_tiny_pipeline
from phyai_cache_lab.testing.distributed import run_ranks, ulysses_flux

pytestmark = pytest.mark.slow

STEPS = 8
BASE = dict(enabled=True, backend="native", warmup_steps=1)
# Thresholds where the tiny random Flux both caches and computes (its diffs are 0.21-0.55), and
# no measured value is within 1e-3 of the threshold: a float-order difference cannot flip a decision.
SCENARIOS = {
    "fbcache": dict(BASE, strategy="fbcache", threshold=0.3),
    "dbcache": dict(BASE, strategy="dbcache", front_blocks=1, back_blocks=1, threshold=0.5),
    "fbcache_taylorseer": dict(BASE, strategy="fbcache", threshold=0.5, taylorseer_order=1),
    "taylorseer": dict(BASE, strategy="taylorseer", cache_interval=2),
    "threshold0": dict(BASE, strategy="fbcache", threshold=0.0),
    "cfg_shared": dict(BASE, strategy="fbcache", threshold=0.5, separate_cfg=False),
}
# Cache-DiT's own multi-rank support (all-reduce over the world group, here exactly the model's group).
CACHE_DIT = dict(enabled=True, backend="cache_dit", strategy="fbcache", threshold=0.3, warmup_steps=1)
CFG_SCENARIOS = {"cfg_shared"}  # true CFG: both branches on every rank, decided once per step


def _records(handle):
    return [(r.step, r.branch, r.decision, r.reason, r.diff) for r in handle.last_run.records]


def _run(tiny, name, **call):
    return tiny.run(num_inference_steps=STEPS, cfg=name in CFG_SCENARIOS, **call)


def _front_block_residuals(tiny):
    """Record this rank's front-block residual (output - input of block 0) at every call."""
    residuals = []

    def hook(module, args, kwargs, output):
        hidden_in = kwargs.get("hidden_states", args[0] if args else None)
        hidden_out = output[1]  # FluxTransformerBlock returns (encoder_hidden_states, hidden_states)
        residuals.append((hidden_out - hidden_in).detach().clone())

    return tiny.transformer.transformer_blocks[0].register_forward_hook(hook, with_kwargs=True), residuals


def _local_diffs(residuals):
    from phyai_cache.decision import relative_l1

    return [relative_l1(residuals[i], residuals[i - 1]) for i in range(1, len(residuals))]


def cp_worker(rank, world_size):
    import torch.distributed as dist
    from snapshots import target_fingerprint

    from phyai_cache import disable_dit_cache

    tiny = ulysses_flux()
    out = {"uncached": tiny.run(num_inference_steps=STEPS),
           "uncached_cfg": tiny.run(num_inference_steps=STEPS, cfg=True)}
    for name, config in SCENARIOS.items():
        handle = enable_dit_cache(tiny.pipe, **config)
        layout = handle._lifecycle.target.parallel
        before = layout.collectives
        hook, residuals = _front_block_residuals(tiny) if name == "threshold0" else (None, [])
        output = _run(tiny, name)
        if hook is not None:
            hook.remove()
        out[name] = {"output": output, "records": _records(handle), "collectives": layout.collectives - before,
                     "parallel": handle.describe()["plan"]["parallel"]}
        if name == "threshold0":
            out[name]["local_diffs"] = _local_diffs(residuals)
            disable_dit_cache(tiny.pipe)
            out["after_disable"] = tiny.run(num_inference_steps=STEPS)
            continue
        if name == "fbcache":  # no pollution across runs: another prompt in between changes nothing
            _run(tiny, name, prompt_seed=1)
            out["fbcache_again"] = {"output": _run(tiny, name), "records": _records(handle)}
        disable_dit_cache(tiny.pipe)

    # Cache-DiT reduces by itself: count its all-reduces (it calls torch.distributed.all_reduce).
    calls = []
    all_reduce = dist.all_reduce
    dist.all_reduce = lambda *args, **kwargs: calls.append(1) or all_reduce(*args, **kwargs)
    try:
        handle = enable_dit_cache(tiny.pipe, **CACHE_DIT)
        out["cache_dit"] = {"output": _run(tiny, "cache_dit"), "records": _records(handle), "all_reduces": len(calls)}
        disable_dit_cache(tiny.pipe)
    finally:
        dist.all_reduce = all_reduce

    # The group passed explicitly (here: the model's own mesh group) gives the same decisions.
    mesh_group = tiny.transformer._parallel_config.context_parallel_config._flattened_mesh.get_group()
    handle = enable_dit_cache(tiny.pipe, process_group=mesh_group, **SCENARIOS["fbcache"])
    out["explicit"] = {"output": _run(tiny, "fbcache"), "records": _records(handle)}
    disable_dit_cache(tiny.pipe)

    # A group that misses a shard of the model is refused, and so is every diffusers hook strategy.
    refusals = {}
    before = target_fingerprint(tiny.pipe)
    lonely = [dist.new_group([r]) for r in range(world_size)][rank]
    for label, kwargs in {
        "missing_shard": dict(SCENARIOS["fbcache"], process_group=lonely),
        **{f"diffusers_{s}": dict(enabled=True, backend="diffusers", strategy=s)
           for s in ("fbcache", "magcache", "taylorseer", "pab", "fastercache")},
    }.items():
        try:
            enable_dit_cache(tiny.pipe, **kwargs)
            refusals[label] = None
        except Exception as error:  # noqa: BLE001 - the test asserts on the type and message
            refusals[label] = (type(error).__name__, str(error))
    out["refusals"] = refusals
    out["untouched"] = target_fingerprint(tiny.pipe) == before
    disabled = enable_dit_cache(tiny.pipe, enabled=False)  # disabled: an inactive handle, nothing touched
    out["disabled"] = (disabled.enabled, target_fingerprint(tiny.pipe) == before)

    # diffusers' tensor parallelism runs on CUDA/neuron/TPU only, so no TP-sharded model can exist
    # here: this records a set-up TensorParallelConfig (what enable_parallelism records) on an
    # unsharded transformer and checks which group the cache would reduce over.
    from diffusers import ParallelConfig, TensorParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    from phyai_cache.distributed import detect_model_group

    other = build_tiny_pipeline("flux").transformer
    config = ParallelConfig(tensor_parallel_config=TensorParallelConfig(tp_degree=2))
    config.setup(rank, world_size, torch.device("cpu"), mesh=init_device_mesh("cpu", (2,), mesh_dim_names=("tp",)))
    other._parallel_config = config
    group, source = detect_model_group(other)
    out["tensor_parallel"] = (dist.get_process_group_ranks(group), source)

    # Wan's context-parallel plan splits the sequence inside its first block ("blocks.0"), below the
    # cache's block wrapper: refused at enable time, the model untouched.
    from diffusers import ContextParallelConfig

    wan = build_tiny_pipeline("wan")
    wan.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    before = target_fingerprint(wan.pipe)
    try:
        enable_dit_cache(wan.pipe, **SCENARIOS["fbcache"])
        out["wan"] = None
    except Exception as error:  # noqa: BLE001 - the test asserts on the type and message
        out["wan"] = (type(error).__name__, str(error), target_fingerprint(wan.pipe) == before)
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(cp_worker, 2, deadline_s=240)


@pytest.fixture(scope="module")
def solo():
    """The same model and inputs in this one process, uncached and with every scenario."""
    from phyai_cache import disable_dit_cache

    tiny = build_tiny_pipeline("flux")
    out = {"uncached": tiny.run(num_inference_steps=STEPS),
           "uncached_cfg": tiny.run(num_inference_steps=STEPS, cfg=True)}
    for name, config in SCENARIOS.items():
        handle = enable_dit_cache(tiny.pipe, **config)
        out[name] = {"output": _run(tiny, name), "records": _records(handle)}
        disable_dit_cache(tiny.pipe)
    handle = enable_dit_cache(tiny.pipe, **CACHE_DIT)
    out["cache_dit"] = {"output": _run(tiny, "cache_dit"), "records": _records(handle)}
    disable_dit_cache(tiny.pipe)
    return out


def test_diffusers_ulysses_runs_on_gloo_and_matches_one_process(ranks, solo):
    for rank in ranks:
        assert (rank["uncached"] - solo["uncached"]).abs().max() < 1e-5
        assert (rank["uncached_cfg"] - solo["uncached_cfg"]).abs().max() < 1e-5
    assert ranks[0]["fbcache"]["parallel"]["source"].startswith("diffusers context parallelism (ulysses_degree=2")
    assert ranks[0]["fbcache"]["parallel"]["group_ranks"] == [0, 1]


def test_without_the_reduction_ranks_measure_different_statistics(ranks, solo):
    """The cause of the hang: each rank's shard gives its own relative L1 (the reduced one is the whole's)."""
    local = [rank["threshold0"]["local_diffs"] for rank in ranks]
    assert max(abs(a - b) for a, b in zip(*local)) > 1e-3
    reduced = [[r[4] for r in rank["threshold0"]["records"]][1:] for rank in ranks]
    assert reduced[0] == reduced[1]  # bit-identical on every rank
    assert reduced[0] == pytest.approx([r[4] for r in solo["threshold0"]["records"]][1:], rel=1e-5)


@pytest.mark.parametrize("name", [n for n in SCENARIOS if n != "threshold0"])
def test_decisions_are_identical_on_every_rank_and_to_one_process(ranks, solo, name):
    mine = [rank[name]["records"] for rank in ranks]
    assert mine[0] == mine[1]  # step, branch, decision, reason and the diff itself, bit for bit
    expected = solo[name]["records"]
    assert [r[:4] for r in mine[0]] == [r[:4] for r in expected]
    for got, want in zip(mine[0], expected):
        assert (got[4] is None) == (want[4] is None)
        if want[4] is not None:
            assert got[4] == pytest.approx(want[4], rel=1e-5)
    decisions = {r[2] for r in expected}
    assert decisions == {"cached", "computed"}, "the scenario must both cache and compute to mean anything"


@pytest.mark.parametrize("name", [n for n in SCENARIOS if n != "threshold0"])
def test_cached_outputs_equal_the_one_process_cached_output(ranks, solo, name):
    for rank in ranks:
        assert (rank[name]["output"] - solo[name]["output"]).abs().max() < 1e-5
    assert (solo[name]["output"] - solo["uncached_cfg" if name in CFG_SCENARIOS else "uncached"]).abs().max() > 1e-4


def test_cache_dit_reduces_over_the_world_which_is_the_model_group_here(ranks, solo):
    """Where the world is exactly the sharded group, Cache-DiT's own all-reduce (AVG of its two
    means over the world) gives every rank the one-process decisions: the adapter lets it run."""
    mine = [rank["cache_dit"]["records"] for rank in ranks]
    assert mine[0] == mine[1]
    expected = solo["cache_dit"]["records"]
    assert [r[:4] for r in mine[0]] == [r[:4] for r in expected]
    assert [r[4] for r in mine[0] if r[4] is not None] == pytest.approx([r[4] for r in expected if r[4] is not None],
                                                                        rel=1e-5)
    assert {r[2] for r in expected} == {"cached", "computed"}
    for rank in ranks:
        assert (rank["cache_dit"]["output"] - solo["cache_dit"]["output"]).abs().max() < 1e-5
        measured = sum(r[4] is not None for r in rank["cache_dit"]["records"])
        assert rank["cache_dit"]["all_reduces"] == 2 * measured  # two collectives per check (ours: one)


def test_one_collective_per_measured_decision(ranks):
    for rank in ranks:
        for name, result in ((n, rank[n]) for n in SCENARIOS):
            measured = sum(r[4] is not None for r in result["records"])
            assert result["collectives"] == measured, name
    assert ranks[0]["taylorseer"]["collectives"] == 0  # scheduled: nothing to reduce


def test_disabled_means_identical_on_two_ranks(ranks):
    for rank in ranks:
        assert torch.equal(rank["threshold0"]["output"], rank["uncached"])
        assert torch.equal(rank["after_disable"], rank["uncached"])
        assert rank["disabled"] == (False, True)


def test_no_pollution_across_runs_on_two_ranks(ranks):
    for rank in ranks:
        assert rank["fbcache_again"]["records"] == rank["fbcache"]["records"]
        assert torch.equal(rank["fbcache_again"]["output"], rank["fbcache"]["output"])


def test_explicit_process_group_gives_the_same_decisions(ranks):
    for rank in ranks:
        assert rank["explicit"]["records"] == rank["fbcache"]["records"]
        assert torch.equal(rank["explicit"]["output"], rank["fbcache"]["output"])


def test_tensor_parallel_models_name_their_tp_group(ranks):
    for rank in ranks:
        assert rank["tensor_parallel"] == ([0, 1], "diffusers tensor parallelism (tp_degree=2)")


def test_models_split_inside_a_cached_block_are_refused(ranks):
    for rank in ranks:
        kind, message, untouched = rank["wan"]
        assert kind == "BackendUnavailableError" and "blocks.0 splits hidden_states" in message and untouched


def test_refusals_name_the_fix_and_leave_the_model_untouched(ranks):
    for rank in ranks:
        refusals = rank["refusals"]
        kind, message = refusals["missing_shard"]
        assert kind == "DiTCacheConfigError" and "process_group" in message and "[0, 1]" in message
        for strategy in ("fbcache", "magcache", "taylorseer", "pab", "fastercache"):
            kind, message = refusals[f"diffusers_{strategy}"]
            assert kind == "BackendUnavailableError", strategy
            assert "backend 'diffusers'" in message and "backend='native'" in message
            assert "diffusers context parallelism" in message
        assert rank["untouched"]
