"""A cached model stays correct under what an engine does to its objects (issue 12): copies and pickles,
components shared between pipelines, swapped transformers and block lists, dtype moves, offload hooks
installed before or after the cache and removed in either order, LoRA adapters, a run that never
reaches the model. Every backend x strategy (tests/support/combos.py), real libraries, tiny Flux.

Rule: never silently wrong, never silently idle. Each operation either works exactly (outputs compared
bit for bit with an uncached or a freshly enabled twin) or raises a PhyaiCacheError naming the fix.
"""

from __future__ import annotations

import copy
import io
import logging
import pickle

import pytest
import torch
from combos import combo_id, served_combinations, settings_for
from structure import module_structure

from phyai_cache import (
    BackendUnavailableError,
    CacheStateError,
    DiTCacheConfigError,
    disable_dit_cache,
    enable_dit_cache,
    get_cache_handle,
)
from phyai_cache.errors import PhyaiCacheError, TargetChangedError
from phyai_cache_lab.testing import build_tiny_pipeline
from phyai_cache_lab.testing.tiny import TinyPipeline

COMBOS = served_combinations()
STEPS = 3
# One strategy per backend where a threshold of 0 makes the cache exact (it never caches), so an
# output can be compared bit for bit with the uncached model.
EXACT = [("native", "fbcache"), ("diffusers", "fbcache"), ("cache_dit", "fbcache")]
EXACT = [combo for combo in EXACT if combo in COMBOS]


def _enable(pipe, combo, **extra):
    try:
        return enable_dit_cache(pipe, **{**settings_for(*combo), **extra})
    except (DiTCacheConfigError, BackendUnavailableError) as error:
        pytest.skip(f"{combo_id(combo)} cannot serve this model: {error}")


def _scaled(tiny: TinyPipeline, factor: float = 1.5) -> None:
    with torch.no_grad():
        for parameter in tiny.transformer.parameters():
            parameter.mul_(factor)


def _wrap(pipe) -> TinyPipeline:
    return TinyPipeline("flux", pipe, ("transformer_blocks", "single_transformer_blocks"))


