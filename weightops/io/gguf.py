"""GGUF files (llama.cpp): a lazy reader and a streaming writer.

Reader: the header is parsed within the file's size by `gguf_header` (not gguf-py's
GGUFReader, whose cost grows with every array item); tensors stay memory-mapped, `load()`
dequantizes to float32 with `gguf.quants`, `raw()` gives the stored blocks.
Writer: every tensor's byte size follows from its shape and type, so header, metadata and
tensor infos are written first and the data follows one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import WeightopsError, names_file
from ..stream import TensorRef
from .gguf_header import Header, read_header
from .output_set import OutputSet
from .outputs import Output

if TYPE_CHECKING:  # gguf (with numpy) and torch are slow to import: loaded only for GGUF work
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, GGUFWriter

MAGIC = b"GGUF"
# The llama.cpp whose GGUF layout, tensor type rules and kernels weightops follows and whose
# runtime checks its files: the one vendored in the llama-cpp-python release we test against.
LLAMA_CPP_COMMIT = "0c1e57098"
LLAMA_CPP_VENDORED_IN = "llama-cpp-python 0.3.36"
LLAMA_CPP_PIN = f"llama.cpp {LLAMA_CPP_COMMIT} (as vendored in {LLAMA_CPP_VENDORED_IN})"


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def open_reader(path: Path) -> Header:
    """The checked header of a GGUF file (`gguf_header`: bounded by the file's size)."""
    return read_header(path)


def read_metadata(path: Path, reader: Header | None = None) -> dict[str, Any]:
    """Key -> value (strings decoded; arrays as lazy sequences that compare equal to lists)."""
    return dict((reader or open_reader(path)).metadata)


@names_file("GGUF file")
def read_gguf(path: Path, reader: Header | None = None) -> list[TensorRef]:
    """Lazy references in file order; shapes in torch order (GGUF stores them reversed)."""
    path = Path(path)
    header = reader or open_reader(path)
    refs = []
    for t in header.tensors:

        def raw(t=t) -> np.ndarray:
            import numpy as np

            return np.frombuffer(header.map, dtype=np.uint8, count=t.nbytes, offset=t.offset)

        def load(t=t, raw=raw) -> torch.Tensor:
            import numpy as np
            import torch
            from gguf.quants import dequantize, quant_shape_to_byte_shape

            blocks = raw().reshape(quant_shape_to_byte_shape(t.shape or (1,), t.ggml_type))
            values = dequantize(blocks, t.ggml_type)
            return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(t.shape)

        refs.append(
            TensorRef(
                name=t.name,
                shape=t.shape,
                dtype_name="F32",
                source=str(path),
                loader=load,
                ggml_type=t.ggml_type.name,
                raw_loader=raw,
            )
        )
    return refs


def ggml_nbytes(shape: Sequence[int], qtype: GGMLQuantizationType) -> int:
    """Bytes of a tensor of `shape` (torch order) stored as `qtype`."""
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    numel = 1
    for d in shape:
        numel *= d
    if shape and shape[-1] % block:
        raise WeightopsError(f"a row of {shape[-1]} values cannot be stored as {qtype.name} (blocks of {block})")
    return numel // block * size


@dataclass(frozen=True)
class GGUFTensor:
    """A tensor planned for a GGUF file. `produce()` yields its stored bytes, in order, in one
    or more pieces (so a huge embedding never needs a full float32 copy), only when written;
    `release()` runs once they are written (to drop the source's mapped pages)."""

    name: str
    shape: tuple[int, ...]  # torch order; the file stores it reversed
    ggml_type: GGMLQuantizationType
    produce: Callable[[], Iterable[np.ndarray]]
    release: Callable[[], None] | None = None

    @property
    def nbytes(self) -> int:
        return ggml_nbytes(self.shape, self.ggml_type)


def plan_writer(arch: str, tensors: Sequence[GGUFTensor], split: Split | None = None) -> GGUFWriter:
    """A `GGUFWriter` that knows every tensor's name, shape and type, in file order (so offsets
    and the parameter count are known) but holds no data; the caller adds the metadata. With
    `split`, the tensors are assigned to the files of a split set here, as GGUFWriter assigns
    them (see `gguf_split`): `writer.tensors` holds one dict per file."""
    import numpy as np
    from gguf import GGUFWriter

    split = split or Split()
    writer = GGUFWriter(None, arch, split_max_tensors=split.max_tensors, split_max_size=split.max_size)
    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.ggml_type)
    if len(writer.tensors) == 1:  # GGUFWriter would log that the model "fails split requirements"
        writer.split_max_tensors = writer.split_max_size = 0
    return writer


