"""Where tensors compute: the one `--device` choice (auto / cpu / cuda) that gguf, bnb and
verify share, resolved here so that every command refuses a missing GPU the same way; and the
CPU's worker threads that GGML quantization and the LoRA merge split a tensor's chunks over."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

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


def run_chunks(run: Callable[[int], None], starts: Iterable[int], pool: ThreadPoolExecutor | None) -> None:
    """`run` for every start, on the pool's workers (`cpu_pool`), or here when there is none."""
    if pool is None:
        for start in starts:
            run(start)
    else:
        list(pool.map(run, starts))


_pool: tuple[int, ThreadPoolExecutor] | None = None
_pool_lock = threading.Lock()


def cpu_pool() -> tuple[int, ThreadPoolExecutor | None]:
    """(n, pool): torch.get_num_threads() = n worker threads that run torch ops single-threaded
    (no pool when n is 1).

    Why not torch's own intra-op threads: they meet at a barrier after every op, and a chunk
    takes many small ops (~30 for a GGML block type, ~6 for a LoRA merge's block), so one
    descheduled thread on a busy machine stalls every op (on a loaded machine many times the
    work itself; benchmarks/README.md). Whole chunks per thread, as llama.cpp splits rows, join
    once per tensor. torch.set_num_threads(1) in a worker
    sets that thread's own count (OpenMP keeps it per thread) and the process-wide default,
    which is restored once the workers are set up."""
    global _pool
    n = torch.get_num_threads()
    if n <= 1:
        return 1, None
    with _pool_lock:
        if _pool is None or _pool[0] != n:
            if _pool is not None:
                _pool[1].shutdown(wait=False)
            pool = ThreadPoolExecutor(n, thread_name_prefix="weightops-cpu")
            ready = threading.Barrier(n + 1)  # holds each setup task on its own thread
            for _ in range(n):
                pool.submit(_single_threaded, ready)
            ready.wait()
            torch.set_num_threads(n)
            _pool = (n, pool)
        return _pool


def _single_threaded(ready: threading.Barrier) -> None:
    # ATen sets a thread's OpenMP count from the process-wide one when the thread first asks
    # for it; ask first, so that this thread's 1 outlives the main thread's restore
    torch.get_num_threads()
    torch.set_num_threads(1)
    ready.wait()
