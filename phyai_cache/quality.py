"""Quality of a cached output against the uncached output of the same seed (torch only)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class QualityReport:
    psnr_db: float  # inf when identical
    max_abs: float
    rel_l1: float  # mean|cached - reference| / mean|reference|

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def compare(cached: torch.Tensor, reference: torch.Tensor, data_range: float | None = None) -> QualityReport:
    """PSNR, max abs error and relative L1 of ``cached`` against ``reference``.

    ``data_range`` defaults to the reference's peak-to-peak range, so latents and images in any
    scale get a meaningful PSNR; pass 1.0 for images in [0, 1].
    """
    if cached.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(cached.shape)} vs {tuple(reference.shape)}")
    a, b = cached.detach().double(), reference.detach().double()
    error = a - b
    mse = float(error.pow(2).mean())
    span = float(b.max() - b.min()) if data_range is None else data_range
    psnr = math.inf if mse == 0 else 10.0 * math.log10(span * span / mse) if span > 0 else -math.inf
    return QualityReport(
        psnr_db=psnr,
        max_abs=float(error.abs().max()),
        rel_l1=float(error.abs().mean() / b.abs().mean().clamp_min(1e-12)),
    )
