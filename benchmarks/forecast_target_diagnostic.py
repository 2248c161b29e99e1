"""Issue 21 follow-up, open loop: which quantity of a flow-matching call extrapolates best over the gaps?

Runs the reference image model (FluxPipeline, 50 steps, seed 0, batch 2) uncached and records each
call's latents x, sigma and velocity v. For each schedule of computed steps, every step between two
computed ones is forecast from the last two computed steps (order 0: reuse; order 1: linear in the
step index, which is linear in sigma on this unshifted schedule) in one of three targets, converted
back to a velocity and compared with the true one (relative L2 error, mean over the cached steps):

* v (the call's output, what whole-call skipping forecasts),
* x0 = x - sigma v (the data prediction, DPM-Solver++'s choice), v = (x - x0) / sigma,
* noise = x + (1 - sigma) v, v = (noise - x) / (1 - sigma).

No cache is involved: this checks the idea on the true trajectory, apart from any implementation.

    PYTHONPATH=$PWD:$PWD/lab python benchmarks/forecast_target_diagnostic.py
"""

from __future__ import annotations

import torch

from phyai_cache_lab.bench.workload import reference_workload

SCHEDULES = ([0, 5, 12, 22, 33, 44], [0, 2, 14, 28, 43])  # taylorseer-quality's 6 of 50; a searched 5 of 50


def record_trajectory(steps: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Each call's (latents, velocity), and the scheduler's sigmas."""
    workload = reference_workload(steps, batch_size=2)
    pipe = workload.make_pipeline()
    calls, forward = [], pipe.transformer.forward

    def recording(*args, **kwargs):
        output = forward(*args, **kwargs)
        velocity = output[0] if isinstance(output, tuple) else output.sample
        calls.append((kwargs["hidden_states"].clone(), velocity.clone()))
        return output

    pipe.transformer.forward = recording
    pipe(**workload.call_kwargs(0))
    return calls, pipe.scheduler.sigmas


def to_target(name: str, x: torch.Tensor, v: torch.Tensor, sigma: float) -> torch.Tensor:
    return {"v": v, "x0": x - sigma * v, "noise": x + (1 - sigma) * v}[name]


def to_velocity(name: str, value: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
    return {"v": value, "x0": (x - value) / sigma, "noise": (value - x) / (1 - sigma)}[name]


def main() -> None:
    torch.set_num_threads(1)
    calls, sigmas = record_trajectory(50)
    print("| schedule | target | order | mean error | max error |\n|---|---|---|---|---|")
    for schedule in SCHEDULES:
        for name in ("v", "x0", "noise"):
            for order in (0, 1):
                errors = []
                for i in range(1, len(schedule)):
                    a, b = schedule[i - 1], schedule[i]
                    end = schedule[i + 1] if i + 1 < len(schedule) else len(calls)
                    fa = to_target(name, *calls[a], sigmas[a].item())
                    fb = to_target(name, *calls[b], sigmas[b].item())
                    for j in range(b + 1, end):
                        x, v = calls[j]
                        value = fb if order == 0 else fb + (fb - fa) / (b - a) * (j - b)
                        forecast = to_velocity(name, value, x, sigmas[j].item())
                        errors.append(((forecast - v).norm() / v.norm()).item())
                print(f"| {schedule} | {name} | {order} | {sum(errors) / len(errors):.4f} | {max(errors):.4f} |")


if __name__ == "__main__":
    main()
