"""The hidden states of every calibration chunk between two layers: float32 [chunks, ctx,
hidden], in RAM while they fit a budget, else in a memory-mapped temporary file.

Chunks are independent, so a layer overwrites each chunk's states with its output in place:
one copy, whatever the layer count. The spill file is created already unlinked (it has no
name to leave behind, even when the process is killed) in the directory given, by default
beside the output."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch


def available_memory() -> int:
    """Bytes the system can still give (MemAvailable), or 4 GiB when it does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def default_budget() -> int:
    """A quarter of the available memory: the layer, its workspace and the OS keep the rest."""
    return available_memory() // 4


class HiddenStates:
    """[chunks, ctx, hidden] float32 states; `get(i, j)` and `put(i, t)` move rows i..j."""

    def __init__(self, chunks: int, ctx: int, hidden: int, budget: int, spill_dir: Path | None = None):
        self.shape = (chunks, ctx, hidden)
        nbytes = chunks * ctx * hidden * 4
        self.spilled = nbytes > budget
        self._file = None
        if self.spilled:
            self._file = tempfile.TemporaryFile(prefix="weightops-imatrix-", dir=spill_dir)
            os.ftruncate(self._file.fileno(), nbytes)
            self._data: np.ndarray = np.memmap(self._file, dtype=np.float32, mode="r+", shape=self.shape)
        else:
            self._data = np.empty(self.shape, dtype=np.float32)

    def get(self, start: int, stop: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self._data[start:stop]))

    def put(self, start: int, states: torch.Tensor) -> None:
        self._data[start : start + states.shape[0]] = states.detach().float().cpu().numpy()

    def close(self) -> None:
        self._data = np.empty((0, 0, 0), dtype=np.float32)  # drops the mapping (get() hands out copies)
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> HiddenStates:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
