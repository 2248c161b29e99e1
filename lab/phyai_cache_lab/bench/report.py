"""Write a benchmark report: JSON (machine-readable, schema ``phyai_cache.bench/1``) and Markdown.

JSON field names are documented in docs/benchmarks.md and are stable within a schema version.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .runner import Baseline, BenchReport, BenchRow

TIERS_DB = (("quality", 40.0), ("balanced", 33.0), ("fast", 28.0))
COLUMNS = ("config", "backend", "steps cached", "blocks computed", "ideal", "speedup", "latency",
           "PSNR", "SSIM", "agreement", "cache mem", "peak RSS", "note")
METRIC_COLUMNS = {"temporal_psnr_db": "temporal PSNR", "motion_accuracy": "motion"}
METRIC_NOTE = ("Temporal PSNR: consecutive frames of a clip against each other with the requested motion undone "
               "(infinite on real clips); motion: share of frame pairs whose best-matching shift is the requested one.")


def write_json(report: BenchReport, path: Path, extra: dict[str, Any] | None = None) -> Path:
    data = {**report.to_dict(), **(extra or {})}
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def markdown(report: BenchReport) -> str:
    """One table per step count, frontier rows marked, then what was skipped and why."""
    parts = []
    for baseline in report.baselines:
        parts.append(f"### {baseline.steps} steps\n")
        parts.append(_table(baseline, report.rows_for(baseline.steps)))
        parts.extend(f"- {line}" for line in headline(report.rows_for(baseline.steps)))
        parts.extend(f"- {line}" for line in native_versus_anchors(report.rows_for(baseline.steps)))
        parts.append("")
    if report.skipped:
        parts.append("Not benchmarked:\n")
        parts.extend(f"- {s.backend}{'/' + s.strategy if s.strategy else ''}: {s.reason}" for s in report.skipped)
        parts.append("")
    return "\n".join(parts)


def headline(rows: list[BenchRow]) -> list[str]:
    """The fastest measured config per quality tier, one line each."""
    lines = []
    usable = [r for r in rows if r.status == "ok" and r.get("speedup") is not None]
    for tier, db in TIERS_DB:
        meeting = [r for r in usable if r.get("psnr_db") is not None and r.get("psnr_db") >= db]
        if not meeting:
            lines.append(f"{tier} (>= {db:g} dB): no config meets it")
            continue
        best = max(meeting, key=lambda r: r.get("speedup"))
        lines.append(f"{tier} (>= {db:g} dB): fastest is {best.backend}/{best.name} at {best.get('speedup'):.2f}x "
                     f"({_db(best.get('psnr_db'))} dB, ideal {_x(best.get('ideal_speedup'))})")
    return lines


ANCHOR_LEVELS_DB = (35.0, 40.0, 45.0, 50.0)


def native_versus_anchors(rows: list[BenchRow], levels: tuple[float, ...] = ANCHOR_LEVELS_DB) -> list[str]:
    """Per PSNR level: the fastest native config against the fastest config of the other backends
    (the anchors: diffusers' and Cache-DiT's own engines) that keep that level."""
    usable = [r for r in rows if r.status == "ok" and r.get("speedup") is not None and r.get("psnr_db") is not None]
    lines = []
    for level in levels:
        best = {}
        for side, chosen in (("native", [r for r in usable if r.backend == "native"]),
                             ("anchor", [r for r in usable if r.backend != "native"])):
            meeting = [r for r in chosen if r.get("psnr_db") >= level]
            best[side] = max(meeting, key=lambda r: r.get("speedup")) if meeting else None
        native, anchor = best["native"], best["anchor"]
        if native is None or anchor is None:
            missing = "native" if native is None else "anchor"
            lines.append(f">= {level:g} dB: no {missing} config keeps it")
            continue
        lines.append(f">= {level:g} dB: native {native.name} {native.get('speedup'):.2f}x vs anchor "
                     f"{anchor.backend}/{anchor.name} {anchor.get('speedup'):.2f}x = "
                     f"{native.get('speedup') / anchor.get('speedup'):.2f}x faster")
    return lines


def _table(baseline: Baseline, rows: list[BenchRow]) -> str:
    extra = list(baseline.metrics or {})  # the workload's own figures (video: temporal consistency)
    columns = COLUMNS[:-1] + tuple(METRIC_COLUMNS.get(k, k) for k in extra) + COLUMNS[-1:]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines.append(_line(_with_metrics(["uncached", "-", "0", "all", "1.00x", "1.00x", _ms(baseline.latency_s), "inf",
                                      "1.000", _pct(baseline.agreement), "", "", "reference"],
                                     baseline.metrics, extra)))
    for row in rows:
        lines.append(_line(_with_metrics(_cells(row), row.get("workload_metrics"), extra)))
    lines.append("")
    lines.append("`*` = on the speedup/PSNR frontier (no other config is both faster and closer). "
                 "Speedup: median of interleaved uncached/cached pairs; ideal: blocks_total / blocks_computed. "
                 "Cache mem: tensors the cache held; peak RSS: the whole process (CPU), not a per-config cost.")
    if extra:
        lines.append(METRIC_NOTE)
    lines.append("")
    return "\n".join(lines)


def _with_metrics(cells: list[str], metrics: dict[str, float] | None, names: list[str]) -> list[str]:
    """Insert the workload's figures before the note column ("" where a row has none)."""
    values = [_metric(name, (metrics or {}).get(name)) for name in names]
    return cells[:-1] + values + cells[-1:]


def _metric(name: str, value: float | None) -> str:
    if value is None:
        return ""
    return _db(value) if name.endswith("_db") else (_pct(value) if name.endswith("accuracy") else f"{value:.3g}")


def _cells(row: BenchRow) -> list[str]:
    name = ("*" if row.on_frontier else "") + row.name
    if row.presets and row.presets != [row.name]:
        name += f" ({', '.join(p for p in row.presets if p != row.name)})"
    backend = f"{row.backend}/{row.strategy}"
    if row.status != "ok":
        return [name, backend] + [""] * (len(COLUMNS) - 3) + [f"{row.status}: {_short(row.error or '')}"]
    m = row.measured
    return [
        name, backend,
        _ratio(m.get("steps_cached"), m.get("steps_total")),
        _ratio(m.get("blocks_computed"), m.get("blocks_total")),
        _x(m.get("ideal_speedup")), _x(m.get("speedup")), _ms(m.get("latency_cached_s")),
        _db(m.get("psnr_db")), _num(m.get("ssim"), 3), _pct(m.get("agreement")),
        _mib(m.get("cache_bytes"), 2), _mib(m.get("peak_memory_bytes")), "; ".join(_short(w) for w in row.warnings),
    ]


def _line(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _ratio(part: float | None, whole: float | None) -> str:
    if part is None or whole is None:
        return "n/a"
    return f"{_compact(part)}/{_compact(whole)}"


def _compact(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.0f} ms"


def _db(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "inf" if math.isinf(value) else f"{value:.1f}"


def _num(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.0f}%"


def _mib(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value / 2**20:.{digits}f} MiB"


def _short(text: str, limit: int = 90) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."
