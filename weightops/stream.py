"""The stream type: lazy tensor references flowing from readers through operators to writers.

A reference knows its name, shape and dtype without reading data, so writers can lay out
headers (safetensors, GGUF) before a single tensor is loaded, and operators can be chained
without ever holding more than the tensor being processed.
"""

from __future__ import annotations

import fnmatch
import math
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, TypeVar

from . import dtypes
from .errors import WeightopsError, describe, shown

if TYPE_CHECKING:  # torch is imported where tensors are touched: a pass-through copy never needs it
    import numpy as np
    import torch

T = TypeVar("T")


@dataclass(frozen=True)
class TensorRef:
    """A tensor that is read only when `load()` is called.

    `source` names the file it comes from (for error messages). `ggml_type` is set for GGUF
    tensors, whose `load()` dequantizes to float32 and whose `raw()` gives the stored blocks.
    `span` is (file, byte offset) where the tensor's bytes lie exactly as a writer stores
    them, so a writer may copy them file to file inside the kernel; any derived tensor
    loses it. `mapped`: `load()` gives a view of a private file mapping nothing writes, whose
    pages a consumer may drop as it goes (`pages.drop_mapped`; touched again, they are read
    from the file); a derived tensor is not. `dtype_name` is the dtype in safetensors'
    spelling (see `dtypes`); `dtype` gives it as a torch dtype. `origin` names the source
    tensor a reference is computed from, when one read is shared (`SharedRead`); derived and
    renamed references keep it.
    """

    name: str
    shape: tuple[int, ...]
    dtype_name: str
    source: str
    loader: Callable[[], torch.Tensor] = field(repr=False, compare=False)
    ggml_type: str | None = None
    raw_loader: Callable[[], np.ndarray] | None = field(default=None, repr=False, compare=False)
    releaser: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    span: tuple[str, int] | None = field(default=None, repr=False, compare=False)
    mapped: bool = field(default=False, repr=False, compare=False)
    origin: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.dtype_name, str):
            raise TypeError(
                f"TensorRef {self.name!r}: dtype_name must be a name such as 'BF16' "
                f"(weightops.dtypes.name_of), not {self.dtype_name!r}"
            )

    def load(self) -> torch.Tensor:
        tensor = self._call(self.loader)
        if tuple(tensor.shape) != self.shape:
            raise WeightopsError(
                f"{shown(self.source)}: tensor {self.name!r} has shape {tuple(tensor.shape)}, header says {self.shape}"
            )
        return tensor

    def _call(self, fn: Callable[[], T]) -> T:
        """Run a loader; a failure (a file cut short, a transform that does not fit the
        data, a full disk under a spill file) becomes an error naming this file and tensor.
        Errors that already are WeightopsErrors pass as they are, so a derived tensor does
        not repeat its source's message."""
        try:
            return fn()
        except WeightopsError:
            raise
        except Exception as e:
            raise WeightopsError(f"{shown(self.source)}: tensor {self.name!r}: cannot load it: {describe(e)}") from e

    def release(self) -> None:
        """Tell the source this tensor's data is done with (drops its mapped pages from RSS;
        a computed tensor's memory may be reused for the next one, so do not use what
        `load()` returned after this)."""
        if self.releaser is not None:
            self.releaser()

    @property
    def dtype(self) -> torch.dtype:
        return dtypes.to_torch(self.dtype_name)

    @property
    def is_float(self) -> bool:
        return dtypes.is_float(self.dtype_name)

    @property
    def stored_type(self) -> str:
        """How the tensor is stored, as reports print it: the GGML type, or torch's dtype name."""
        return self.ggml_type or dtypes.torch_name(self.dtype_name)

    def raw(self) -> np.ndarray:
        """The tensor's bytes as stored (quantized blocks for GGUF), as uint8."""
        if self.raw_loader is not None:
            return self._call(self.raw_loader)
        return tensor_bytes(self.load())

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * dtypes.itemsize(self.dtype_name)

    def derive(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        *,
        name: str | None = None,
        shape: tuple[int, ...] | None = None,
        dtype: torch.dtype | None = None,
    ) -> TensorRef:
        """A new lazy reference whose data is `fn(self.load())`; declare any new shape/dtype."""
        upstream = self.load
        return replace(
            self,
            name=name or self.name,
            shape=tuple(shape) if shape is not None else self.shape,
            dtype_name=dtypes.name_of(dtype) if dtype is not None else self.dtype_name,
            loader=lambda: fn(upstream()),
            ggml_type=None,
            raw_loader=None,
            span=None,
            mapped=False,
        )

    def renamed(self, name: str) -> TensorRef:
        """The same data under another name (a load error still names the tensor as its file has it)."""
        return replace(self, name=name, loader=self.load)


