"""Locations and readers for the shipped reference-model files.

Everything the runtime needs is in ``weights/``: an fp16 transformer, the
class-embedding table, the classifier and one JSON file describing how they
were produced.  Readers are cached because the files never change at runtime;
callers get copies so they cannot corrupt the cache.
"""

from __future__ import annotations

import copy
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

# Overridable so a freshly retrained candidate can be evaluated before it replaces the shipped files.
WEIGHTS_ENV = "PHYAI_CACHE_REFERENCE_WEIGHTS"
WEIGHTS_DIR = Path(os.environ.get(WEIGHTS_ENV) or Path(__file__).resolve().parent / "weights")
METADATA_FILE = "reference.json"
TRANSFORMER_FILE = "transformer.fp16.safetensors"
EMBEDDINGS_FILE = "class_embeddings.safetensors"
CLASSIFIER_FILE = "classifier.safetensors"


def weights_path(name: str) -> Path:
    """Absolute path of a shipped file, with a clear error if it is missing."""
    path = WEIGHTS_DIR / name
    if not path.is_file():
        raise FileNotFoundError(
            f"reference model file {path} is missing; retrain with `python tools/train_reference.py`"
        )
    return path


@cache
def _metadata() -> dict[str, Any]:
    return json.loads(weights_path(METADATA_FILE).read_text())


def load_metadata() -> dict[str, Any]:
    """The parsed ``reference.json`` (configs, image size, training stats)."""
    return copy.deepcopy(_metadata())


@cache
def _tensors(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(weights_path(name)))


def load_tensors(name: str) -> dict[str, torch.Tensor]:
    """A safetensors file from ``weights/`` as a dict of fresh tensors."""
    return {key: value.clone() for key, value in _tensors(name).items()}
