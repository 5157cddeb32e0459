"""PyTorch `.bin` files (HF and TencentPretrain state dicts).

Reading goes through `torch.load(mmap=True, weights_only=True)`: tensors are memory-mapped
and a pickle that asks to run code is refused, never executed. Writing streams: the
pickle of the state dict only names its storages, so it is written first and each tensor's
bytes follow one at a time — the file equals `torch.save(state_dict)` byte for byte without
the state dict ever being in memory.
"""

from __future__ import annotations

import collections
import io
import pickle
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING, cast

from .. import dtypes
from ..errors import WeightopsError, names_file, shown, writing
from ..stream import TensorRef
from .pages import drop_mapped

if TYPE_CHECKING:  # imported where used, so that opening a safetensors checkpoint never loads torch
    import torch

_STORAGE_ALIGNMENT = 64


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Memory-map a torch checkpoint, refusing any pickle that would run code."""
    import torch

    try:
        try:
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightopsError(
            f"{path}: refusing to unpickle: the file asks to run code or build objects that "
            f"are not plain tensors ({first}). weightops never executes pickled code; "
            "re-save it with safetensors from a trusted environment."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise WeightopsError(f"{path}: not a readable PyTorch checkpoint: {e}") from None
    if not isinstance(sd, dict):
        raise WeightopsError(f"{path}: holds a {type(sd).__name__}, not a state dict of tensors")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightopsError(f"{path}: entries that are not tensors: {', '.join(shown(k) for k in bad[:10])}")
    for k, v in sd.items():  # complex or quantized tensors would be cast to real numbers, losing data
        if dtypes.name_of(v.dtype) not in dtypes.SAFETENSORS_NAMES:
            raise WeightopsError(
                f"{path}: tensor '{shown(k)}' is {str(v.dtype).removeprefix('torch.')}, "
                "which weightops does not handle (supported: real and integer dtypes)"
            )
    return sd


@names_file("PyTorch checkpoint")
def read_torch_bin(path: Path) -> list[TensorRef]:
    """Lazy references to the tensors of one `.bin` file, in its order (the data stays
    mapped; `release()` drops a consumed tensor's pages from RSS)."""
    path = Path(path)
    sd = load_state_dict(path)
    return [_mapped_ref(path, k, v) for k, v in sd.items()]


def _mapped_ref(path: Path, name: str, t: torch.Tensor) -> TensorRef:
    """A reference to one mapped tensor (a function, so that each closure keeps its own `t`)."""
    return TensorRef(
        name=name,
        shape=tuple(t.shape),
        dtype_name=dtypes.name_of(t.dtype),
        source=str(path),
        loader=lambda: t,
        releaser=lambda: drop_mapped(t.data_ptr(), t.nbytes),
    )


class _Storage:
    """Stands for a tensor's storage in the pickle; its bytes are written later."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _Tensor:
    """Pickles exactly like a contiguous CPU tensor of that shape and dtype."""

    def __init__(self, storage: _Storage, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol):
        import torch

        stride, acc = [], 1
        for d in reversed(self.shape):
            stride.append(acc)
            acc *= d
        return (
            torch._utils._rebuild_tensor_v2,
            (self.storage, 0, tuple(self.shape), tuple(reversed(stride)), False, collections.OrderedDict()),
        )


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        import torch

        if isinstance(obj, _Storage):
            storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[obj.dtype])
            return ("storage", storage_type, obj.key, "cpu", obj.numel)
        return None


class _Sink:
    """The file torch's zip writer writes through, so that no Python exception ever unwinds
    through the C++ writer and a failed write cannot abort the process.

    A failing write (a full disk, Ctrl-C arriving in it) is kept, not raised, and
    `write_torch_bin` raises it once the record returns. Once abandoned, writes go nowhere:
    the writer finalises its zip when it is destroyed, which may be after the file is
    closed, and a write to a closed file there ends in `std::terminate` (exit 134).
    """

    def __init__(self, file: io.BufferedWriter):
        self.file, self.abandoned = file, False
        self.error: BaseException | None = None

    def _guarded(self, op: Callable[[], object]) -> None:
        if self.abandoned or self.error is not None:
            return
        try:
            op()
        except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt too: re-raised in Python, not in C++
            self.error = e

    def write(self, data: memoryview) -> None:
        self._guarded(lambda: self.file.write(data))

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> None:
        self._guarded(lambda: self.file.seek(offset, whence))

    def check(self) -> None:
        if self.error is not None:
            raise self.error


def write_torch_bin(
    refs: Iterable[TensorRef], path: Path, on_tensor: Callable[[TensorRef], None] | None = None
) -> None:
    """Write a state dict as `torch.save` would, one tensor in memory at a time. On any
    failure the writer is abandoned cleanly and the exception propagates (the caller
    removes the partial file)."""
    import torch

    refs = list(refs)
    storages = [_Storage(str(i), r.dtype, r.numel) for i, r in enumerate(refs)]
    state = collections.OrderedDict((r.name, _Tensor(s, r.shape)) for r, s in zip(refs, storages, strict=True))
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(state)
    data = buf.getvalue()
    with writing(path), open(path, "wb") as stream:
        sink = _Sink(stream)
        # cast: torch's writer takes any object with write() for its buffer, not only an IO
        writer = torch._C.PyTorchFileWriter(cast("IO[bytes]", sink), True, _STORAGE_ALIGNMENT)

        def record(name: str, payload, size: int) -> None:
            writer.write_record(name, payload, size)
            sink.check()

        try:
            record("data.pkl", data, len(data))
            record(".format_version", "1", 1)
            alignment = str(_STORAGE_ALIGNMENT)
            record(".storage_alignment", alignment, len(alignment))
            record("byteorder", sys.byteorder, len(sys.byteorder))
            for ref, storage in zip(refs, storages, strict=True):
                with writing(path, ref.name):
                    t = ref.load()
                    if t.dtype != ref.dtype:
                        raise WeightopsError(
                            f"tensor {ref.name!r} from {shown(ref.source)}: produced {t.dtype}, declared {ref.dtype}"
                        )
                    t = t.detach().cpu().contiguous()
                    if t.untyped_storage().nbytes() != ref.nbytes or t.storage_offset():
                        t = t.clone()
                    record(f"data/{storage.key}", t.untyped_storage(), ref.nbytes)
                if on_tensor:
                    on_tensor(ref)
                del t
                ref.release()
            writer.write_end_of_file()
            sink.check()
        except BaseException:
            sink.abandoned = True
            try:  # marks the writer finalised, so its destructor writes nothing
                writer.write_end_of_file()
            except Exception:  # noqa: BLE001, S110 - the zip is discarded; what went wrong is being raised
                pass
            raise