Stream = Iterable[TensorRef]


class SharedRead:
    """One read of a stream's tensors for several consumers. `refs` are the tensors as the
    consumers see them (views derived from them work unchanged): each `load()` goes through a
    one-slot cache, so consumers asking for the same source tensor one after another get the
    one loaded tensor, and their `release()` does nothing. The driver that walks the sources
    calls `release()` when it moves on; loading another source tensor releases the cached one
    too. Consumers must not change a loaded tensor in place (none does: they compute new ones).
    Tensors are not `mapped` (a consumer must not drop pages another still reads) and have no
    `span` (they are written from the one loaded copy, not copied from the file again)."""

    def __init__(self, refs: Iterable[TensorRef]):
        self.sources = list(refs)
        self.refs = [
            replace(r, loader=partial(self._load, r), releaser=None, span=None, mapped=False, origin=r.name)
            for r in self.sources
        ]
        self._slot: tuple[TensorRef, torch.Tensor] | None = None

    def _load(self, source: TensorRef) -> torch.Tensor:
        if self._slot is not None and self._slot[0] is source:
            return self._slot[1]
        self.release()
        tensor = source.load()
        self._slot = (source, tensor)
        return tensor

    def release(self) -> None:
        """Drop the cached source tensor (and release its reference)."""
        if self._slot is not None:
            source, self._slot = self._slot[0], None
            source.release()


class BufferPool:
    """Output memory for the tensors an operator computes, reused once a consumer releases them.

    A stream computes one tensor after another of a few recurring sizes; allocating each anew
    maps fresh pages that the kernel must fault in and zero, which costs wall and CPU time
    (measured on make-delta: benchmarks/README.md). Buffers are raw bytes; a
    request is served by the smallest free buffer that fits, and at most `keep` free buffers
    are kept (a writer has two tensors in flight). A consumer must not use a tensor after calling its
    reference's `release()`.
    """

    def __init__(self, keep: int = 2):
        self._free: list[torch.Tensor] = []
        self._keep = keep
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(buffer to give back, uninitialised tensor of `shape` and `dtype` inside it)."""
        import torch

        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            buffer = self._free.pop(min(fits, key=lambda i: self._free[i].numel())) if fits else None
        if buffer is None:
            buffer = torch.empty(nbytes, dtype=torch.uint8)
        return buffer, buffer[:nbytes].view(dtype).view(shape)

    def give(self, buffer: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buffer)
            if len(self._free) > self._keep:  # drop the smallest (by index: == on tensors compares values)
                self._free.pop(min(range(len(self._free)), key=lambda i: self._free[i].numel()))


def tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """Raw little-endian bytes of a tensor in its own dtype (bf16 included), without copying twice."""
    import torch

    t = tensor.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy()


def cast(stream: Stream, dtype: torch.dtype | None) -> Iterator[TensorRef]:
    """Cast floating-point tensors to `dtype` (None keeps every dtype as it is)."""
    for ref in stream:
        if dtype is None or not ref.is_float or ref.dtype == dtype:
            yield ref
        else:
            yield ref.derive(lambda t: t.to(dtype), dtype=dtype)


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def require_unique(refs: list[TensorRef]) -> None:
    seen: dict[str, str] = {}
    for r in refs:
        if r.name in seen:
            raise WeightopsError(f"tensor {r.name!r} appears twice: in {shown(seen[r.name])} and {shown(r.source)}")
        seen[r.name] = r.source