# -- copies and pickles ------------------------------------------------------------------------


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_copies_and_pickles_come_out_uncached_and_exact(combo, caplog):
    """deepcopy / pickle / torch.save(model) of a cached pipeline, transformer or block: the copy is
    uncached and computes with its own weights; the original stays cached, unchanged."""
    tiny = build_tiny_pipeline("flux")
    uncached = tiny.run(num_inference_steps=STEPS)
    scaled = build_tiny_pipeline("flux")
    _scaled(scaled)
    uncached_scaled = scaled.run(num_inference_steps=STEPS)
    handle = _enable(tiny.pipe, combo)
    cached = tiny.run(num_inference_steps=STEPS)

    pipe_copy = _wrap(copy.deepcopy(tiny.pipe))
    assert "the copy is not cached" in caplog.text
    assert get_cache_handle(pipe_copy.pipe) is None and type(pipe_copy.pipe) is type(scaled.pipe)
    _scaled(pipe_copy)  # the copy's own weights decide its output
    assert torch.equal(pipe_copy.run(num_inference_steps=STEPS), uncached_scaled)

    pickled = _wrap(pickle.loads(pickle.dumps(tiny.pipe)))
    assert torch.equal(pickled.run(num_inference_steps=STEPS), uncached)
    buffer = io.BytesIO()
    torch.save(tiny.transformer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    transformer_copy = copy.deepcopy(tiny.transformer)
    block_copy = copy.deepcopy(tiny.transformer.transformer_blocks[0])
    for module in (loaded, transformer_copy, block_copy, pickled.transformer):
        for sub in module.modules():
            assert not {"forward", "__deepcopy__", "__reduce_ex__", "_phyai_cache_handle"} & set(sub.__dict__)
            assert not getattr(sub, "_diffusers_hook", None) or not sub._diffusers_hook._hook_order
    assert get_cache_handle(tiny.pipe) is handle and handle.enabled
    assert torch.equal(tiny.run(num_inference_steps=STEPS), cached)
    assert handle.last_run.steps_total == STEPS


@pytest.mark.parametrize("combo", EXACT, ids=combo_id)
def test_state_dict_holds_no_cache_state(combo):
    tiny = build_tiny_pipeline("flux")
    keys = list(tiny.transformer.state_dict())
    _enable(tiny.pipe, combo, threshold=0.0)
    tiny.run(num_inference_steps=STEPS)
    state = tiny.transformer.state_dict()
    assert list(state) == keys
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = build_tiny_pipeline("flux", seed=1)  # other weights, uncached
    fresh.transformer.load_state_dict(torch.load(buffer))
    disable_dit_cache(tiny.pipe)
    assert torch.equal(fresh.run(num_inference_steps=STEPS), tiny.run(num_inference_steps=STEPS))


def test_a_copy_during_a_run_is_refused():
    tiny = build_tiny_pipeline("flux")
    handle = enable_dit_cache(tiny.transformer, enabled=True, strategy="fbcache")
    with handle.run():
        with pytest.raises(CacheStateError, match="while a run or a request is in progress"):
            copy.deepcopy(tiny.transformer)
    assert handle.enabled


# -- shared components -------------------------------------------------------------------------


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_a_pipeline_sharing_the_transformer_stays_exact(combo):
    """from_pipe: the sibling that was never enabled runs uncached and exact; enabling on it is
    refused while the other holds the cache, and served once that one is disabled."""
    from diffusers import FluxPipeline

    tiny = build_tiny_pipeline("flux")
    uncached = tiny.run(num_inference_steps=STEPS, cfg=True)
    alone = build_tiny_pipeline("flux")
    _enable(alone.pipe, combo)
    expected_cached = alone.run(num_inference_steps=STEPS, cfg=True)
    _enable(tiny.pipe, combo)
    sibling = _wrap(FluxPipeline.from_pipe(tiny.pipe))
    assert sibling.transformer is tiny.transformer
    for _ in range(2):  # interleaved
        assert torch.equal(sibling.run(num_inference_steps=STEPS, cfg=True), uncached)
        assert torch.equal(tiny.run(num_inference_steps=STEPS, cfg=True), expected_cached)
    with pytest.raises(CacheStateError, match="through another pipeline that shares it"):
        enable_dit_cache(sibling.pipe, **settings_for(*combo))
    disable_dit_cache(tiny.pipe)
    enable_dit_cache(sibling.pipe, **settings_for(*combo))
    assert torch.equal(sibling.run(num_inference_steps=STEPS, cfg=True), expected_cached)
    assert torch.equal(tiny.run(num_inference_steps=STEPS, cfg=True), uncached)


# -- swapped modules ---------------------------------------------------------------------------


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_a_replaced_transformer_or_block_list_is_refused_at_the_next_run(combo):
    tiny = build_tiny_pipeline("flux")
    original = tiny.transformer
    other = build_tiny_pipeline("flux", seed=1)
    expected_other = other.run(num_inference_steps=STEPS)
    handle = _enable(tiny.pipe, combo)
    cached = tiny.run(num_inference_steps=STEPS)

    tiny.pipe.transformer = other.transformer
    with pytest.raises(TargetChangedError, match="pipe.transformer was replaced"):
        tiny.run(num_inference_steps=STEPS)
    tiny.pipe.transformer = original
    assert torch.equal(tiny.run(num_inference_steps=STEPS), cached)  # put back: served again

    blocks = original.single_transformer_blocks
    original.single_transformer_blocks = torch.nn.ModuleList(copy.deepcopy(list(blocks)))
    with pytest.raises(TargetChangedError, match="single_transformer_blocks"):
        tiny.run(num_inference_steps=STEPS)
    original.single_transformer_blocks = blocks
    original.transformer_blocks[1] = copy.deepcopy(original.transformer_blocks[1])
    with pytest.raises(TargetChangedError, match="transformer_blocks.1"):
        tiny.run(num_inference_steps=STEPS)
    # the fix named in the error: disable, enable again on what the model holds now
    tiny.pipe.transformer = other.transformer
    handle.disable()
    _enable(tiny.pipe, combo)
    fresh = build_tiny_pipeline("flux", seed=1)
    _enable(fresh.pipe, combo)
    assert torch.equal(tiny.run(num_inference_steps=STEPS), fresh.run(num_inference_steps=STEPS))
    disable_dit_cache(tiny.pipe)
    assert torch.equal(tiny.run(num_inference_steps=STEPS), expected_other)


def test_a_forward_replaced_by_hand_is_refused():
    tiny = build_tiny_pipeline("flux")
    enable_dit_cache(tiny.pipe, enabled=True, strategy="fbcache")
    tiny.transformer.forward = type(tiny.transformer).forward.__get__(tiny.transformer)
    with pytest.raises(TargetChangedError, match="forward was replaced"):
        tiny.run(num_inference_steps=STEPS)


# -- dtype and device moves, offload hooks -----------------------------------------------------


@pytest.mark.parametrize("combo", EXACT, ids=combo_id)
def test_dtype_and_device_moves_stay_exact(combo):
    tiny, twin = build_tiny_pipeline("flux"), build_tiny_pipeline("flux")
    _enable(tiny.pipe, combo, threshold=0.0)
    for tp in (tiny, twin):
        tp.pipe.to("cpu")
        tp.pipe.to(torch.float64)
    kwargs = twin.call_kwargs(num_inference_steps=STEPS)
    as64 = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
    expected = twin.pipe(**as64, return_dict=False)[0]
    output = tiny.pipe(**{**as64, "generator": torch.Generator().manual_seed(0)}, return_dict=False)[0]
    assert output.dtype == torch.float64 and torch.equal(output, expected)


def _offload_on(tiny: TinyPipeline, kind: str) -> None:
    if kind == "model":  # accelerate CpuOffload hooks on every component, re-added after each call
        tiny.pipe.enable_model_cpu_offload(device="cpu")
    elif kind == "leaf":  # what sequential offload installs (AlignDevicesHook on root and leaves), no meta move
        from accelerate.hooks import AlignDevicesHook, add_hook_to_module, attach_align_device_hook

        add_hook_to_module(tiny.transformer, AlignDevicesHook(io_same_device=True), append=True)
        attach_align_device_hook(tiny.transformer, execution_device=torch.device("cpu"))
    else:  # diffusers group offloading hooks on the blocks (block level) and the root
        tiny.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_type="block_level",
                                              num_blocks_per_group=1)


