"""PSNR and SSIM: identities, closed-form values, and SSIM against a slow direct implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from phyai_cache.tuning import extract_images, psnr, ssim
from phyai_cache.tuning.measure import quality
from phyai_cache.tuning.metrics import SSIM_K1, SSIM_K2, _gaussian_window


def _images(seed: int = 0, shape=(3, 1, 16, 16)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_identical_images_give_infinite_psnr_and_unit_ssim():
    x = _images()
    assert psnr(x, x.clone()) == math.inf
    assert ssim(x, x.clone()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("delta, data_range, expected", [(0.1, 1.0, 20.0), (0.01, 1.0, 40.0), (0.1, 2.0, 26.0206)])
def test_psnr_of_a_known_error(delta, data_range, expected):
    x = torch.zeros(2, 1, 8, 8)
    assert psnr(x + delta, x, data_range) == pytest.approx(expected, abs=1e-3)


def test_quality_reports_psnr_max_abs_and_relative_l1():
    reference = torch.full((1, 1, 8, 8), 0.5)
    cached = reference.clone()
    cached[0, 0, 0, 0] = 0.9  # one pixel off by 0.4
    q = quality(cached, reference, data_range=1.0)
    assert q["psnr_db"] == pytest.approx(psnr(cached, reference, 1.0), rel=1e-12)
    assert q["max_abs"] == pytest.approx(0.4, rel=1e-6)
    assert q["rel_l1"] == pytest.approx(0.4 / 64 / 0.5, rel=1e-6)
    # without a data range, the reference's peak-to-peak range is the scale (here 0, so 1.0)
    assert quality(cached, reference, data_range=None)["psnr_db"] == q["psnr_db"]


@pytest.mark.parametrize("a, b", [(0.2, 0.3), (0.5, 0.5), (0.0, 1.0)])
def test_ssim_of_constant_images_is_the_luminance_term(a, b):
    # constant images have zero variance, so SSIM reduces to (2ab + C1) / (a^2 + b^2 + C1)
    c1 = SSIM_K1**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    x, y = torch.full((1, 1, 16, 16), a, dtype=torch.float64), torch.full((1, 1, 16, 16), b, dtype=torch.float64)
    assert ssim(x, y) == pytest.approx(expected, rel=1e-9)


def _ssim_direct(x: np.ndarray, y: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """Slow textbook SSIM: Gaussian-weighted statistics of every valid window."""
    w = _gaussian_window(size, sigma, 1)[0, 0].numpy()
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    values = []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            px, py = x[i:i + size, j:j + size], y[i:i + size, j:j + size]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cov = (w * (px - mx) * (py - my)).sum()
            values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_matches_a_direct_implementation():
    x = _images(2, (1, 1, 14, 15))
    y = (x + 0.1 * _images(3, (1, 1, 14, 15))).clamp(0, 1)
    assert ssim(x, y) == pytest.approx(_ssim_direct(x[0, 0].double().numpy(), y[0, 0].double().numpy()), rel=1e-9)


def test_ssim_is_symmetric_drops_with_noise_and_handles_channels_and_frames():
    x = _images(4, (2, 3, 16, 16))
    slightly = (x + 0.02 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))).clamp(0, 1)
    badly = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(6))).clamp(0, 1)
    assert ssim(x, slightly) == pytest.approx(ssim(slightly, x), rel=1e-12)
    assert 1.0 > ssim(x, slightly) > ssim(x, badly) > 0.0
    video = x.reshape(1, 2, 3, 16, 16)  # frames are flattened into the batch
    assert ssim(video, slightly.reshape(1, 2, 3, 16, 16)) == pytest.approx(ssim(x, slightly), rel=1e-12)


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))


def test_extract_images_reads_diffusers_outputs():
    from PIL import Image

    tensor = torch.rand(2, 3, 8, 8)

    class Output:
        images = tensor

    assert torch.equal(extract_images(Output()), tensor)
    assert torch.equal(extract_images((tensor,)), tensor)
    as_np = extract_images(tensor.permute(0, 2, 3, 1).numpy())  # output_type="np": channels last
    assert torch.allclose(as_np, tensor)
    pil = [Image.fromarray((t.permute(1, 2, 0).numpy() * 255).astype("uint8")) for t in tensor]
    assert torch.allclose(extract_images(pil), tensor, atol=1 / 255)
