"""A non-diffusers transformer driven by a phyai-style loop through handle.run() / handle.branch()."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from phyai_cache import BlockSpec, CacheStateError, enable_dit_cache
from phyai_cache_lab.testing.toy import build_toy_dit, denoise

HIT = {"enabled": True, "threshold": 0.5, "warmup_steps": 2}


def test_custom_loop_is_accelerated(toy):
    reference = denoise(toy, steps=12, guidance=3.0)
    handle = enable_dit_cache(toy, blocks="layers", **HIT)
    out = denoise(toy, steps=12, guidance=3.0, handle=handle)
    stats = handle.last_run
    assert stats.steps_total == 24 and stats.branches == ["cond", "uncond"]
    assert stats.steps_cached > 0
    assert stats.blocks_computed < stats.blocks_total
    assert not torch.equal(out, reference)
    assert (out - reference).abs().max() < 1.0  # approximate, not garbage


def test_branches_equal_one_model_per_branch(toy):
    """cond/uncond never mix: a two-branch run equals running each branch on its own cached copy."""
    handle = enable_dit_cache(toy, blocks="layers", **HIT)
    joint = denoise(toy, steps=10, guidance=2.0, handle=handle)
    handle.disable()

    cond_model, uncond_model = build_toy_dit(), build_toy_dit()
    cond_handle = enable_dit_cache(cond_model, blocks="layers", **HIT)
    uncond_handle = enable_dit_cache(uncond_model, blocks="layers", **HIT)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, generator=generator)
    cond = torch.randn(1, 16, generator=torch.Generator().manual_seed(0))
    sigmas = torch.linspace(1.0, 0.0, 11)
    with torch.no_grad(), cond_handle.run(), uncond_handle.run():
        for i in range(10):
            t = sigmas[i].expand(1)
            c, u = cond_model(x, t, cond), uncond_model(x, t, torch.zeros_like(cond))
            x = x + (sigmas[i + 1] - sigmas[i]) * (u + 2.0 * (c - u))
    assert torch.equal(joint, x)


def test_runs_do_not_leak_into_each_other(toy):
    handle = enable_dit_cache(toy, blocks="layers", **HIT)
    settings = [dict(steps=8, batch_size=1, tokens=16), dict(steps=6, batch_size=3, tokens=16),
                dict(steps=8, batch_size=1, tokens=24, cond_seed=5), dict(steps=8, batch_size=1, tokens=16)]
    for kwargs in settings:
        out = denoise(toy, guidance=2.0, handle=handle, **kwargs)
        fresh = build_toy_dit()
        expected = denoise(fresh, guidance=2.0, handle=enable_dit_cache(fresh, blocks="layers", **HIT), **kwargs)
        assert torch.equal(out, expected), kwargs


def test_dtype_change_within_a_run_invalidates(toy):
    """Cached tensors are keyed by shape, dtype and device: a change forces a compute."""
    handle = enable_dit_cache(toy, blocks="layers", enabled=True, threshold=100.0, warmup_steps=0)
    x = torch.randn(1, 16, 8)
    cond = torch.randn(1, 16)
    with torch.no_grad(), handle.run():
        toy(x, torch.tensor([0.9]), cond)
        toy(x, torch.tensor([0.8]), cond)
        toy.double()
        toy(x.double(), torch.tensor([0.7]), cond.double())
        toy(x[:, :8].double(), torch.tensor([0.6]), cond.double())
    toy.float()
    reasons = [r.reason for r in handle.last_run.records]
    assert reasons == ["no_cache", "cached", "shape_changed", "shape_changed"]


def test_outside_a_run_calls_are_uncached(toy, caplog):
    handle = enable_dit_cache(toy, blocks="layers", enabled=True, threshold=100.0, warmup_steps=0)
    x, cond = torch.randn(1, 16, 8), torch.randn(1, 16)
    with torch.no_grad():
        handle.disable()
        expected = [toy(x, torch.tensor([s]), cond) for s in (0.9, 0.8, 0.7)]
        handle = enable_dit_cache(toy, blocks="layers", enabled=True, threshold=100.0, warmup_steps=0)
        outs = [toy(x, torch.tensor([s]), cond) for s in (0.9, 0.8, 0.7)]
    assert all(torch.equal(a, b) for a, b in zip(outs, expected))
    assert "outside `with handle.run():`" in caplog.text
    assert handle.last_run is None


def test_runs_cannot_nest_or_overlap(toy):
    handle = enable_dit_cache(toy, blocks="layers", **HIT)
    with handle.run():
        with pytest.raises(CacheStateError, match="already in progress"):
            with handle.run():
                pass
        with pytest.raises(CacheStateError, match="while a run is in progress"):
            handle.disable()


def test_blockspec_for_tuple_returning_blocks():
    class PairBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.img, self.txt = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, img, txt):
            return txt + self.txt(img.mean(1, keepdim=True)), img + self.img(img) * 0.1

    class PairModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.double_blocks = nn.ModuleList(PairBlock() for _ in range(3))
            self.single = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

        def forward(self, img, txt):
            for block in self.double_blocks:
                txt, img = block(img, txt)
            for layer in self.single:
                img = layer(img)
            return img

    torch.manual_seed(0)
    model = PairModel().eval()
    spec = BlockSpec("double_blocks", hidden_states_arg="img", encoder_hidden_states_arg="txt",
                     return_hidden_states_index=1, return_encoder_hidden_states_index=0)
    handle = enable_dit_cache(model, blocks=[spec, "single"], enabled=True, threshold=100.0, warmup_steps=1)
    img, txt = torch.randn(1, 4, 8), torch.randn(1, 1, 8)
    with torch.no_grad(), handle.run():
        outputs = [model(img * s, txt) for s in (1.0, 1.01, 1.02)]
    assert [r.decision for r in handle.last_run.records] == ["computed", "cached", "cached"]
    assert [r.blocks_computed for r in handle.last_run.records] == [5, 1, 1]
    assert all(o.shape == (1, 4, 8) for o in outputs)


def test_blocks_out_of_order_is_a_clear_error():
    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

        def forward(self, x):
            for layer in reversed(self.layers):
                x = layer(x)
            return x

    model = Reversed()
    handle = enable_dit_cache(model, blocks="layers", enabled=True, threshold=1.0)
    with handle.run(), pytest.raises(CacheStateError, match="out of order"):
        model(torch.randn(2, 4))


@pytest.mark.parametrize("settings", [
    dict(strategy="dbcache", front_blocks=2, back_blocks=1, threshold=0.5, warmup_steps=2),
    dict(strategy="fbcache", threshold=0.5, warmup_steps=2, taylorseer_order=2),
    dict(strategy="taylorseer", cache_interval=3, warmup_steps=2),
    dict(strategy="fbcache", threshold=0.5, warmup_steps=0, compute_mask="110110110110"),
], ids=["dbcache", "fbcache+taylorseer", "taylorseer", "compute_mask"])
def test_every_native_strategy_on_the_custom_loop(settings):
    """All native strategies through handle.run()/handle.branch(), with exact per-branch accounting."""
    model = build_toy_dit()
    reference = denoise(model, steps=12, guidance=3.0)
    handle = enable_dit_cache(model, blocks="layers", enabled=True, **settings)
    out = denoise(model, steps=12, guidance=3.0, handle=handle)
    stats = handle.last_run
    assert stats.steps_cached > 0 and stats.blocks_computed < stats.blocks_total
    assert [r.step for r in stats.records if r.branch == "uncond"] == list(range(12))
    assert (out - reference).abs().max() < 1.0
    fresh = build_toy_dit()
    again = denoise(fresh, steps=12, guidance=3.0, handle=enable_dit_cache(fresh, blocks="layers", enabled=True,
                                                                            **settings))
    assert torch.equal(out, again)
