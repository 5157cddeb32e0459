"""Sharded checkpoints: size parsing, the shard plan `save_pretrained` uses, and reading an
index file with its parts checked against it (missing shard, missing or extra tensors)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from ..errors import WeightopsError, names_file, shown
from ..stream import TensorRef
from .paths import inside

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as transformers; KiB/MiB/GiB are binary)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", text.upper())
    if not m:
        raise WeightopsError(f"cannot read size {text!r}: use a number with KB/MB/GB/TB (decimal) or KiB/MiB/GiB")
    size = int(float(m.group(1)) * _UNITS[m.group(2) or ""])
    if size <= 0:
        raise WeightopsError(f"size {text!r} must be at least one byte")
    return size


def plan_shards(refs: list[TensorRef], max_bytes: int) -> list[list[TensorRef]]:
    """Group tensors into shards exactly as `save_pretrained` (huggingface_hub) does: fill in
    order, start a new shard when the next tensor would overflow, and put a tensor larger
    than the limit alone in a shard of its own."""
    shards: list[list[TensorRef]] = []
    current: list[TensorRef] = []
    size = 0
    for r in refs:
        if r.nbytes > max_bytes:
            shards.append([r])
            continue
        if size + r.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(r)
        size += r.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def write_index(path: Path, weight_map: dict[str, str], metadata: dict) -> None:
    with open(path, "w") as f:
        f.write(json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")


@names_file("index file")
def read_sharded(
    index_path: Path, read_file: Callable[[Path], list[TensorRef]], part_glob: str
) -> tuple[list[TensorRef], list[Path]]:
    """Read every part an index names and check the parts against the index (a part file
    matching `part_glob` that the index never names is an error too: its tensors would be lost).
    Part names must stay inside the index's directory (`paths.inside`)."""
    weight_map = read_weight_map(index_path)
    root = index_path.parent
    first: dict[str, str] = {}  # part file -> a tensor the index puts there (named in errors)
    for tensor, fname in weight_map.items():
        first.setdefault(fname, tensor)
    files = sorted(first)
    for fname in files:
        inside(root, fname, f"{index_path}: weight_map entry {first[fname]!r}")
    missing_files = [f for f in files if not (root / f).is_file()]
    if missing_files:
        raise WeightopsError(
            f"{index_path}: names shard files that do not exist: {', '.join(shown(f) for f in missing_files)}"
        )
    refs: list[TensorRef] = []
    problems = [
        f"{shown(p.name)} is not named by the index" for p in sorted(root.glob(part_glob)) if p.name not in files
    ]
    for fname in files:
        part = read_file(root / fname)
        names = {r.name for r in part}
        wanted = {k for k, v in weight_map.items() if v == fname}
        for name in sorted(wanted - names):
            problems.append(f"index puts {name!r} in {shown(fname)}, which does not contain it")
        for name in sorted(names - wanted):
            where = weight_map.get(name)
            problems.append(
                f"{shown(fname)} contains {name!r}, which the index "
                + (f"places in {shown(where)}" if where else "does not list")
            )
        refs.extend(r for r in part if weight_map.get(r.name) == fname)
    if problems:
        raise WeightopsError(f"{index_path}: index and shards disagree:\n  " + "\n  ".join(problems))
    return refs, [root / f for f in files]


def read_weight_map(index_path: Path) -> dict[str, str]:
    """An index's `weight_map` (tensor name -> part file name), refused unless it is a
    non-empty object of strings: an empty one would make a model of zero tensors."""
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise WeightopsError(f"{index_path}: not a valid index file ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict):
        raise WeightopsError(f"{index_path}: weight_map is a {type(weight_map).__name__}, not an object")
    if not weight_map:
        raise WeightopsError(f"{index_path}: weight_map is empty; an index must name the tensors of the model")
    bad = [k for k, v in weight_map.items() if not isinstance(v, str)]
    if bad:
        raise WeightopsError(f"{index_path}: weight_map entry {bad[0]!r} is {weight_map[bad[0]]!r}, not a file name")
    return weight_map
