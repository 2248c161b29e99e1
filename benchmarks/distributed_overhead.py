"""What reducing the decision across ranks costs: collectives added per step, and time.

    python benchmarks/distributed_overhead.py [--ranks 2] [--rounds 15] [--steps 20] [--resolution 128]
                                              [--json out.json]

Workload: a tiny Flux pipeline under diffusers' own Ulysses context parallelism on ``--ranks`` CPU
processes joined by gloo (:func:`phyai_cache_lab.testing.distributed.ulysses_flux`), same weights and
seeds on every rank. Three pipelines per rank, identical weights:

* ``uncached``: no cache at all;
* ``reduced``: native fbcache at threshold 0 (measures every step after the first, never caches, so
  the work done is the same as uncached plus the cache's bookkeeping, its measure and its one
  all-reduce per decision) over the model's own group, detected from the transformer;
* ``local``: the same without the reduction: the layout is dropped after enabling, so each rank
  measures only its own shard. Correct here only because threshold 0 never caches (ranks cannot
  diverge); it isolates the collective's share of the cost.

Runs are interleaved (the order rotates every round; every rank starts each run after a barrier) and
each ratio is the median over rounds of (variant time / uncached time) on rank 0. On a loaded shared
CPU these ratios are noise-dominated, so two direct figures come with them: the time spent inside
the cache's collectives during the timed runs, and the all-reduce of one decision's tensor alone. Collectives are
counted twice: by the cache itself (``ParallelLayout.collectives``) and by wrapping
``torch.distributed.all_reduce`` / ``broadcast`` during one run of each variant (the model's own
Ulysses all-to-alls and all-gathers go through other functions and are not counted).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

CONFIG = dict(enabled=True, backend="native", strategy="fbcache", threshold=0.0, warmup_steps=0)


def _count_collectives(run):
    import torch.distributed as dist

    calls = {"all_reduce": 0, "broadcast": 0}
    originals = {name: getattr(dist, name) for name in calls}

    def counting(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)
        return call

    for name in calls:
        setattr(dist, name, counting(name))
    try:
        run()
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    return sum(calls.values())


def worker(rank, world_size, steps, rounds, resolution):
    import torch.distributed as dist

    from phyai_cache import enable_dit_cache
    from phyai_cache_lab.testing.distributed import ulysses_flux

    pipes = {name: ulysses_flux(world_size) for name in ("uncached", "reduced", "local")}
    handles = {name: enable_dit_cache(pipes[name].pipe, **CONFIG) for name in ("reduced", "local")}
    layout = handles["reduced"]._lifecycle.target.parallel
    # "local": drop the layout the engine was given (benchmark only; safe because threshold 0 never caches).
    handles["local"]._lifecycle.installation.parallel = None

    def run(name):
        with torch.no_grad():
            return pipes[name].run(num_inference_steps=steps, resolution=resolution)

    outputs = {name: run(name) for name in pipes}  # warm-up, and the outputs must agree bit for bit
    identical = all(torch.equal(outputs["uncached"], outputs[name]) for name in ("reduced", "local"))
    before = layout.collectives
    counted = {name: _count_collectives(lambda n=name: run(n)) for name in pipes}
    cache_collectives = layout.collectives - before
    measured = sum(r.diff is not None for r in handles["reduced"].last_run.records)

    # Time spent inside the cache's collectives during the timed "reduced" runs (includes waiting for
    # the peer: under load that wait is most of it, and the model's next all-to-all would wait anyway).
    inside = []
    collective = layout._run

    def timed_collective(*args, **kwargs):
        start = time.perf_counter()
        try:
            return collective(*args, **kwargs)
        finally:
            inside[-1] += time.perf_counter() - start

    layout._run = timed_collective

    names = list(pipes)
    times = {name: [] for name in names}
    for index in range(rounds):
        order = names[index % 3:] + names[:index % 3]  # rotate so no variant always runs first
        for name in order:
            if name == "reduced":
                inside.append(0.0)
            dist.barrier()
            start = time.perf_counter()
            run(name)
            times[name].append(time.perf_counter() - start)
    ratios = {name: [t / u for t, u in zip(times[name], times["uncached"])] for name in ("reduced", "local")}

    # The collective alone: the tensor one decision sends (numerator, denominator, run and step
    # tags with their squares: 6 float64), all-reduced back to back over the model group.
    payload = torch.zeros(6, dtype=torch.float64)
    dist.barrier()
    per_call = []
    for _ in range(300):
        start = time.perf_counter()
        layout.group.all_reduce_sum(payload)
        per_call.append(time.perf_counter() - start)
    return {
        "rank": rank, "identical_outputs": identical, "steps": steps,
        "cache_collectives_per_run": cache_collectives, "measured_decisions_per_run": measured,
        "all_reduce_and_broadcast_calls": counted,
        "median_s": {name: statistics.median(values) for name, values in times.items()},
        "times_s": times,
        "all_reduce_us_median": statistics.median(per_call) * 1e6,
        "inside_collectives_s_median": statistics.median(inside),
        "inside_collectives_over_uncached": statistics.median([i / u for i, u in zip(inside, times["uncached"])]),
        "ratio_reduced_over_uncached": statistics.median(ratios["reduced"]),
        "ratio_reduced_over_uncached_quartiles": statistics.quantiles(ratios["reduced"], n=4),
        "ratio_local_over_uncached": statistics.median(ratios["local"]),
        "ratio_reduced_over_local": statistics.median(
            [reduced / local for reduced, local in zip(times["reduced"], times["local"])]),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=128, help="pixels; (res/16)^2 image tokens")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    from phyai_cache_lab.testing.distributed import run_ranks

    results = run_ranks(worker, args.ranks, args.steps, args.rounds, args.resolution, deadline_s=3600)
    first = results[0]
    added = first["all_reduce_and_broadcast_calls"]["reduced"] - first["all_reduce_and_broadcast_calls"]["uncached"]
    print(f"{args.ranks} ranks, Ulysses tiny Flux, {args.resolution}px, {args.steps} steps, {args.rounds} rounds")
    print(f"outputs identical to uncached on every rank: {all(r['identical_outputs'] for r in results)}")
    print(f"collectives the cache adds per run: {added} counted ({first['cache_collectives_per_run']} by the cache) "
          f"for {first['measured_decisions_per_run']} measured decisions in {args.steps} steps "
          f"= {added / args.steps:.2f} per step")
    print(f"median step time uncached: {first['median_s']['uncached'] / args.steps * 1e3:.2f} ms; "
          f"the decision all-reduce alone: {first['all_reduce_us_median']:.0f} us (median of 300)")
    print(f"time inside the cache's collectives per run: {first['inside_collectives_s_median'] * 1e3:.1f} ms "
          f"(median), {first['inside_collectives_over_uncached']:.3f} of an uncached run (median of ratios)")
    print(f"time reduced/uncached: {first['ratio_reduced_over_uncached']:.3f}   "
          f"local/uncached: {first['ratio_local_over_uncached']:.3f}   "
          f"reduced/local: {first['ratio_reduced_over_local']:.3f}   (medians of pairwise ratios, rank 0; "
          "reduced/uncached quartiles "
          f"{', '.join(f'{q:.3f}' for q in first['ratio_reduced_over_uncached_quartiles'])})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0 if all(r["identical_outputs"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
