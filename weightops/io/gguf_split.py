"""GGUF split sets (llama.cpp's `NAME-00001-of-00003.gguf` ...): names, the split size, and
opening a set as one model with every check llama.cpp's loader makes, plus two of our own.

Layout (what `GGUFWriter` — convert_hf_to_gguf.py's writer — makes, which weightops follows byte
for byte): tensors go to files in file order; a file takes the next tensor unless that would
put more than `split_max_tensors` tensors in it, or more than `split_max_size` bytes of tensor
data (unpadded; metadata is not counted), and every file holds at least one tensor. The first
file carries every key and the split keys appended last (`split.no` u16, `split.count` u16,
`split.tensors.count` i32); the others only the three split keys. Offsets are per file.

Reading refuses what llama.cpp refuses (a later split given instead of the first, a file
missing, `split.no` out of place, duplicate tensors, a tensor count that disagrees with
`split.tensors.count`) and, before llama.cpp would notice, a file whose `split.count` or
`split.tensors.count` differs from the first's, and a file that a different weightops run
published (the `user.weightops.set` attribute every file of one publication carries).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import WeightopsError, shown
from .gguf_header import MAGIC, Header, read_header

SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = "split.no", "split.count", "split.tensors.count"
SET_XATTR = "user.weightops.set"  # one random id per publication, on every file of the set
_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_SIZE = re.compile(r"^(?P<n>\d+)(?P<unit>[KMG]?)$")
_UNITS = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3}
# The Hugging Face Hub refuses files over 200 GB (since January 2026). A split size counts tensor
# data only, so the jobs' default leaves 1 GB for the first file's metadata (a vocabulary is MBs).
HUB_FILE_LIMIT = 200 * 10**9
HUB_SPLIT_SIZE = "199G"


def split_name(prefix: str, index: int, count: int) -> str:
    """The name of file `index` (0-based) of `count`: llama.cpp's `%s-%05d-of-%05d.gguf`, 1-based."""
    return f"{prefix}-{index + 1:05d}-of-{count:05d}.gguf"


def parse_split_size(text: str | int) -> int:
    """`--split-max-size`: bytes, or a whole number of K, M or G (decimal: 1K = 1000 bytes),
    as convert_hf_to_gguf.py reads it (lower-case units are taken too)."""
    m = _SIZE.match(str(text).strip().upper())
    if not m:
        raise WeightopsError(
            f"--split-max-size {text!r}: give bytes or a whole number of K, M or G (decimal units, e.g. 50G)"
        )
    n = int(m.group("n")) * _UNITS[m.group("unit")]
    if n <= 0:
        raise WeightopsError(f"--split-max-size {text!r}: must be more than 0 bytes")
    return n


def is_first_split(name: str) -> bool:
    m = _NAME.match(name)
    return m is not None and m.group("no") == "00001"


def one_set(files: list[Path]) -> Path | None:
    """The first file when `files` are all splits of one prefix and count (a directory holding
    one split set), else None."""
    matches = [_NAME.match(f.name) for f in files]
    found = {(m.group("prefix"), m.group("count")) for m in matches if m is not None}
    if len(found) != 1 or None in matches:
        return None
    ((prefix, count),) = found
    return files[0].with_name(split_name(prefix, 0, int(count)))


def in_slot(output: Path, name: str) -> bool:
    """Whether a file called `name` beside `output` is (or may be) part of what a GGUF export to
    `output` publishes: `output` itself or a split of its stem (any count)."""
    if name == output.name:
        return True
    m = _NAME.match(name)
    return m is not None and m.group("prefix") == output.stem


def slot_files(output: Path) -> list[Path]:
    """What an earlier export to `output` left: the file itself and any split of its stem."""
    parent = Path(output).parent
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir() if in_slot(Path(output), p.name))


