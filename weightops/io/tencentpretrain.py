"""TencentPretrain checkpoints: a plain `torch.save` state dict, one file or the sharded
layout of TencentPretrain's `convert_model_into_blocks.py`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from ..stream import TensorRef
from .index import plan_shards, read_sharded, write_index
from .paths import member, members
from .torchbin import read_torch_bin, write_torch_bin

INDEX = "tencentpretrain_model.bin.index.json"
SINGLE = "tencentpretrain_model.bin"
# The model config json weightops writes beside a converted checkpoint (TencentPretrain's --config_path).
CONFIG = "tencentpretrain_config.json"
TP_PREFIXES = ("embedding.", "encoder.", "target.")


def looks_like_tp(names: Iterable[str]) -> bool:
    names = list(names)
    return bool(names) and all(n.startswith(TP_PREFIXES) for n in names)


def read_tp(path: Path) -> tuple[list[TensorRef], list[Path]]:
    """A TP file, a directory with the sharded index, or a directory with one `.bin`."""
    path = Path(path)
    if path.is_file():
        return read_torch_bin(path), [path]
    if index := member(path, INDEX):
        refs, files = read_sharded(index, read_torch_bin, "tencentpretrain_model*.bin")
        return refs, [index, *files]
    bins = members(path, "*.bin")
    if len(bins) == 1:
        return read_torch_bin(bins[0]), bins
    raise FileNotFoundError(path)


def write_tp(
    refs: Iterable[TensorRef],
    directory: Path,
    max_shard_size: int | None,
    on_tensor: Callable[[TensorRef], None] | None = None,
) -> list[Path]:
    """`tencentpretrain_model.bin`, or `tencentpretrain_model-N.bin` parts + index when the
    model is larger than `max_shard_size` (None: always one file)."""
    refs = list(refs)
    shards = plan_shards(refs, max_shard_size) if max_shard_size else [refs]
    if len(shards) == 1:
        write_torch_bin(refs, directory / SINGLE, on_tensor=on_tensor)
        return [directory / SINGLE]
    names = [f"tencentpretrain_model-{i}.bin" for i in range(len(shards))]
    for shard, name in zip(shards, names, strict=True):
        write_torch_bin(shard, directory / name, on_tensor=on_tensor)
    write_index(
        directory / INDEX,
        {r.name: n for s, n in zip(shards, names, strict=True) for r in s},
        {"total_size": sum(r.nbytes for r in refs)},
    )
    return [*(directory / n for n in names), directory / INDEX]
