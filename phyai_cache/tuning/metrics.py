"""Image-quality metrics of a cached output against the uncached one: PSNR and SSIM, torch only.

Both take images in ``[0, data_range]`` shaped ``(..., C, H, W)`` (any leading dims are flattened
into one batch, so video frames count as images). SSIM is the Gaussian-window SSIM of Wang et al.
(2004): an 11x11 window with sigma 1.5, K1=0.01, K2=0.03, computed over the "valid" region only
(no padding, as in the reference implementation and scikit-image), averaged over pixels, channels
and images. Windows shrink to fit images smaller than 11 pixels (the reference digits are 16x16).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def psnr(output: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over all elements; ``math.inf`` when identical.

    Pooled over the whole tensor (one MSE for every image together), so a batch's PSNR is not
    the mean of per-image PSNRs: one bad image lowers it as much as its share of the error.
    """
    _check_pair(output, reference)
    mse = float((output.detach().double() - reference.detach().double()).pow(2).mean())
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range * data_range / mse)


def ssim(output: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0,
         window_size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> float:
    """Mean structural similarity (1.0 when identical) of images shaped ``(..., C, H, W)``."""
    _check_pair(output, reference)
    if output.ndim < 3:
        raise ValueError(f"SSIM needs images shaped (..., C, H, W), got shape {tuple(output.shape)}")
    x, y = _as_batch(output), _as_batch(reference)
    size = min(window_size, x.shape[-1], x.shape[-2])
    window = _gaussian_window(size, sigma, x.shape[1]).to(x)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2

    def blur(t: torch.Tensor) -> torch.Tensor:  # depthwise: every channel on its own
        return F.conv2d(t, window, groups=x.shape[1])

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.pow(2)
    var_y = blur(y * y) - mu_y.pow(2)
    cov = blur(x * y) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    denominator = (mu_x.pow(2) + mu_y.pow(2) + c1) * (var_x + var_y + c2)
    return float((numerator / denominator).mean())


def ssim_supported(images: torch.Tensor) -> bool:
    """Whether ``images`` look like images (..., C, H, W) rather than e.g. packed latent tokens."""
    return images.ndim >= 4 and images.shape[-1] >= 2 and images.shape[-2] >= 2


def _as_batch(images: torch.Tensor) -> torch.Tensor:
    # float64: the variance terms subtract nearly equal numbers, float32 loses digits near 1.0
    return images.detach().double().reshape(-1, *images.shape[-3:])


def _gaussian_window(size: int, sigma: float, channels: int) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2 * sigma * sigma))
    g = g / g.sum()
    return torch.outer(g, g).expand(channels, 1, size, size).contiguous()


def _check_pair(output: torch.Tensor, reference: torch.Tensor) -> None:
    if output.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(output.shape)} vs {tuple(reference.shape)}")