def _offload_off(tiny: TinyPipeline, kind: str) -> None:
    if kind == "model":
        tiny.pipe.remove_all_hooks()
    elif kind == "leaf":
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(tiny.transformer, recurse=True)
    else:
        for module in tiny.transformer.modules():
            registry = module.__dict__.get("_diffusers_hook")
            for name in list(getattr(registry, "_hook_order", ())):
                if "group_offloading" in name:
                    registry.remove_hook(name, recurse=False)


@pytest.mark.parametrize("order", ["cache-first", "offload-first"])
@pytest.mark.parametrize("removal", ["cache-removed-first", "offload-removed-first"])
@pytest.mark.parametrize("kind", ["model", "leaf", "group"])
@pytest.mark.parametrize("combo", EXACT, ids=combo_id)
def test_offload_hooks_in_any_order(combo, kind, order, removal):
    """Exact at threshold 0 and every step counted while both are on, exact after, and the model's
    hook structure afterwards is what the same offload on/off leaves on a never-cached twin."""
    pytest.importorskip("accelerate")
    tiny, twin = build_tiny_pipeline("flux"), build_tiny_pipeline("flux")
    reference = twin.run(num_inference_steps=STEPS)
    _offload_on(twin, kind)
    twin.run(num_inference_steps=STEPS)
    _offload_off(twin, kind)
    if order == "cache-first":
        handle = _enable(tiny.pipe, combo, threshold=0.0)
        _offload_on(tiny, kind)
    else:
        _offload_on(tiny, kind)
        handle = _enable(tiny.pipe, combo, threshold=0.0)
    for _ in range(2):  # model offload removes and re-adds its hooks after every call
        assert torch.equal(tiny.run(num_inference_steps=STEPS), reference)
        assert handle.last_run.steps_total == STEPS and handle.last_run.reached_model
    if removal == "cache-removed-first":
        handle.disable()
        _offload_off(tiny, kind)
    elif kind == "group" and order == "offload-first":
        # diffusers' registry puts back the forward it wrapped, dropping the cache's wrappers above it:
        # refused at the next run (never a silent uncached run), fixed by disabling (and enabling again).
        _offload_off(tiny, kind)
        with pytest.raises(TargetChangedError, match="forward was replaced"):
            tiny.run(num_inference_steps=STEPS)
        handle.disable()
    else:
        _offload_off(tiny, kind)
        assert torch.equal(tiny.run(num_inference_steps=STEPS), reference)  # still cached, still exact
        assert handle.last_run.steps_total == STEPS
        handle.disable()
    assert torch.equal(tiny.run(num_inference_steps=STEPS), reference)
    assert module_structure(tiny.transformer) == module_structure(twin.transformer)


