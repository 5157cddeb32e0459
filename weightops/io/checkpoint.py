"""A checkpoint = tensors + config + tokenizer files, whatever its on-disk format.

`open_checkpoint` detects the format from the path (directory contents, suffix, GGUF
magic) and returns lazy references; `save_hf` writes a complete HF directory atomically.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from .. import arch, progress
from ..errors import WeightopsError
from ..stream import TensorRef, require_unique
from . import gguf as gguf_io
from . import gguf_split
from . import hf as hf_io
from . import tencentpretrain as tp_io
from .config import read_config
from .index import parse_size
from .outputs import Output, content
from .paths import member, members
from .safetensors import read_safetensors
from .torchbin import read_torch_bin


class Format(str, Enum):
    """On-disk checkpoint formats (the value is what reports and messages show)."""

    HF_SAFETENSORS = "hf-safetensors"
    HF_BIN = "hf-bin"
    TENCENTPRETRAIN = "tencentpretrain"
    GGUF = "gguf"

    def __str__(self) -> str:
        return self.value

    @property
    def is_hf(self) -> bool:
        """Hugging Face names and config.json (either weight file format)."""
        return self in (Format.HF_SAFETENSORS, Format.HF_BIN)

    @property
    def scheme(self) -> str:
        """The tensor naming scheme of the architecture specs (`arch.ArchSpec`) it uses."""
        return {Format.TENCENTPRETRAIN: "tp", Format.GGUF: "gguf"}.get(self, "hf")


@dataclass
class Checkpoint:
    path: Path
    format: Format
    tensors: list[TensorRef]
    weight_files: list[Path]
    aux_files: list[Path] = field(default_factory=list)
    config: dict[str, Any] | None = None  # HF config.json, TP model config, or GGUF metadata
    architecture: str | None = None
    config_file: Path | None = None  # where `config` was read (named in errors)

    def tensor(self, name: str) -> TensorRef:
        for r in self.tensors:
            if r.name == name:
                return r
        raise WeightopsError(f"{self.path}: no tensor named {name!r}")

    def names(self) -> list[str]:
        return [r.name for r in self.tensors]

    @property
    def directory(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent


def open_checkpoint(path: str | Path, tp_config: str | Path | None = None) -> Checkpoint:
    """Open any supported checkpoint lazily; nothing but headers is read."""
    path = gguf_split.first_split(path)  # OUT.gguf names the split set written for it
    if not path.exists():
        raise WeightopsError(f"{path}: no such file or directory")
    if path.is_file():
        ckpt = _open_file(path)
    else:
        ckpt = _open_dir(path)
    if not ckpt.tensors:
        raise WeightopsError(
            f"{path}: holds no tensors ({', '.join(map(str, ckpt.weight_files))}); not a model checkpoint"
        )
    require_unique(ckpt.tensors)
    if tp_config is None and ckpt.format is Format.TENCENTPRETRAIN:
        tp_config = member(ckpt.directory, tp_io.CONFIG)  # written beside it by `weightops convert`
    if tp_config is not None:
        ckpt.config, ckpt.config_file = read_config(Path(tp_config)), Path(tp_config)
    if ckpt.architecture is None:
        found = arch.detect(set(ckpt.names()), ckpt.format.scheme)
        ckpt.architecture = found.name if found else None
    return ckpt


def _open_file(path: Path) -> Checkpoint:
    if gguf_io.is_gguf(path):
        headers = gguf_split.open_set(path)  # [the header], or every split's, checked as one model
        meta = gguf_io.read_metadata(path, headers[0])
        return Checkpoint(
            path,
            Format.GGUF,
            [ref for h in headers for ref in gguf_io.read_gguf(h.path, h)],
            [h.path for h in headers],
            config=meta,
            architecture=meta.get("general.architecture"),
            config_file=path,
        )
    if path.suffix == ".safetensors":
        return Checkpoint(
            path,
            Format.HF_SAFETENSORS,
            read_safetensors(path),
            [path],
            hf_io.aux_files(path.parent),
            *_hf_config(path.parent),
        )
    if path.suffix in (".bin", ".pt", ".pth"):
        refs = read_torch_bin(path)
        if tp_io.looks_like_tp(r.name for r in refs):
            return Checkpoint(path, Format.TENCENTPRETRAIN, refs, [path])
        return Checkpoint(path, Format.HF_BIN, refs, [path], hf_io.aux_files(path.parent), *_hf_config(path.parent))
    raise WeightopsError(f"{path}: unknown checkpoint format (expected .safetensors, .bin, or a GGUF file)")


def _hf_config(directory: Path) -> tuple[dict | None, str | None, Path | None]:
    cfg_path = member(directory, "config.json")
    if cfg_path is None:
        return None, None, None
    cfg = read_config(cfg_path)
    return cfg, cfg.get("model_type"), cfg_path


def _open_dir(path: Path) -> Checkpoint:
    if (path / tp_io.INDEX).is_file():
        refs, files = tp_io.read_tp(path)
        return Checkpoint(path, Format.TENCENTPRETRAIN, refs, files, hf_io.aux_files(path))
    try:
        fmt, refs, files = hf_io.read_hf_dir(path)
    except FileNotFoundError:
        bins = members(path, "*.bin")
        if len(bins) == 1:
            refs = read_torch_bin(bins[0])
            if tp_io.looks_like_tp(r.name for r in refs):
                return Checkpoint(path, Format.TENCENTPRETRAIN, refs, bins, hf_io.aux_files(path))
        ggufs = members(path, "*.gguf")
        one = ggufs[0] if len(ggufs) == 1 else gguf_split.one_set(ggufs)  # a split set: its first file
        if one is not None:
            return _open_file(one)
        raise WeightopsError(
            f"{path}: no checkpoint found (looked for *.safetensors, pytorch_model.bin, "
            f"their index files, {tp_io.INDEX}, a TencentPretrain .bin, one .gguf or one GGUF split set)"
        ) from None
    return Checkpoint(path, Format(fmt), refs, files, hf_io.aux_files(path), *_hf_config(path))


def save_hf(
    refs: Iterable[TensorRef],
    output: str | Path | Output,
    *,
    aux_files: Iterable[Path] = (),
    inputs: Iterable[Path] = (),
    force: bool = False,
    max_shard_size: str | int = "5GB",
    config_update: dict | None = None,
    extra_files: dict[str, str | bytes] | None = None,
    desc: str = "writing",
    total_parameters: int | None = None,
) -> list[Path]:
    """Stream `refs` into a new HF directory at `output`, atomically.

    Config and tokenizer files are copied from `aux_files` (`config_update` patches
    config.json); `extra_files` adds generated files by name; `total_parameters` overrides
    the sharded index's parameter count (default: the tensors' element count). `output` is a
    path (checked against `inputs`; an existing one is replaced only with `force`, and only
    when weightops wrote it), or an `Output` the caller planned before its own work.
    """
    target = output if isinstance(output, Output) else Output(output, inputs, kind="dir", force=force)
    refs = list(refs)
    with (
        hf_writing(
            refs,
            target,
            max_shard_size,
            total_parameters,
            aux_files=aux_files,
            config_update=config_update,
            extra_files=extra_files,
        ) as weights,
        progress.bar(sum(r.nbytes for r in refs), desc) as b,
    ):
        weights.fill(on_tensor=lambda r: b.update(r.nbytes))
    return content(target.path)


@contextmanager
def hf_writing(
    refs: Iterable[TensorRef],
    target: Output,
    max_shard_size: str | int = "5GB",
    total_parameters: int | None = None,
    *,
    aux_files: Iterable[Path] = (),
    config_update: dict | None = None,
    extra_files: dict[str, str | bytes] | None = None,
) -> Iterator[hf_io.HFWeights]:
    """The HF directory `save_hf` writes, opened: every weight file planned and open in the
    target's temporary, for the caller to fill (`HFWeights.put`, in any order, or `fill`);
    on a clean exit the index, config and tokenizer files are added and `target` published."""
    refs = list(refs)
    require_unique(refs)
    limit = parse_size(max_shard_size)
    with target.writing() as tmp:
        with hf_io.HFWeights(refs, tmp, limit, total_parameters) as weights:
            yield weights
        hf_io.copy_aux(aux_files, tmp, config_update)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data.encode() if isinstance(data, str) else data)
