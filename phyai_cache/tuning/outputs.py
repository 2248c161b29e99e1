"""Reading a pipeline's output as images, and the two callables the tuner takes.

Any diffusers pipeline works through :func:`extract_images`, the default reader of pipeline outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

CallKwargs = Callable[[int], Mapping[str, Any]]  # seed -> keyword arguments of one pipeline call
Extract = Callable[[Any], torch.Tensor]  # pipeline output -> images (B, C, H, W) in [0, data_range]


def extract_images(output: Any) -> torch.Tensor:
    """The images (or latents, or video frames) of a diffusers pipeline output, as a float tensor.

    Reads ``.images``, ``.frames`` or ``.videos`` (or element 0 of a tuple from ``return_dict=False``)
    and converts PIL images and numpy arrays (``output_type="pil"``/``"np"``, channels last) to
    ``(B, C, H, W)`` floats in [0, 1]. Torch tensors are returned as they are, on the CPU.
    """
    value = output
    for name in ("images", "frames", "videos"):
        if hasattr(output, name):
            value = getattr(output, name)
            break
    else:
        if isinstance(output, tuple):
            value = output[0]
    return _to_tensor(value)


def _to_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu()
    if type(value).__module__ == "numpy" or (hasattr(value, "convert") and hasattr(value, "size")):  # array or PIL
        return _from_numpy_or_pil(value)
    if isinstance(value, Sequence) and value and not isinstance(value, (str, bytes)):
        return torch.stack([_to_tensor(item) for item in value])
    raise TypeError(f"cannot read images from a pipeline output of type {type(value).__name__}; "
                    "pass extract=... to say how")


def _from_numpy_or_pil(value: Any) -> torch.Tensor:
    # numpy is imported here, not at the top: only outputs that are numpy or PIL need it, and the
    # library itself depends on torch alone.
    import numpy as np

    if isinstance(value, np.ndarray):
        return _channels_first(torch.from_numpy(np.ascontiguousarray(value)).float())
    array = np.asarray(value, dtype=np.float32) / 255.0  # a PIL image: HWC uint8
    array = array[..., None] if array.ndim == 2 else array
    return torch.from_numpy(array).permute(2, 0, 1)


def _channels_first(t: torch.Tensor) -> torch.Tensor:
    # diffusers' numpy outputs are channels last: (..., H, W, C) with C in 1, 3 or 4
    if t.ndim >= 3 and t.shape[-1] in (1, 3, 4) and t.shape[-3] > 4:
        return t.movedim(-1, -3)
    return t
