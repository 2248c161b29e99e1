"""The reduced statistic and the enable-time checks that need no second process.

The reduction itself runs on real gloo groups in the other files here; this one pins its
arithmetic: packing per-shard sums and adding them is the whole tensor's statistic, also for shards
of different sizes and for several row groups at once, and no group means exactly today's numbers.
"""

from __future__ import annotations

import pytest
import torch

from phyai_cache import DiTCacheConfigError, enable_dit_cache
from phyai_cache.decision import relative_l1, relative_l1_groups
from phyai_cache_lab.testing.toy import build_toy_dit


def _over_shards(shards_current, shards_reference, sizes):
    """What ranks holding these shards compute: each packs its sums, the all-reduce adds them."""
    packed = []
    for current, reference in zip(shards_current, shards_reference):
        relative_l1_groups(current, reference, sizes, group=lambda sums: packed.append(sums.double()) or sums)
    total = torch.stack(packed).sum(0)
    return relative_l1_groups(shards_current[0], shards_reference[0], sizes, group=lambda sums: total)


@pytest.mark.parametrize("cuts", [[8, 8], [3, 13], [5, 5, 6]])
def test_sums_over_shards_give_the_whole_tensor_statistic(cuts):
    generator = torch.Generator().manual_seed(0)
    current, reference = (torch.randn(2, 16, 12, generator=generator) for _ in range(2))
    whole = relative_l1(current, reference)
    shards = [current.split(cuts, dim=1), reference.split(cuts, dim=1)]
    assert _over_shards(*shards, [2])[0] == pytest.approx(whole, rel=1e-6)
    local = [relative_l1(c, r) for c, r in zip(*shards)]
    assert max(abs(value - whole) for value in local) > 1e-3  # what each rank would see alone


def test_several_row_groups_are_reduced_in_one_tensor():
    generator = torch.Generator().manual_seed(1)
    current, reference = (torch.randn(5, 10, 4, generator=generator) for _ in range(2))
    sizes = [2, 1, 2]
    expected = relative_l1_groups(current, reference, sizes)
    calls = []
    shards = [current.split([4, 6], dim=1), reference.split([4, 6], dim=1)]
    got = relative_l1_groups(shards[0][0], shards[1][0], sizes,
                             group=lambda sums: calls.append(sums.numel()) or _sum_both(shards, sizes))
    assert calls == [2 * len(sizes)]  # numerator and denominator of every group, one tensor
    assert got == pytest.approx(expected, rel=1e-6)


def _sum_both(shards, sizes):
    packed = []
    for current, reference in zip(*shards):
        relative_l1_groups(current, reference, sizes, group=lambda sums: packed.append(sums.double()) or sums)
    return torch.stack(packed).sum(0)


def test_without_a_group_the_statistic_is_bit_for_bit_unchanged():
    generator = torch.Generator().manual_seed(2)
    current, reference = (torch.randn(1, 64, 32, generator=generator) for _ in range(2))
    plain = (current - reference).abs().mean(dtype=torch.float32) / reference.abs().mean(dtype=torch.float32)
    assert relative_l1(current, reference) == float(plain.item())
    assert relative_l1(current, reference, None) == float(plain.item())


def test_a_group_needs_an_initialised_torch_distributed_and_nothing_is_touched():
    model = build_toy_dit()
    before = dict(model.__dict__)
    for argument in ("process_group", "cfg_group"):
        with pytest.raises(DiTCacheConfigError, match=rf"dit_cache\.{argument}.*init_process_group"):
            enable_dit_cache(model, blocks="layers", enabled=True, **{argument: object()})
    assert model.__dict__ == before


def test_no_group_in_one_process_means_no_layout():
    model = build_toy_dit()
    handle = enable_dit_cache(model, blocks="layers", enabled=True)
    assert handle._lifecycle.target.parallel is None and "parallel" not in handle.describe()["plan"]
    handle.disable()
