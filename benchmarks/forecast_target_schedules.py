"""Issue 21 follow-up: is the velocity forecast's loss to a data / noise forecast only the schedule's doing?

The shipped schedules were searched for the velocity (output) forecast. This searches a 5-of-50
schedule per forecast target with the tune's own coordinate ascent (same start, moves and rounds as
phyai_cache.tuning.tune._search_case_schedule), on calibration seeds, then scores the best schedule on
held-out seeds. Reference image model, batch 2.

    PYTHONPATH=$PWD:$PWD/lab python benchmarks/forecast_target_schedules.py [STEPS COMPUTED]
"""

from __future__ import annotations

import sys

import torch

from phyai_cache.config import DiTCacheConfig
from phyai_cache.tuning.tune import _evaluator
from phyai_cache_lab.bench.workload import reference_workload

STEPS, COMPUTED = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (50, 5)
MOVES, ROUNDS = (-3, -1, 1, 3), 2
CALIBRATION, HELDOUT = [100, 101], [7, 8]
TARGETS = {"output": {}, "noise": {"forecast_target": "noise", "timestep_scale": 1.0},
           "data": {"forecast_target": "data", "timestep_scale": 1.0}}


def config(order: int, options: dict, points: list[int]) -> DiTCacheConfig:
    return DiTCacheConfig(enabled=True, backend="native", strategy="taylorseer", taylorseer_order=order,
                          warmup_steps=2, options={"skip_call": True, "schedule": {str(STEPS): points}, **options})


def main() -> None:
    torch.set_num_threads(1)
    workload = reference_workload(STEPS, batch_size=2)
    evaluator = _evaluator(workload.make_pipeline(), {"case": workload.call_kwargs}, workload.extract, 1.0,
                           None, None, None)
    print("| target | order | searched schedule | calibration PSNR | held-out PSNR |\n|---|---|---|---|---|")
    for order in (1, 2):
        for name, options in TARGETS.items():
            def psnr(points: list[int], seeds: list[int] = CALIBRATION) -> float:
                return evaluator.measure(config(order, options, points), seeds).psnr_db

            last = STEPS - 1 - (STEPS - 1) // 7
            points = sorted({0, 2, *(round(2 + (last - 2) * (i + 1) / (COMPUTED - 2)) for i in range(COMPUTED - 2))})
            best = psnr(points)
            for _ in range(ROUNDS):
                moved = False
                for index in range(1, len(points)):
                    for move in MOVES:
                        candidate = sorted({*points[:index], points[index] + move, *points[index + 1:]})
                        if len(candidate) == len(points) and candidate[1] > 0 and candidate[-1] < STEPS:
                            value = psnr(candidate)
                            if value > best:
                                best, points, moved = value, candidate, True
                if not moved:
                    break
            print(f"| {name} | {order} | {points} | {best:.2f} dB | {psnr(points, HELDOUT):.2f} dB |", flush=True)


if __name__ == "__main__":
    main()
