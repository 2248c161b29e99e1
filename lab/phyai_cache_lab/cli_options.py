"""Command-line options that several ``phyai-cache`` subcommands share, declared once."""

from __future__ import annotations

import argparse


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on shared cores more threads make timings erratic)")


def add_cfg_option(parser: argparse.ArgumentParser, help: str = "true CFG with this scale") -> None:
    parser.add_argument("--cfg", type=float, nargs="?", const=2.0, default=None, metavar="SCALE",
                        help=f"{help} (default off; --cfg alone means 2.0)")


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's CPU threads from ``--threads`` (imported here: ``phyai-cache backends`` stays light)."""
    import torch

    if args.threads < 1:
        raise SystemExit(f"error: --threads: got {args.threads}; allowed: an integer >= 1")
    torch.set_num_threads(args.threads)
