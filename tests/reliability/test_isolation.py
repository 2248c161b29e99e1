"""Enable/disable cycles, isolation between pipeline instances, and concurrent threads."""

from __future__ import annotations

import gc
import threading

import pytest
import torch
from combos import combo_id, served_combinations, settings_for
from snapshots import target_fingerprint

from phyai_cache import BackendUnavailableError, DiTCacheConfigError, disable_dit_cache, enable_dit_cache
from phyai_cache_lab.testing import build_tiny_pipeline

COMBOS = served_combinations()
CYCLES = 200


def _servable(pipe):
    usable = []
    for combo in COMBOS:
        try:
            enable_dit_cache(pipe, **settings_for(*combo))
        except (DiTCacheConfigError, BackendUnavailableError):
            continue
        disable_dit_cache(pipe)
        usable.append(combo)
    return usable


def _live_cache_subclasses(base: type) -> int:
    gc.collect()
    return sum(1 for cls in base.__subclasses__() if cls.__name__ == base.__name__)


def test_enable_disable_cycles_leave_no_trace():
    tiny = build_tiny_pipeline("flux")
    reference = tiny.run(num_inference_steps=4, cfg=True)
    fingerprint = target_fingerprint(tiny.pipe)
    pipeline_class = type(tiny.pipe)
    combos = _servable(tiny.pipe)
    assert combos
    for cycle in range(CYCLES):
        handle = enable_dit_cache(tiny.pipe, **settings_for(*combos[cycle % len(combos)]))
        if cycle % 25 == 0:
            tiny.run(num_inference_steps=3, cfg=cycle % 50 == 0)
        handle.disable()
    assert type(tiny.pipe) is pipeline_class
    assert target_fingerprint(tiny.pipe) == fingerprint
    assert _live_cache_subclasses(pipeline_class) == 0, "per-instance subclasses must be released"
    assert torch.equal(tiny.run(num_inference_steps=4, cfg=True), reference)


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_two_instances_of_one_class_behave_as_if_alone(combo):
    cached, plain = build_tiny_pipeline("flux"), build_tiny_pipeline("flux")
    expected_plain = plain.run(num_inference_steps=5, cfg=True)
    try:
        handle = enable_dit_cache(cached.pipe, **settings_for(*combo))
    except (DiTCacheConfigError, BackendUnavailableError) as error:
        pytest.skip(str(error))
    alone = build_tiny_pipeline("flux")
    enable_dit_cache(alone.pipe, **settings_for(*combo))
    expected_cached = alone.run(num_inference_steps=5, cfg=True)
    for _ in range(2):  # interleaved calls
        assert torch.equal(plain.run(num_inference_steps=5, cfg=True), expected_plain)
        assert torch.equal(cached.run(num_inference_steps=5, cfg=True), expected_cached)
    # a second cached instance with another config; disabling one leaves the other working
    other = build_tiny_pipeline("flux")
    enable_dit_cache(other.pipe, enabled=True, strategy="fbcache", backend="native", threshold=0.0)
    handle.disable()
    assert torch.equal(cached.run(num_inference_steps=5, cfg=True), expected_plain)
    assert torch.equal(other.run(num_inference_steps=5, cfg=True), expected_plain)  # threshold 0: exact


def test_threads_each_with_their_own_pipeline():
    combos = _servable(build_tiny_pipeline("flux").pipe)
    jobs = []
    for index, combo in enumerate(combos[:4]):
        tiny = build_tiny_pipeline("flux")
        enable_dit_cache(tiny.pipe, **settings_for(*combo))
        kwargs = dict(num_inference_steps=6, cfg=index % 2 == 0, prompt_seed=index)
        jobs.append((tiny, kwargs, tiny.run(**kwargs)))
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(index: int) -> None:
        tiny, kwargs, _ = jobs[index]
        try:
            for _ in range(3):
                results[index] = tiny.run(**kwargs)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for index, (_, _, expected) in enumerate(jobs):
        assert torch.equal(results[index], expected)
