"""A transformer call is read the way the transformer reads it: by position or by keyword.

phyai's schedulers pass the timestep positionally (``transformer(hidden_states, timestep, cond)``),
diffusers pipelines by keyword. Step and branch detection, cache keys and timestep readers must see the
same call either way, and a run whose calls cannot be told apart is never silent.
"""

from __future__ import annotations

import pytest
import torch

from phyai_cache import CacheStateError, enable_dit_cache
from phyai_cache.calls import CallSignature
from phyai_cache_lab.testing import build_tiny_pipeline
from phyai_cache_lab.testing.toy import ToyDiT, build_toy_dit

HIT = dict(enabled=True, strategy="fbcache", threshold=0.5, warmup_steps=1)
STEPS = 8


@torch.no_grad()
def cfg_loop(model, handle, *, keyword: bool, steps: int = STEPS, declared: int | None = STEPS):
    """A CFG loop that names no branch: the two calls of a step share one timestep tensor."""
    x = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(1, 16, generator=torch.Generator().manual_seed(1))
    null = torch.zeros_like(cond)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    with handle.run(num_inference_steps=declared):
        for i in range(steps):
            t = sigmas[i].expand(1)
            if keyword:
                v_cond, v_uncond = model(x=x, t=t, cond=cond), model(x=x, t=t, cond=null)
            else:
                v_cond, v_uncond = model(x, t, cond), model(x, t, null)
            x = x + (sigmas[i + 1] - sigmas[i]) * (v_uncond + 3.0 * (v_cond - v_uncond))
    return x


def test_positional_and_keyword_calls_are_the_same_call(toy):
    handle = enable_dit_cache(toy, blocks="layers", **HIT)
    by_position = cfg_loop(toy, handle, keyword=False)
    positional = handle.last_run
    by_keyword = cfg_loop(toy, handle, keyword=True)
    assert torch.equal(by_position, by_keyword)
    assert [(r.branch, r.step, r.decision, r.diff) for r in positional.records] == \
           [(r.branch, r.step, r.decision, r.diff) for r in handle.last_run.records]
    assert positional.steps_per_branch == {"call0": STEPS, "call1": STEPS}
    assert positional.steps_cached > 0 and not positional.warnings


class NoTimestepName(ToyDiT):
    """A transformer whose noise-level argument has a name the library cannot know."""

    def forward(self, x, noise_level, cond):  # noqa: D102
        return super().forward(x, noise_level, cond)


def test_unreadable_timestep_warns_once_and_refuses_mixed_branches(caplog):
    model = NoTimestepName()
    model.load_state_dict(build_toy_dit().state_dict())
    handle = enable_dit_cache(model, blocks="layers", **HIT)
    with pytest.raises(CacheStateError,
                       match=r"branch 'default' got call 9 in a run declared with 8 steps.*handle.branch"):
        cfg_loop(model, handle, keyword=False)
    stats = handle.last_run
    assert not stats.completed and list(stats.warnings) == ["timestep_unread"]
    assert stats.steps_total == STEPS  # refused before the call that would exceed the declared steps ran
    assert caplog.text.count("cannot read a timestep") == 1
    # Without a declared step count the run cannot be checked: it is flagged, and says so once.
    caplog.clear()
    cfg_loop(model, handle, keyword=False, declared=None)
    assert "timestep_unread" in handle.last_run.warnings and caplog.text.count("cannot read a timestep") == 1


def test_named_branch_with_more_calls_than_steps_is_flagged(toy, caplog):
    handle = enable_dit_cache(toy, blocks="layers", **HIT)
    x, cond = torch.randn(1, 16, 8), torch.randn(1, 16)
    with torch.no_grad(), handle.run(num_inference_steps=2), handle.branch("cond"):
        for value in (1.0, 0.75, 0.5, 0.25):  # e.g. a two-evaluation sampler: legitimate, but not what was declared
            toy(x, torch.tensor([value]), cond)
    assert list(handle.last_run.warnings) == ["steps_exceeded"] and handle.last_run.completed
    assert caplog.text.count("got call 3 in a run declared with 2 steps") == 1


def test_disabled_run_is_never_checked(toy):
    model = NoTimestepName()
    handle = enable_dit_cache(model, blocks="layers", **HIT)
    with handle.override(enabled=False):
        cfg_loop(model, handle, keyword=False)
    assert not handle.last_run.warnings


def test_diffusers_transformer_signature_reads_positions():
    tiny = build_tiny_pipeline("flux")
    signature = CallSignature.of(tiny.transformer)
    hidden, encoder, pooled, timestep = (torch.randn(1, 4, 8), torch.randn(1, 2, 8), torch.randn(1, 8),
                                         torch.tensor([0.5]))
    args = (hidden, encoder, pooled, timestep)
    assert signature.hidden_states(args, {}) is hidden
    assert signature.encoder_hidden_states(args, {}) is encoder
    assert signature.timestep_value(args, {}) is timestep
    assert signature.timestep_value((hidden,), {"timestep": timestep}) is timestep
    assert signature.read(args, {}, "img_ids") is None


def test_diffusers_backend_keys_positional_calls_like_keyword_calls():
    """diffusers' FirstBlockCache through our adapter, on a bare Flux transformer called both ways."""
    transformer = build_tiny_pipeline("flux").transformer
    generator = torch.Generator().manual_seed(0)
    hidden, encoder = torch.randn(1, 16, 16, generator=generator), torch.randn(1, 4, 32, generator=generator)
    pooled = torch.randn(1, 32, generator=generator)
    rest = dict(img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(4, 3), guidance=torch.tensor([3.5]))
    handle = enable_dit_cache(transformer, backend="diffusers", **HIT)

    def run(positional: bool):
        outputs = []
        with torch.no_grad(), handle.run(num_inference_steps=4):
            for value in (1.0, 0.75, 0.5, 0.25):
                t = torch.tensor([value])
                if positional:
                    outputs.append(transformer(hidden, encoder, pooled, t, **rest).sample)
                else:
                    outputs.append(transformer(hidden_states=hidden, encoder_hidden_states=encoder,
                                               pooled_projections=pooled, timestep=t, **rest).sample)
        return outputs, [(r.branch, r.decision, r.reason) for r in handle.last_run.records]

    (by_position, position_records), (by_keyword, keyword_records) = run(True), run(False)
    assert position_records == keyword_records and any(d == "cached" for _, d, _ in position_records)
    assert all(torch.equal(a, b) for a, b in zip(by_position, by_keyword))
    handle.disable()
