"""Cost of the layer: phyai_cache -> backend versus calling the backend directly.

    python benchmarks/layer_overhead.py [--pairs 7] [--steps 20] [--json out.json]

Same pipeline weights, same config, same seeds, on the shipped trained reference model (batch of 10
digits, true CFG 2.0, so both branches run): one pipeline goes through ``enable_dit_cache``, the
other has the library applied by hand the way its docs say. Outputs must be bit-identical; the time
ratio is the median over interleaved pairs in one process, alternating which side runs first.

* diffusers: ``transformer.enable_cache(FirstBlockCacheConfig(threshold))`` vs
  ``backend="diffusers", strategy="fbcache", warmup_steps=0`` (diffusers has no warmup).
* Cache-DiT: ``cache_dit.enable_cache(pipe, cache_config=DBCacheConfig(F1B0, warmup,
  enable_separate_cfg=True))`` (pipeline mode) vs ``backend="cache_dit", strategy="fbcache"``.
  Ours is enabled first: Cache-DiT's pipeline mode patches the pipeline class, which our per-instance
  subclass does not see.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time

import torch

from phyai_cache import enable_dit_cache
from phyai_cache_lab.reference import call_kwargs, load_pipeline

THRESHOLD = 0.2
WARMUP = 2


def _pipe():
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_pair():
    from diffusers import FirstBlockCacheConfig

    ours, direct = _pipe(), _pipe()
    enable_dit_cache(ours, enabled=True, backend="diffusers", strategy="fbcache", threshold=THRESHOLD, warmup_steps=0)
    direct.transformer.enable_cache(FirstBlockCacheConfig(threshold=THRESHOLD))
    return ours, direct


def _cache_dit_pair():
    import cache_dit

    ours, direct = _pipe(), _pipe()
    enable_dit_cache(ours, enabled=True, backend="cache_dit", strategy="fbcache", threshold=THRESHOLD,
                     warmup_steps=WARMUP)
    config = cache_dit.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=THRESHOLD,
                                     max_warmup_steps=WARMUP, enable_separate_cfg=True)
    cache_dit.enable_cache(direct, cache_config=config)
    return ours, direct


def _call(pipe, steps: int):
    with torch.no_grad():
        return pipe(**call_kwargs(list(range(10)), num_inference_steps=steps, seed=0, cfg_scale=2.0),
                    return_dict=False)[0]


def measure(name: str, make_pair, steps: int, pairs: int) -> dict:
    ours, direct = make_pair()
    out_ours, out_direct = _call(ours, steps), _call(direct, steps)  # warm-up pair, also the output check
    ratios = []
    for index in range(pairs):  # alternate who goes first (ABBA) so order effects cancel
        order = (ours, direct) if index % 2 == 0 else (direct, ours)
        times = {}
        for pipe in order:
            start = time.perf_counter()
            _call(pipe, steps)
            times[id(pipe)] = time.perf_counter() - start
        ratios.append(times[id(ours)] / times[id(direct)])
    return {"backend": name, "bit_identical": bool(torch.equal(out_ours, out_direct)),
            "max_abs_diff": float((out_ours - out_direct).abs().max()),
            "time_ratio_ours_over_direct": statistics.median(ratios), "ratios": ratios}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")
    logging.getLogger("cache_dit").setLevel(logging.ERROR)
    rows = [measure("diffusers", _diffusers_pair, args.steps, args.pairs),
            measure("cache_dit", _cache_dit_pair, args.steps, args.pairs)]
    for row in rows:
        print(f"{row['backend']:10s} bit-identical={row['bit_identical']}  "
              f"time ours/direct = {row['time_ratio_ours_over_direct']:.3f} (median of {args.pairs} pairs)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return 0 if all(r["bit_identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
