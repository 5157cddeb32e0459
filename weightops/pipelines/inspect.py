"""`weightops inspect`: what a checkpoint holds, read from headers only."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from ..errors import shown
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.vocabulary import embedding_name, vocab_triple


def _layers(names: list[str]) -> int | None:
    found = {int(m.group(1)) for n in names if (m := re.search(r"(?:layers|h|transformer|blk)\.(\d+)\.", n))}
    return max(found) + 1 if found else None


def _heads(ckpt: Checkpoint) -> tuple[int | None, int | None]:
    """(attention heads, key/value heads) from the config (TencentPretrain, HF or GGUF keys)."""
    cfg = ckpt.config or {}
    gguf = f"{ckpt.architecture}.attention.head_count"
    heads = cfg.get("heads_num") or cfg.get("num_attention_heads") or cfg.get("n_head") or cfg.get(gguf)
    kv = cfg.get("local_kv_heads_num") or cfg.get("num_key_value_heads") or cfg.get(gguf + "_kv")
    return heads, kv or heads


def inspect_checkpoint(path: str | Path, tp_config: str | Path | None = None) -> dict:
    """Open PATH (any supported format) and summarize it; see `summarize` for the keys."""
    return summarize(open_checkpoint(path, tp_config))


def summarize(ckpt: Checkpoint) -> dict:
    """The `inspect --json` document (keys fixed by design.md, plus `layers`/`hidden_size`/`heads`/`kv_heads`)."""
    kinds = Counter(r.stored_type for r in ckpt.tensors)
    triple = vocab_triple(ckpt)
    emb = embedding_name(ckpt)
    hidden = ckpt.tensor(emb).shape[-1] if emb else None
    heads, kv_heads = _heads(ckpt)
    return {
        "path": str(ckpt.path),
        "format": ckpt.format,
        "architecture": ckpt.architecture,
        "tensor_count": len(ckpt.tensors),
        "parameter_count": sum(r.numel for r in ckpt.tensors),
        "dtypes": dict(sorted(kinds.items())),
        "files": [str(f) for f in ckpt.weight_files + ckpt.aux_files],
        "layers": _layers(ckpt.names()),
        "hidden_size": hidden,
        "heads": heads,
        "kv_heads": kv_heads,
        "vocab": triple.as_dict(),
    }


def render(summary: dict) -> str:
    """The human summary, one field a line; strings from the files (paths, a GGUF's
    metadata) are escaped so that none can start a line of its own."""
    v = summary["vocab"]
    files = summary["files"] or ["-"]
    lines = [
        f"path          {summary['path']}",
        f"format        {summary['format']}",
        f"architecture  {summary['architecture'] or 'unknown'}",
        f"layers        {summary['layers']}   hidden size {summary['hidden_size']}   heads "
        + (f"{summary['heads']} (key/value {summary['kv_heads']})" if summary["heads"] else "unknown (no config)"),
        f"tensors       {summary['tensor_count']}",
        f"parameters    {summary['parameter_count']:,}",
        "dtypes        " + ", ".join(f"{k} x{n}" for k, n in summary["dtypes"].items()),
        f"vocabulary    config {v['config']}, tokenizer {v['tokenizer']}, embedding rows {v['embedding_rows']}"
        + (f" ({v['padding_rows']} padding rows)" if v.get("padding_rows") else "")
        + ("" if v["agree"] else "   <-- DISAGREE"),
        *(f"              {c}" for c in v.get("conflicts", [])),
        f"files         {files[0]}",
        *(f"              {f}" for f in files[1:]),
    ]
    return "\n".join(map(shown, lines))
