"""A linear digit classifier used as the reference model's quality metric.

FID/CLIP/LPIPS need downloaded networks, so sample quality is measured as
"does a classifier fitted on real digits recognise the requested digit".
The classifier is a 64 -> 10 linear layer (logistic regression fitted with
scikit-learn at training time); at runtime it is plain torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import assets
from .imaging import downsample_images

NUM_CLASSES = 10  # the digits 0-9, drawn by both reference models
NULL_CLASS = 10  # the unconditional class (the CFG negative) of both models


def check_indices(values: Sequence[int] | torch.Tensor, top: int, what: str, names: Sequence[str] = ()) -> torch.Tensor:
    """``values`` as a 1-D long tensor, or a ValueError naming ``what`` and the allowed range 0..top."""
    index = torch.as_tensor(values, dtype=torch.long)
    allowed = f"0..{top}" + (f" ({', '.join(names)})" if names else "")
    if index.ndim != 1 or index.numel() == 0:
        raise ValueError(f"{what} must be a non-empty sequence of ints in {allowed}")
    if index.min() < 0 or index.max() > top:
        raise ValueError(f"{what} must be in {allowed}, got {index.tolist()}")
    return index


def check_labels(labels: Sequence[int] | torch.Tensor, allow_null: bool = False) -> torch.Tensor:
    """Digit labels as a 1-D long tensor; ``allow_null`` admits :data:`NULL_CLASS`."""
    return check_indices(labels, NULL_CLASS if allow_null else NUM_CLASSES - 1, "labels")


def load_classifier() -> nn.Linear:
    """The shipped 64 -> 10 classifier; input is 8x8 features in the 0..16 range."""
    state = assets.load_tensors(assets.CLASSIFIER_FILE)
    layer = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    layer.load_state_dict({"weight": state["weight"].float(), "bias": state["bias"].float()})
    return layer.eval().requires_grad_(False)


@torch.no_grad()
def classify(images: torch.Tensor, classifier: nn.Linear | None = None) -> torch.Tensor:
    """Predicted digit (B,) for images (B, 1, 16, 16) in [0, 1]."""
    classifier = classifier if classifier is not None else load_classifier()
    return classifier(downsample_images(images.cpu())).argmax(dim=1)


def agreement(images: torch.Tensor, labels: Sequence[int] | torch.Tensor, classifier: nn.Linear | None = None) -> float:
    """Fraction of images the classifier assigns to the requested label."""
    target = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    predicted = classify(images, classifier)
    if predicted.shape != target.shape:
        raise ValueError(f"{predicted.numel()} images but {target.numel()} labels")
    return (predicted == target).float().mean().item()
