"""phyai's own Cosmos3 scheduler with the cache attached: what the integration costs, and what it saves.

    python benchmarks/phyai_overhead.py [--rounds 15] [--steps 12] [--hidden 128] [--layers 8] [--json out.json]

Needs phyai's source snapshot (../shared/phyai-src, or PHYAI_SRC). Two identical tiny Cosmos3
transformers (phyai's real model code, seeded random weights), each driven by phyai's unmodified
one-process scheduler (UniPC, CFG: two transformer calls per step); the cache is attached to one
(``phyai_cache.integrations.phyai.attach``). Runs are interleaved (the order alternates every round)
and each figure is the median over rounds of (cached time / uncached time), one process:

* ``overhead``: threshold 0 (every step measured, none cached: the same work plus the cache's
  bookkeeping). Target <= 1.02.
* ``speedup vs ideal`` at fixed schedules, where the work saved is known in advance: block-level
  (taylorseer every 2nd step computes the blocks) and whole-call skipping (taylorseer, cache_interval 3,
  options.skip_call: a cached step runs no part of the transformer). The ideal is total / computed
  (blocks, or calls). Target >= 0.9 of it.
* per-stream error of the policy variant (video + action tokens in one sequence) at a moderate
  threshold, the decision measured over all tokens ("pooled") or per stream ("worst", the default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

SCHEDULES = {
    "overhead (threshold 0)": dict(enabled=True, strategy="fbcache", threshold=0.0, warmup_steps=0),
    "blocks: taylorseer interval 2": dict(enabled=True, strategy="taylorseer", cache_interval=2, warmup_steps=2),
    "whole call: taylorseer interval 3": dict(enabled=True, strategy="taylorseer", cache_interval=3, warmup_steps=2,
                                              options={"skip_call": True}),
}


def _timed(scheduler, request):
    start = time.perf_counter()
    out = scheduler.step(request)
    return time.perf_counter() - start, out


def measure(name: str, config: dict, args) -> dict:
    from phyai_cache.integrations.phyai import attach
    from phyai_cache_lab.testing.phyai import build_tiny_cosmos3, cosmos3_request, cosmos3_scheduler

    shape = (args.frames, args.size, args.size)
    plain_model = build_tiny_cosmos3(layers=args.layers, hidden=args.hidden, video_shape=shape)
    cached_model = build_tiny_cosmos3(layers=args.layers, hidden=args.hidden, video_shape=shape)
    plain, cached = cosmos3_scheduler(plain_model), cosmos3_scheduler(cached_model)
    cache = attach(cached, config)
    request = cosmos3_request(plain_model, steps=args.steps)
    _timed(plain, request), _timed(cached, request)  # warm-up pair
    ratios = []
    for index in range(args.rounds):
        sides = [plain, cached] if index % 2 == 0 else [cached, plain]
        times = {id(s): _timed(s, request)[0] for s in sides}
        ratios.append(times[id(cached)] / times[id(plain)])
    stats = cache.last_run
    calls_computed = stats.steps_total - stats.calls_skipped
    ideal = (stats.steps_total / calls_computed) if stats.calls_skipped else 1 / stats.compute_fraction
    speedup = 1 / statistics.median(ratios)
    exact = torch.equal(_timed(plain, request)[1], _timed(cached, request)[1])
    cache.detach()
    return dict(name=name, ratio=statistics.median(ratios), quartiles=statistics.quantiles(ratios, n=4)[::2],
                speedup=speedup, ideal=ideal, of_ideal=speedup / ideal, steps_cached=stats.steps_cached,
                steps_total=stats.steps_total, blocks_computed=stats.blocks_computed,
                blocks_total=stats.blocks_total, bit_identical=exact)


def stream_errors(args) -> list[dict]:
    from phyai_cache.integrations.phyai import attach
    from phyai_cache_lab.testing.phyai import build_tiny_cosmos3, cosmos3_action_request, cosmos3_policy_scheduler

    tiny = build_tiny_cosmos3(action=True, scale=0.3)
    scheduler = cosmos3_policy_scheduler(tiny)
    request = cosmos3_action_request(tiny, steps=args.steps)
    reference = scheduler.step(request)
    rows = []
    for threshold in (0.1, 0.2, 0.3):
        for streams in ("pooled", "worst"):
            cache = attach(scheduler, dict(enabled=True, strategy="fbcache", threshold=threshold,
                                           options={"streams": streams}))
            out = scheduler.step(request)
            error = {k: float((out[k] - reference[k]).abs().mean() / reference[k].abs().mean())
                     for k in ("video", "action")}
            rows.append(dict(threshold=threshold, streams=streams, steps_cached=cache.last_run.steps_cached,
                             steps_total=cache.last_run.steps_total, **error))
            cache.detach()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--size", type=int, default=8, help="latent height and width")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from phyai_cache_lab.testing.phyai import missing_reason, phyai_source

    if phyai_source() is None:
        print(missing_reason(), file=sys.stderr)
        return 2
    results = [measure(name, config, args) for name, config in SCHEDULES.items()]
    print(f"phyai Cosmos3 (hidden {args.hidden}, {args.layers} layers, latent {args.frames}x{args.size}x{args.size}), "
          f"{args.steps} UniPC steps with CFG, {args.rounds} interleaved rounds")
    print("| schedule | cached/uncached (median) | quartiles | speedup | ideal | of ideal | steps cached | blocks | "
          "bit-identical |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['ratio']:.3f} | {r['quartiles'][0]:.3f}-{r['quartiles'][1]:.3f} | "
              f"{r['speedup']:.2f}x | {r['ideal']:.2f}x | {r['of_ideal']:.2f} | "
              f"{r['steps_cached']}/{r['steps_total']} | {r['blocks_computed']}/{r['blocks_total']} | "
              f"{r['bit_identical']} |")
    streams = stream_errors(args)
    print("\npolicy variant (video + action), fbcache: relative L1 error of each output against the uncached run")
    print("| threshold | streams | steps cached | video error | action error |")
    print("|---|---|---|---|---|")
    for r in streams:
        print(f"| {r['threshold']} | {r['streams']} | {r['steps_cached']}/{r['steps_total']} | {r['video']:.4f} | "
              f"{r['action']:.4f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"schedules": results, "streams": streams, "args": vars(args)}, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
