"""No cross-run pollution and exception safety, for every backend x strategy this install serves.

Each run on a long-lived cached pipeline must equal, bit for bit, the same run on a freshly built
and freshly enabled pipeline, and its RunStats must count that run only. Combinations a backend
cannot serve on the model are refused at enable time (asserted in the backends' own tests) and
skipped here.
"""

from __future__ import annotations

import pytest
import torch
from combos import combo_id, served_combinations, settings_for

from phyai_cache import BackendUnavailableError, DiTCacheConfigError, enable_dit_cache
from phyai_cache_lab.testing import build_tiny_pipeline

COMBOS = served_combinations()

SEQUENCE = [  # prompt, batch, resolution, steps, CFG, dtype vary run to run
    dict(prompt_seed=0, batch_size=1, num_inference_steps=5),
    dict(prompt_seed=1, batch_size=2, num_inference_steps=5),
    dict(prompt_seed=1, batch_size=1, num_inference_steps=6, resolution=96),
    dict(prompt_seed=2, batch_size=1, num_inference_steps=4, cfg=True),
    dict(prompt_seed=2, batch_size=2, num_inference_steps=5, cfg=True, resolution=80),
    dict(prompt_seed=0, batch_size=1, num_inference_steps=5, dtype=torch.bfloat16),
    dict(prompt_seed=0, batch_size=1, num_inference_steps=5),
]


def _enable_or_skip(pipe, combo):
    try:
        return enable_dit_cache(pipe, **settings_for(*combo))
    except (DiTCacheConfigError, BackendUnavailableError) as error:
        pytest.skip(f"{combo_id(combo)} cannot serve this model: {error}")


def _run(tiny, kwargs):
    """One pipeline call; a dtype other than float32 stands in for a device change."""
    kwargs = dict(kwargs)
    dtype = kwargs.pop("dtype", torch.float32)
    weights = {k: v.clone() for k, v in tiny.transformer.state_dict().items()}  # casts round weights
    tiny.pipe.to(dtype)
    call = tiny.call_kwargs(**kwargs)
    for key, value in call.items():
        if torch.is_tensor(value) and value.is_floating_point():
            call[key] = value.to(dtype)
    output = tiny.pipe(**call, return_dict=False)[0]
    tiny.pipe.to(torch.float32)
    tiny.transformer.load_state_dict(weights)
    return output


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_every_run_equals_a_fresh_run(combo):
    reused = build_tiny_pipeline("flux")
    handle = _enable_or_skip(reused.pipe, combo)
    for kwargs in SEQUENCE:
        output = _run(reused, kwargs)
        stats = handle.last_run
        fresh = build_tiny_pipeline("flux")
        enable_dit_cache(fresh.pipe, **settings_for(*combo))
        expected = _run(fresh, kwargs)
        assert torch.equal(output, expected), kwargs
        branches = 2 if kwargs.get("cfg") else 1
        assert stats.steps_total == kwargs["num_inference_steps"] * branches, "stats must count this run only"
        assert stats.steps_cached + stats.steps_computed == stats.steps_total


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_a_run_raising_at_step_k_leaves_nothing_behind(combo):
    tiny = build_tiny_pipeline("flux")
    handle = _enable_or_skip(tiny.pipe, combo)

    def cancel(pipe, step, timestep, callback_kwargs):
        if step == 2:
            raise KeyboardInterrupt("request cancelled")
        return callback_kwargs

    with pytest.raises(KeyboardInterrupt):
        tiny.pipe(**tiny.call_kwargs(num_inference_steps=6, cfg=True), callback_on_step_end=cancel)
    assert handle.last_run.completed is False
    after = tiny.run(num_inference_steps=6, cfg=True)
    fresh = build_tiny_pipeline("flux")
    enable_dit_cache(fresh.pipe, **settings_for(*combo))
    assert torch.equal(after, fresh.run(num_inference_steps=6, cfg=True))
