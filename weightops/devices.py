"""Where tensors compute: the one `--device` choice (auto / cpu / cuda) that gguf, bnb and
verify share, resolved here so that every command refuses a missing GPU the same way."""

from __future__ import annotations

import torch

from .errors import WeightopsError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when torch sees a GPU, else CPU; `cuda` without a GPU is an error."""
    if device not in DEVICES:
        raise WeightopsError(f"--device {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise WeightopsError("--device cuda: torch sees no CUDA device; use --device cpu or auto")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
