"""Native engine efficiency: measured speedup against the ideal implied by the blocks computed.

    python benchmarks/native_efficiency.py [--pairs 7] [--steps 20] [--json out.json]

Model: a random-weight FluxTransformer2DModel (hidden 256, 4 double + 8 single blocks, 256 image
tokens + 32 text tokens, batch 1) driven by a plain Euler loop through ``handle.run()``, so the
transformer is practically all of the work. Random weights show no step-to-step redundancy, so high
thresholds are used to make steps hit: this measures the *mechanism* (what skipping costs and
saves), not quality (see docs/benchmarks.md for quality on the trained reference model).

Per config: ideal speedup = blocks_total / blocks_computed (equal block cost), measured speedup =
median over interleaved pairs (uncached, cached, uncached, cached, ...) of t_uncached / t_cached,
efficiency = measured / ideal. Threshold 0 never caches: its time ratio is the engine's pure
overhead (decision measurement every step, wrappers on every block). ``cache_bytes`` is the peak
tensor memory the cache held.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
from diffusers import FluxTransformer2DModel

from phyai_cache import enable_dit_cache

CONFIGS = {
    "fbcache thr=0 (never hits)": dict(strategy="fbcache", threshold=0.0, warmup_steps=0),
    "fbcache thr=0.6": dict(strategy="fbcache", threshold=0.6, warmup_steps=2),
    "fbcache thr=10": dict(strategy="fbcache", threshold=10.0, warmup_steps=2),
    "fbcache thr=10 +taylorseer1": dict(strategy="fbcache", threshold=10.0, warmup_steps=2, taylorseer_order=1),
    "dbcache F2B2 thr=10": dict(strategy="dbcache", front_blocks=2, back_blocks=2, threshold=10.0, warmup_steps=2),
    "taylorseer interval=2": dict(strategy="taylorseer", cache_interval=2, warmup_steps=2, taylorseer_order=1),
    "taylorseer interval=4": dict(strategy="taylorseer", cache_interval=4, warmup_steps=2, taylorseer_order=2),
    "taylorseer interval=4 skip_call": dict(strategy="taylorseer", cache_interval=4, warmup_steps=2, taylorseer_order=2,
                                            options={"skip_call": True}),
    "fbcache thr=10 +ts1 +verify": dict(strategy="fbcache", threshold=10.0, warmup_steps=2, taylorseer_order=1,
                                        options={"verify": 100.0}),
    # Streaks capped at 3 so each of the new strategies computes every 4th step: equal ideal speedups.
    "magcache thr=10": dict(strategy="magcache", threshold=10.0, warmup_steps=2, max_consecutive_cached=3,
                            options={"mag_ratios": [1.0]}),
    "magcache thr=10 skip_call": dict(strategy="magcache", threshold=10.0, warmup_steps=2, max_consecutive_cached=3,
                                      options={"mag_ratios": [1.0], "skip_call": True}),
    "easycache thr=10": dict(strategy="easycache", threshold=10.0, warmup_steps=2, max_consecutive_cached=3),
    "easycache thr=10 skip_call": dict(strategy="easycache", threshold=10.0, warmup_steps=2, max_consecutive_cached=3,
                                       options={"skip_call": True}),
    "teacache thr=10": dict(strategy="teacache", threshold=10.0, warmup_steps=2, max_consecutive_cached=3),
}


def build_model(seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=4, num_single_layers=8, attention_head_dim=32,
        num_attention_heads=8, joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=(8, 12, 12),
    ).eval()


def make_inputs(tokens_side: int = 16, text_tokens: int = 32) -> dict:
    generator = torch.Generator().manual_seed(0)
    tokens = tokens_side * tokens_side
    img_ids = torch.zeros(tokens, 3)
    img_ids[:, 1] = torch.arange(tokens) // tokens_side
    img_ids[:, 2] = torch.arange(tokens) % tokens_side
    return dict(
        latents=torch.randn(1, tokens, 16, generator=generator),
        encoder_hidden_states=torch.randn(1, text_tokens, 64, generator=generator),
        pooled_projections=torch.randn(1, 64, generator=generator),
        img_ids=img_ids, txt_ids=torch.zeros(text_tokens, 3),
    )


@torch.no_grad()
def denoise(model, inputs: dict, steps: int, handle=None) -> torch.Tensor:
    x = inputs["latents"].clone()
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    scope = handle.run(num_inference_steps=steps) if handle is not None else _null()
    with scope:
        for i in range(steps):
            velocity = model(hidden_states=x, encoder_hidden_states=inputs["encoder_hidden_states"],
                             pooled_projections=inputs["pooled_projections"], timestep=sigmas[i].expand(1),
                             img_ids=inputs["img_ids"], txt_ids=inputs["txt_ids"], return_dict=False)[0]
            x = x + (sigmas[i + 1] - sigmas[i]) * velocity
    return x


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, settings: dict, plain, inputs: dict, steps: int, pairs: int) -> dict:
    cached_model = copy.deepcopy(plain)
    handle = enable_dit_cache(cached_model, enabled=True, **settings)
    denoise(plain, inputs, steps)  # warm-up pair, not timed
    denoise(cached_model, inputs, steps, handle)
    ratios, plain_times, cached_times = [], [], []
    for index in range(pairs):  # alternate who goes first so order effects cancel
        if index % 2 == 0:
            t_plain = timed(lambda: denoise(plain, inputs, steps))
            t_cached = timed(lambda: denoise(cached_model, inputs, steps, handle))
        else:
            t_cached = timed(lambda: denoise(cached_model, inputs, steps, handle))
            t_plain = timed(lambda: denoise(plain, inputs, steps))
        plain_times.append(t_plain)
        cached_times.append(t_cached)
        ratios.append(t_plain / t_cached)
    stats = handle.last_run
    ideal = stats.blocks_total / stats.blocks_computed
    measured = statistics.median(ratios)
    return {
        "config": name, "settings": settings, "steps_cached": stats.steps_cached, "steps_total": stats.steps_total,
        "blocks_computed": stats.blocks_computed, "blocks_total": stats.blocks_total,
        "ideal_speedup": ideal, "measured_speedup": measured, "efficiency": measured / ideal,
        "plain_ms": statistics.median(plain_times) * 1e3, "cached_ms": statistics.median(cached_times) * 1e3,
        "ratios": ratios, "cache_bytes": stats.cache_bytes,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--only", action="append", metavar="TEXT", help="only configs whose name contains TEXT")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    plain = build_model()
    inputs = make_inputs()
    params = sum(p.numel() * p.element_size() for p in plain.parameters())
    print(f"model: Flux h256 4+8 blocks, {params / 2**20:.1f} MiB params, 256+32 tokens, {args.steps} steps, "
          f"{args.pairs} interleaved pairs per config, torch threads 1", file=sys.stderr)
    rows = []
    for name, settings in CONFIGS.items():
        if args.only and not any(text in name for text in args.only):
            continue
        rows.append(measure(name, settings, plain, inputs, args.steps, args.pairs))
        row = rows[-1]
        print(f"{name:32s} cached {row['steps_cached']:2d}/{row['steps_total']}  blocks {row['blocks_computed']:3d}/"
              f"{row['blocks_total']}  ideal {row['ideal_speedup']:.2f}x  measured {row['measured_speedup']:.3f}x  "
              f"efficiency {row['efficiency']:.3f}  cache {row['cache_bytes'] / 2**10:.0f} KiB", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"params_bytes": params, "steps": args.steps, "pairs": args.pairs, "rows": rows},
                      handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
