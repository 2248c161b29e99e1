"""The training loop the two reference-model trainers share.

``tools/train_reference.py`` (image) and ``tools/train_video_reference.py`` (video) differ in their
model, data and loss; everything else is here, once: the command-line options, the time or step
budget, shuffled batches, learning-rate warm-up and decay, gradient clipping, the EMA copy that
ships, and the loss log kept in the metadata.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import diffusers
import numpy as np
import torch
from safetensors.torch import save_file

from phyai_cache_lab.cli_options import add_threads_option

BatchLoss = Callable[[torch.nn.Module, torch.Tensor, torch.Generator], torch.Tensor]  # (model, indices, gen)


def training_parser(description: str, *, out: Path, seconds: float, batch_size: int, log_every: int,
                    label_dropout_help: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=out, help="output directory")
    parser.add_argument("--seconds", type=float, default=seconds, help="wall-clock training budget")
    parser.add_argument("--steps", type=int, default=None, help="optional step budget (stops at whichever comes first)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--label-dropout", type=float, default=0.1, help=label_dropout_help)
    add_threads_option(parser)
    parser.add_argument("--log-every", type=int, default=log_every)
    return parser


def learning_rate(base: float, step: int, progress: float) -> float:
    """Short warm-up, flat, then linear decay over the last 30 % of the budget."""
    warm = min(1.0, (step + 1) / 50)
    decay = 1.0 if progress < 0.7 else max(0.05, (1.0 - progress) / 0.3)
    return base * warm * decay


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def fit(args: argparse.Namespace, model: torch.nn.Module, num_items: int, batch_loss: BatchLoss,
        evaluate: Callable[[torch.nn.Module], float], final_window: int) -> tuple[torch.nn.Module, dict]:
    """Train ``model`` until the time or step budget runs out; returns the EMA model and its stats.

    ``batch_loss(model, indices, gen)`` draws whatever else the batch needs from ``gen`` (label
    dropout, noise, timesteps), so one seed fixes the whole run. ``final_window``: losses averaged
    into ``final_loss``.
    """
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 2)

    losses, curve, step, start = [], [], 0, time.perf_counter()
    perm, cursor = torch.randperm(num_items, generator=gen), 0
    while True:
        elapsed = time.perf_counter() - start
        progress = elapsed / args.seconds
        if args.steps:
            progress = max(progress, step / args.steps)
        if progress >= 1.0:
            break
        if cursor + args.batch_size > num_items:
            perm, cursor = torch.randperm(num_items, generator=gen), 0
        idx = perm[cursor:cursor + args.batch_size]
        cursor += args.batch_size

        for group in opt.param_groups:
            group["lr"] = learning_rate(args.lr, step, progress)
        loss = batch_loss(model, idx, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        update_ema(ema, model, min(args.ema, (1 + step) / (10 + step)))
        losses.append(loss.item())
        step += 1
        if step % args.log_every == 0:
            window = float(np.mean(losses[-args.log_every:]))
            curve.append([step, round(window, 4)])
            print(f"step {step:5d}  t={elapsed:6.0f}s  lr={opt.param_groups[0]['lr']:.2e}  loss={window:.4f}",
                  flush=True)

    stats = {
        "steps": step,
        "seconds": round(time.perf_counter() - start, 1),
        "samples_seen": step * args.batch_size,
        "final_loss": round(float(np.mean(losses[-final_window:])), 4),
        "loss_curve": curve,
        "ema_eval_loss": round(evaluate(ema), 4),
        "params": sum(p.numel() for p in model.parameters()),
    }
    return ema, stats


def training_record(args: argparse.Namespace, script: str, stats: dict, *, objective: str, data: str) -> dict:
    """The ``training`` section of the shipped metadata: how to rerun it, and what it ran on."""
    return {
        **stats,
        "command": f"OMP_NUM_THREADS=1 PYTHONPATH=. python tools/{script} "
                   + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                              if k not in ("out",) and v is not None),
        "seed": args.seed,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "ema": args.ema,
        "label_dropout": args.label_dropout,
        "threads": args.threads,
        "objective": objective,
        "data": data,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "machine": platform.machine(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_at_end": round(os.getloadavg()[0], 2),
    }


def save_outputs(out: Path, ema: torch.nn.Module, transformer_file: str, tables: dict[str, dict[str, torch.Tensor]],
                 metadata_file: str, meta: dict) -> None:
    """The EMA weights in fp16, the other tensor tables as they are, and the metadata JSON."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in ema.state_dict().items()}
    save_file(state, str(out / transformer_file), metadata={"format": "pt"})
    for name, table in tables.items():
        save_file({k: v.contiguous() for k, v in table.items()}, str(out / name))
    (out / metadata_file).write_text(json.dumps(meta, indent=2) + "\n")
    for name in (transformer_file, *tables, metadata_file):
        (out / name).chmod(0o644)  # safetensors writes 0600; package data must be world-readable
        print(f"wrote {out / name} ({(out / name).stat().st_size / 1e6:.2f} MB)")
