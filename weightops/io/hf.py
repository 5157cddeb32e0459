"""Hugging Face checkpoint directories: which files hold weights, which are config and
tokenizer files, and a writer that shards exactly as `save_pretrained` does."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from ..stream import TensorRef
from .index import plan_shards, read_sharded, write_index
from .paths import member, members
from .safetensors import read_safetensors, write_safetensors
from .torchbin import read_torch_bin

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


def write_hf_weights(
    refs: Iterable[TensorRef],
    directory: Path,
    max_shard_size: int,
    on_tensor: Callable[[TensorRef], None] | None = None,
    total_parameters: int | None = None,
) -> list[Path]:
    """Write `model.safetensors` or `model-0000i-of-0000N.safetensors` + index into `directory`.

    Tensors are taken in name order, as transformers 5's `save_pretrained` does before
    sharding, so the shard boundaries (and bytes) match its output for the same tensors.
    The index's `total_parameters` is the model's parameter count, which is the tensors'
    element count unless given (quantized tensors store parameters differently).
    """
    refs = sorted(refs, key=lambda r: r.name)
    shards = plan_shards(refs, max_shard_size)
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for shard, name in zip(shards, names, strict=True):
        write_safetensors(shard, directory / name, metadata={"format": "pt"}, on_tensor=on_tensor)
    written = [directory / n for n in names]
    if len(shards) > 1:
        weight_map = {r.name: name for shard, name in zip(shards, names, strict=True) for r in shard}
        params = sum(r.numel for r in refs) if total_parameters is None else total_parameters
        meta = {"total_parameters": params, "total_size": sum(r.nbytes for r in refs)}
        write_index(directory / SAFETENSORS_INDEX, weight_map, meta)
        written.append(directory / SAFETENSORS_INDEX)
    return written


def copy_aux(files: Iterable[Path], directory: Path, config_update: dict | None = None) -> None:
    """Copy config/tokenizer files; `config_update` patches config.json (e.g. vocab_size)."""
    for f in files:
        if f.name == "config.json" and config_update:
            cfg = json.loads(f.read_text())
            cfg.update(config_update)
            (directory / f.name).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copyfile(f, directory / f.name)