@dataclass(frozen=True)
class Split:
    """How to split a GGUF file (0: no limit): `max_size` bytes of tensor data per file
    (unpadded, metadata not counted), `max_tensors` tensors per file."""

    max_size: int = 0
    max_tensors: int = 0

    @staticmethod
    def parse(max_size: str | int | None = None, max_tensors: int | None = None) -> Split | None:
        """From the command's options; None when neither is given."""
        from .gguf_split import parse_split_size

        if max_size is None and max_tensors is None:
            return None
        if max_tensors is not None and max_tensors < 1:
            raise WeightopsError(f"--split-max-tensors {max_tensors}: must be at least 1")
        return Split(parse_split_size(max_size) if max_size is not None else 0, max_tensors or 0)


def plan_output(
    path: str | Path,
    inputs: Iterable[Path | str | None] = (),
    *,
    may_split: bool,
    force: bool = False,
    resume: bool = False,
) -> OutputSet:
    """The output slot of a GGUF export to `path` (the file, or the split set of its stem),
    planned before any work (see `io.output_set`); `may_split`: a split option was given;
    `resume`: keep a killed run's temporaries to continue."""
    from .gguf_split import SET_XATTR, in_slot

    target = Path(path)
    return OutputSet(
        target,
        inputs,
        belongs=lambda name: in_slot(target, name),
        set_id_xattr=SET_XATTR,
        may_split=may_split,
        force=force,
        resume=resume,
    )


def move_keys_to_end(writer: GGUFWriter, keys: Sequence[str]) -> None:
    """Re-append `keys` after the others, in this order (what `gguf_set_val_*` does to a key a
    file already has: llama-quantize's general.quantization_version and general.file_type)."""
    kv = writer.kv_data[0]
    for key in keys:
        kv[key] = kv.pop(key)


def write_gguf(
    writer: GGUFWriter,
    tensors: Sequence[GGUFTensor],
    output: str | Path | Output | OutputSet,
    on_tensor: Callable[[GGUFTensor], None] | None = None,
) -> list[Path]:
    """Write header, metadata and tensor infos of every file (file order: as `writer` was
    planned, one file or a split set), then each tensor's bytes at its offset in its file, in
    the order of `tensors` (the order they are read in, which may differ from the file's), each
    padded to the 32-byte alignment as GGUFWriter pads, into temporaries that become the output
    only at the end (all files of a set, or none). `output` is a path, or an `Output` /
    `OutputSet` the caller planned (and checked against its inputs) before its own work.
    Returns the files published, the one readers open first. (Several outputs from one stream,
    resumable: `io.gguf_partial`.)"""
    from .gguf_partial import PartialGGUF, write_tensor

    several = len(writer.tensors) > 1
    if isinstance(output, OutputSet):
        target: Output | OutputSet = output
    elif isinstance(output, Output):
        if several:
            raise ValueError("write_gguf: a split set needs an OutputSet (plan_output)")
        target = output
    else:
        target = plan_output(output, may_split=True) if several else Output(output, kind="file")
    if sorted(n for infos in writer.tensors for n in infos) != sorted(t.name for t in tensors):
        raise ValueError("write_gguf: the tensors are not the ones the writer was planned with")
    out = PartialGGUF(writer, target.path)
    temporary = target.writing(several) if isinstance(target, OutputSet) else target.writing()
    with temporary as tmp:
        try:
            out.open(tmp)
            for t in tensors:
                write_tensor([out], t.name, t.shape, t.ggml_type, t.produce())
                if t.release:
                    t.release()
                if on_tensor:
                    on_tensor(t)
            out.finish()
        finally:
            out.close()
    return target.published() if isinstance(target, OutputSet) else [target.path]