# -- LoRA ---------------------------------------------------------------------------------------


def _lora(transformer: torch.nn.Module, operation: str) -> None:
    from peft import LoraConfig

    if operation == "add":
        for seed, name in ((0, "a"), (1, "b")):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"],
                                                   init_lora_weights=False), adapter_name=name)
    elif operation == "set_adapters":
        transformer.set_adapters(["a", "b"], weights=[0.5, 1.0])
    elif operation == "fuse":
        transformer.fuse_lora(lora_scale=0.7)
    elif operation == "unfuse":
        transformer.unfuse_lora()
    elif operation == "delete":
        transformer.delete_adapters(["a", "b"])


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_lora_load_fuse_unfuse_set_adapters_while_enabled(combo):
    """Each LoRA operation on a cached model gives what a model that had the LoRA applied before
    enabling gives (the cache sees the adapted weights, and keeps caching)."""
    pytest.importorskip("peft")
    tiny = build_tiny_pipeline("flux")
    handle = _enable(tiny.pipe, combo)
    done = []
    for operation in ("add", "set_adapters", "fuse", "unfuse", "delete"):
        _lora(tiny.transformer, operation)
        done.append(operation)
        twin = build_tiny_pipeline("flux")
        for previous in done:
            _lora(twin.transformer, previous)
        _enable(twin.pipe, combo)
        assert torch.equal(tiny.run(num_inference_steps=STEPS), twin.run(num_inference_steps=STEPS)), operation
        assert handle.last_run.steps_total == STEPS


# -- torch.compile of the whole transformer ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("combo", EXACT, ids=combo_id)
def test_whole_transformer_compile(combo):
    """transformer.compile() with the cache enabled: exact at threshold 0, every step counted, and no
    recompilation from one run to the next (the decision stays outside the compiled graphs). Graph
    counts per call (torch._dynamo.explain, tiny Flux, 4 blocks): docs/reliability.md."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    tiny = build_tiny_pipeline("flux")
    reference = tiny.run(num_inference_steps=STEPS)
    handle = _enable(tiny.pipe, combo, threshold=0.0)
    counter = CompileCounter()
    tiny.transformer.compile(backend=counter)
    try:
        for _ in range(2):  # diffusers' hooks compile one more frame on the second run (their state is set)
            assert torch.equal(tiny.run(num_inference_steps=STEPS), reference)
            assert handle.last_run.steps_total == STEPS
        frames = counter.frame_count
        assert frames > 0
        assert torch.equal(tiny.run(num_inference_steps=STEPS), reference)
        if combo[0] != "diffusers":  # diffusers' own hooks recompile one frame per run (docs/reliability.md)
            assert counter.frame_count == frames, "later runs must not recompile"
        handle.disable()
        assert torch.equal(tiny.run(num_inference_steps=STEPS), reference)
    finally:
        torch._dynamo.reset()


# -- a run that never reaches the model --------------------------------------------------------


def test_a_run_that_never_reaches_the_model_is_reported(caplog):
    tiny = build_tiny_pipeline("flux")
    handle = enable_dit_cache(tiny.transformer, enabled=True, strategy="fbcache")
    with caplog.at_level(logging.WARNING, logger="phyai_cache"):
        with handle.run(num_inference_steps=4):
            pass
    stats = handle.last_run
    assert stats.completed and not stats.reached_model and not stats.to_dict()["reached_model"]
    assert "no transformer call went through the cache" in stats.summary()
    assert any(r.levelno == logging.WARNING and "0 steps" in r.getMessage() for r in caplog.records)


def test_every_refusal_is_a_phyai_cache_error():
    assert issubclass(TargetChangedError, CacheStateError) and issubclass(CacheStateError, PhyaiCacheError)
