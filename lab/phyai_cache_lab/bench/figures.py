"""PNG figures of a benchmark: the speedup-versus-PSNR frontier and cached-vs-uncached image grids.

matplotlib is optional (``pip install 'phyai-cache[bench]'``); without it the figures are skipped
and :func:`write_figures` says so in its return value.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from .runner import BenchReport, BenchRow

logger = logging.getLogger("phyai_cache_lab.bench")

TIER_LINES_DB = {"fast": 28.0, "balanced": 33.0, "quality": 40.0}
MARKERS = "os^Dv<>Ph*X"
GRID_ROWS = 8
DIFF_SCALE = 0.1  # error maps saturate at 10 % of the image range


def write_figures(report: BenchReport, out_dir: Path, prefix: str = "bench") -> tuple[list[Path], str | None]:
    """Frontier and image grid per step count; returns (files written, why skipped or None)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
    except ImportError:
        return [], "matplotlib is not installed (pip install 'phyai-cache[bench]'); figures skipped"
    written = []
    for baseline in report.baselines:
        rows = [r for r in report.rows_for(baseline.steps) if r.status == "ok"]
        written.append(frontier_figure(report, baseline.steps, out_dir / f"{prefix}_frontier_{baseline.steps}.png"))
        if baseline.sample is not None and any(r.sample is not None for r in rows):
            written.append(grid_figure(report, baseline.steps, out_dir / f"{prefix}_grid_{baseline.steps}.png"))
    return written, None


def series_of(row: BenchRow) -> str:
    return f"{row.backend}/{row.strategy}"