def first_split(path: str | Path) -> Path:
    """The file a reader opens for `path`: `path` itself when it exists, else the first file of
    the split set written for it (`OUTPUT.gguf` -> `OUTPUT-00001-of-0000N.gguf`), so that the
    name an export was given keeps naming the model it wrote."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        return path
    firsts = [p for p in slot_files(path) if is_first_split(p.name)]
    if len(firsts) > 1:
        raise WeightopsError(
            f"{path}: no such file, and {len(firsts)} split sets were written for it "
            f"({', '.join(p.name for p in firsts)}); name the first file of the one you mean"
        )
    return firsts[0] if firsts else path


def _set_id(path: Path) -> bytes | None:
    try:
        return os.getxattr(path, SET_XATTR)
    except OSError:
        return None


def _key(header: Header, key: str) -> int | None:
    value = header.metadata.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def set_files(path: Path) -> list[Path]:
    """The files of the model `path` names, for hashing: those of its split set that exist,
    from the first file's `split.count` (a broken set is refused when it is opened as a model,
    and a manifest check then names each missing file), else `[path]`."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != MAGIC:
                return [path]
        count = _key(read_header(path), SPLIT_COUNT)
    except (OSError, WeightopsError):
        return [path]
    m = _NAME.match(path.name)
    if count is None or count <= 1 or m is None:
        return [path]
    names = [path.with_name(split_name(m.group("prefix"), i, count)) for i in range(count)]
    return [p for p in names if p.is_file()]


def open_set(path: Path, first: Header | None = None) -> list[Header]:
    """The headers of every file of the model `path` names: `[header]` for a single file, the
    checked headers of all its splits in order for the first file of a split set."""
    path = Path(path)
    head = first or read_header(path)
    count = _key(head, SPLIT_COUNT)
    if count is None or count <= 1:
        return [head]
    no = _key(head, SPLIT_NO)
    m = _NAME.match(path.name)
    if no != 0:
        where = f"; open the first one: {path.with_name(split_name(m.group('prefix'), 0, count))}" if m else ""
        raise WeightopsError(
            f"{path}: this is split {no if no is None else no + 1} of {count} of a GGUF split set; a split set is "
            f"opened by its first file (llama.cpp: 'model must be loaded with the first split'){where}"
        )
    if not m or int(m.group("no")) != 1 or int(m.group("count")) != count:
        raise WeightopsError(
            f"{path}: the first file of a GGUF split set of {count} must be named "
            f"PREFIX-00001-of-{count:05d}.gguf (llama.cpp finds the other files by that name)"
        )
    paths = [path.with_name(split_name(m.group("prefix"), i, count)) for i in range(count)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise WeightopsError(
            f"GGUF split set {path}: {len(missing)} of its {count} files missing: "
            + ", ".join(shown(p) for p in missing[:8])
            + (" ..." if len(missing) > 8 else "")
        )
    total = _key(head, SPLIT_TENSORS)
    set_id = _set_id(path)
    headers, seen = [head], {t.name: path for t in head.tensors}
    for i, p in enumerate(paths[1:], 1):
        h = read_header(p)
        said = {k: _key(h, k) for k in (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS)}
        if said != {SPLIT_NO: i, SPLIT_COUNT: count, SPLIT_TENSORS: total}:
            raise WeightopsError(
                f"{p}: not split {i + 1} of the set {path.name} opens (split.no={i}, split.count={count}, "
                f"split.tensors.count={total}): it says split.no={said[SPLIT_NO]}, split.count={said[SPLIT_COUNT]}, "
                f"split.tensors.count={said[SPLIT_TENSORS]}; a file from another run?"
            )
        other = _set_id(p)
        if set_id is not None and other is not None and other != set_id:
            raise WeightopsError(
                f"{p}: written by another weightops run than {path.name} (its {SET_XATTR} attribute differs); "
                "a split set is only used as it was published"
            )
        for t in h.tensors:
            if t.name in seen:
                raise WeightopsError(
                    f"{p}: tensor {shown(t.name)!r} is also in {seen[t.name].name}; a split set holds each tensor "
                    "once (llama.cpp: 'tensor is duplicated')"
                )
            seen[t.name] = p
        headers.append(h)
    if len(seen) != total:
        raise WeightopsError(
            f"GGUF split set {path}: its {count} files hold {len(seen)} tensors, but split.tensors.count says "
            f"{total} (llama.cpp: 'corrupted model')"
        )
    return headers
