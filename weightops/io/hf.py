"""Hugging Face checkpoint directories: which files hold weights, which are config and
tokenizer files, and a writer that shards exactly as `save_pretrained` does."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ..stream import TensorRef
from .index import plan_shards, read_sharded, write_index
from .paths import member, members
from .safetensors import PlannedFile, fill, read_safetensors
from .torchbin import read_torch_bin

if TYPE_CHECKING:
    import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# Files that travel with the weights (config, generation settings, tokenizer).
AUX_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def aux_files(directory: Path) -> list[Path]:
    """The config and tokenizer files of `directory` (they are copied into outputs, so a link
    out of the directory is refused: it would publish a file the user never gave)."""
    return [p for n in AUX_FILES if (p := member(directory, n))]


def read_hf_dir(directory: Path) -> tuple[str, list[TensorRef], list[Path]]:
    """(format, tensor refs, weight files) of an HF directory, sharded or not."""
    if index := member(directory, SAFETENSORS_INDEX):
        refs, files = read_sharded(index, read_safetensors, "*.safetensors")
        return "hf-safetensors", refs, [index, *files]
    singles = members(directory, "*.safetensors")
    if len(singles) == 1:
        return "hf-safetensors", read_safetensors(singles[0]), singles
    if index := member(directory, BIN_INDEX):
        refs, files = read_sharded(index, read_torch_bin, "pytorch_model*.bin")
        return "hf-bin", refs, [index, *files]
    if single := member(directory, "pytorch_model.bin"):
        return "hf-bin", read_torch_bin(single), [single]
    raise FileNotFoundError(directory)


class HFWeights:
    """The weight files of an HF directory, planned before any data: `model.safetensors` or
    `model-0000i-of-0000N.safetensors` + index, sharded as transformers 5's `save_pretrained`
    shards (tensors in name order, `plan_shards`), so the shard boundaries (and bytes) match
    its output for the same tensors. Used as a context manager it holds every shard open,
    and a tensor may be `put` in any order into whichever shard holds it; the
    index is written on a clean exit. The index's `total_parameters` is the model's parameter
    count, which is the tensors' element count unless given (quantized tensors store
    parameters differently)."""

    def __init__(
        self, refs: Iterable[TensorRef], directory: Path, max_shard_size: int, total_parameters: int | None = None
    ):
        self.refs = sorted(refs, key=lambda r: r.name)
        self.directory = Path(directory)
        self.total_parameters = total_parameters
        shards = plan_shards(self.refs, max_shard_size)
        if len(shards) == 1:
            names = ["model.safetensors"]
        else:
            names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        self.files = [
            PlannedFile(shard, self.directory / name, metadata={"format": "pt"})
            for shard, name in zip(shards, names, strict=True)
        ]
        self._file_of = {r.name: f for f in self.files for r in f.refs}

    @property
    def paths(self) -> list[Path]:
        """Every file written: the shards, then the index when there are several."""
        return [f.path for f in self.files] + ([self.directory / SAFETENSORS_INDEX] if len(self.files) > 1 else [])

    def put(self, ref: TensorRef, tensor: torch.Tensor) -> None:
        self._file_of[ref.name].put(ref, tensor)

    def fill(self, on_tensor: Callable[[TensorRef], None] | None = None) -> None:
        """Write every tensor, shard after shard, each in name order (`safetensors.fill`),
        closing each shard when it is complete."""
        for f in self.files:
            fill(f, on_tensor)
            f.close()

    def __enter__(self) -> HFWeights:
        with contextlib.ExitStack() as opened:
            for f in self.files:
                f.open()
                opened.callback(f.abandon)
            opened.pop_all()
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        if kind is not None:
            for f in self.files:
                f.abandon()
            return
        for f in self.files:
            f.close()
        if len(self.files) > 1:
            weight_map = {r.name: f.path.name for f in self.files for r in f.refs}
            params = sum(r.numel for r in self.refs) if self.total_parameters is None else self.total_parameters
            meta = {"total_parameters": params, "total_size": sum(r.nbytes for r in self.refs)}
            write_index(self.directory / SAFETENSORS_INDEX, weight_map, meta)


def write_hf_weights(
    refs: Iterable[TensorRef],
    directory: Path,
    max_shard_size: int,
    on_tensor: Callable[[TensorRef], None] | None = None,
    total_parameters: int | None = None,
) -> list[Path]:
    """Write `refs` as the weight files of an HF directory (`HFWeights`), in name order."""
    with HFWeights(refs, directory, max_shard_size, total_parameters) as weights:
        weights.fill(on_tensor)
    return weights.paths


def copy_aux(files: Iterable[Path], directory: Path, config_update: dict | None = None) -> None:
    """Copy config/tokenizer files; `config_update` patches config.json (e.g. vocab_size)."""
    for f in files:
        if f.name == "config.json" and config_update:
            cfg = json.loads(f.read_text())
            cfg.update(config_update)
            (directory / f.name).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copyfile(f, directory / f.name)