def frontier_figure(report: BenchReport, steps: int, path: Path) -> Path:
    """Measured speedup against PSNR: one panel per backend, one colour per strategy with its
    Pareto front as a line; hollow markers show the ideal speedup from blocks computed."""
    import matplotlib.pyplot as plt

    rows = [r for r in report.rows_for(steps) if _plottable(r)]
    backends = list(dict.fromkeys(r.backend for r in rows)) or ["(none)"]
    strategies = sorted({r.strategy for r in rows})
    fig, axes = plt.subplots(1, len(backends), figsize=(4.2 * len(backends) + 0.8, 4.6), dpi=110,
                             sharex=True, sharey=True, squeeze=False)
    for ax, backend in zip(axes[0], backends):
        for strategy in strategies:
            points = [r for r in rows if r.backend == backend and r.strategy == strategy]
            if points:
                index = strategies.index(strategy)
                _plot_series(ax, points, f"C{index % 10}", MARKERS[index % len(MARKERS)], strategy)
        _decorate(ax, backend)
    axes[0][0].set_ylabel("speedup over uncached\n(median of interleaved pairs)")
    base = next(b for b in report.baselines if b.steps == steps)
    fig.suptitle(f"{_model_name(base.workload)}, {steps} steps, batch {report.options.batch_size}: "
                 "filled = measured speedup, hollow = ideal from blocks, line = frontier", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_series(ax: object, points: list[BenchRow], color: str, marker: str, label: str) -> None:
    points = sorted(points, key=lambda r: r.get("psnr_db"))
    ax.scatter([r.get("psnr_db") for r in points], [r.get("speedup") for r in points], color=color,
               marker=marker, label=label, zorder=3)
    ideal = [r for r in points if r.get("ideal_speedup") is not None]
    ax.scatter([r.get("psnr_db") for r in ideal], [r.get("ideal_speedup") for r in ideal], facecolors="none",
               edgecolors=color, marker=marker, alpha=0.45, zorder=2)
    front = _pareto(points)
    ax.plot([r.get("psnr_db") for r in front], [r.get("speedup") for r in front], color=color, alpha=0.7)
    for row in points:
        if row.presets:
            ax.annotate(", ".join(row.presets), (row.get("psnr_db"), row.get("speedup")), fontsize=5.5,
                        xytext=(3, -7), textcoords="offset points", color=color)


def _decorate(ax: object, backend: str) -> None:
    for tier, db in TIER_LINES_DB.items():
        ax.axvline(db, color="grey", linestyle=":", linewidth=0.8)
        ax.annotate(f"{tier}", (db, 0.0), xycoords=("data", "axes fraction"), xytext=(2, 3),
                    textcoords="offset points", fontsize=6, color="grey")
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_title(backend, fontsize=9)
    ax.set_xlabel("PSNR vs uncached (dB)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)


def _model_name(workload: dict) -> str:
    return str(workload.get("model", "workload")).split(" (")[0]


def grid_figure(report: BenchReport, steps: int, path: Path) -> Path:
    """The first seed's images: uncached on top, then selected configs; beside each, the error
    |cached - uncached| magnified (white = DIFF_SCALE or more), which shows what PSNR summarises."""
    import matplotlib.pyplot as plt

    base = next(b for b in report.baselines if b.steps == steps)
    chosen = grid_rows(report.rows_for(steps))
    labels = ["uncached"] + [f"{r.backend}: {r.name}\n{_db(r.get('psnr_db'))}, {r.get('speedup') or 0:.2f}x"
                             for r in chosen]
    samples = [base.sample] + [r.sample for r in chosen]
    fig, axes = plt.subplots(len(samples), 2, figsize=(13, 0.7 * len(samples) + 0.6), dpi=110, squeeze=False,
                             gridspec_kw={"wspace": 0.03})
    for (image_ax, diff_ax), sample, label in zip(axes, samples, labels):
        image_ax.imshow(_strip(sample), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        diff_ax.imshow(_strip((sample - base.sample).abs()), cmap="magma", vmin=0.0, vmax=DIFF_SCALE,
                       interpolation="nearest")
        for ax in (image_ax, diff_ax):
            ax.set_xticks([])
            ax.set_yticks([])
        image_ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    axes[0][0].set_title("images", fontsize=8)
    axes[0][1].set_title(f"|cached - uncached| (bright = {DIFF_SCALE:g} or more)", fontsize=8)
    fig.suptitle(f"cached vs uncached, {steps} steps, seed {report.options.seeds[0]}", fontsize=9)
    fig.subplots_adjust(left=0.2, right=0.99, top=0.9, bottom=0.02, hspace=0.15)
    fig.savefig(path)
    plt.close(fig)
    return path


def grid_rows(rows: list[BenchRow]) -> list[BenchRow]:
    """The fastest config at >= 33 dB of each backend/strategy, fastest first, then the lowest-PSNR
    config of the sweep (what too much caching does)."""
    usable = [r for r in rows if _plottable(r) and r.sample is not None]
    chosen = []
    for series in sorted({series_of(r) for r in usable}):
        good = [r for r in usable if series_of(r) == series and r.get("psnr_db") >= TIER_LINES_DB["balanced"]]
        if good:
            chosen.append(max(good, key=_speed))
    chosen = sorted(chosen, key=_speed, reverse=True)[: GRID_ROWS - 1]
    worst = min(usable, key=lambda r: r.get("psnr_db"), default=None)
    if worst is not None and worst not in chosen:
        chosen.append(worst)
    return chosen


def _speed(row: BenchRow) -> float:
    return row.get("speedup") or 0.0


def _strip(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> one (H, B*W) grey strip (the channel mean for colour images)."""
    x = images.float().clamp(0, 1).mean(dim=1)
    return torch.cat(list(x), dim=1).numpy()


def _plottable(row: BenchRow) -> bool:
    psnr = row.get("psnr_db")
    return row.status == "ok" and row.get("speedup") is not None and psnr is not None and math.isfinite(psnr)


def _pareto(points: list[BenchRow]) -> list[BenchRow]:
    front, best = [], -math.inf
    for row in sorted(points, key=lambda r: -r.get("psnr_db")):
        if row.get("speedup") > best:
            front.append(row)
            best = row.get("speedup")
    return front


def _db(value: float | None) -> str:
    return "n/a" if value is None else ("inf" if math.isinf(value) else f"{value:.1f} dB")
