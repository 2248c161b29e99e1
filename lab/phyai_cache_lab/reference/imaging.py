"""Pixel-space conventions shared by the trainer, the loader and the classifier.

The reference model works directly in pixel space (no real VAE), so every
conversion between "digit image" and "Flux latent tokens" lives here.  Keeping
the trainer and the runtime on the *same* functions is what makes the
classifier's downsampling the exact counterpart of the training upsampling.

Conventions:
- real digits are 8x8 with integer values 0..16 (sklearn's digits set);
- model images are 16x16, one channel, bilinearly upsampled, scaled to [-1, 1];
- Flux packs 2x2 patches into tokens, so a 16x16x1 image is 64 tokens x 4 channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DIGIT_SIZE = 8
IMAGE_SIZE = 16
DIGIT_MAX = 16.0


def upsample_digits(digits: torch.Tensor) -> torch.Tensor:
    """(B, 8, 8) or (B, 1, 8, 8) in 0..16 -> (B, 1, 16, 16) in [0, 1].

    Bilinear with ``align_corners=False``: the smooth strokes it produces are
    what the generator learns, and :func:`downsample_images` undoes it.
    """
    x = digits.float().reshape(-1, 1, DIGIT_SIZE, DIGIT_SIZE) / DIGIT_MAX
    return F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)


def downsample_images(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, 16, 16) in [0, 1] -> (B, 64) features in the 0..16 digit range.

    2x2 average pooling is the natural inverse of a 2x bilinear upsample; the
    classifier is fitted on ``downsample(upsample(real))`` so generated and
    real images go through identical preprocessing.
    """
    x = images.float().reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE).clamp(0.0, 1.0)
    return (F.avg_pool2d(x, 2) * DIGIT_MAX).flatten(1)


def images_to_model_space(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> [-1, 1], the range the flow model was trained on."""
    return images * 2.0 - 1.0


def model_space_to_images(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model output -> [0, 1] images, clamped (samples overshoot slightly)."""
    return ((x.float() + 1.0) * 0.5).clamp(0.0, 1.0)


def pack_latents(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C), identical to ``FluxPipeline._pack_latents``.

    Re-implemented (and checked against diffusers in the tests) so training
    does not depend on a private diffusers helper.
    """
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> torch.Tensor:
    """(B, H/2 * W/2, 4C) -> (B, C, H, W); inverse of :func:`pack_latents`."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.reshape(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def latent_image_ids(height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> torch.Tensor:
    """RoPE position ids for the packed tokens, as ``FluxPipeline`` builds them.

    Column 0 is unused (0), column 1 the token row, column 2 the token column.
    """
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)
