"""`weightops inspect IMATRIX [--model MODEL]`: what an importance-matrix file holds and, against a
model, which of the weights llama-imatrix hooks it leaves without data or with few tokens, so
a calibration gap is seen before `llama-quantize --imatrix` (or `weightops gguf --imatrix`)
silently quantizes those tensors unweighted."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import WeightopsError, shown
from ..io import gguf as gguf_io
from ..io.imatrix import Imatrix, read_imatrix

OUTPUT = "output.weight"  # hooked only with llama-imatrix --process-output


def is_imatrix(path: str | Path) -> bool:
    """A GGUF file whose general.type is "imatrix", or a legacy `.dat` file."""
    path = Path(path)
    if not path.is_file():
        return False
    if gguf_io.is_gguf(path):
        return gguf_io.read_metadata(path).get("general.type") == "imatrix"
    return path.suffix == ".dat"


def inspect_imatrix(path: str | Path, model: str | Path | None = None, tp_config: str | Path | None = None) -> dict:
    """The `inspect --json` document of an imatrix file; with `model`, its `coverage`."""
    path = Path(path)
    data = read_imatrix(path)
    counts = np.concatenate([np.asarray(e.counts, np.float64) for e in data.entries.values()])
    summary: dict = {
        "path": str(path),
        "format": "imatrix-dat" if data.legacy else "imatrix-gguf",
        "entries": len(data.entries),
        "chunk_count": data.chunk_count,
        "chunk_size": data.chunk_size,
        "datasets": data.datasets,
        # a legacy file keeps one call count per entry instead of token counts
        "counted": "calls" if data.legacy else "tokens",
        "count_min": int(counts.min()),
        "count_median": float(np.median(counts)),
        "count_max": int(counts.max()),
    }
    if model is not None:
        summary["coverage"] = coverage(data, model, tp_config)
    return summary


def _few(data: Imatrix, name: str) -> bool:
    """Fewer tokens than one chunk for the matrix or one of its experts (a legacy file: no call)."""
    counts = np.asarray(data.entries[name].counts, np.float64)
    return bool((counts < (1 if data.legacy else max(1, data.chunk_size))).any())


def coverage(data: Imatrix, model: str | Path, tp_config: str | Path | None = None) -> dict:
    """The model's weights llama-imatrix hooks (every blk.* matrix, experts included; output
    only with --process-output) against the entries: missing, few tokens, wrong size."""
    shapes = model_matrices(model, tp_config)
    hooked = [n for n in shapes if n.startswith("blk.")]
    if OUTPUT in data.entries and OUTPUT in shapes:
        hooked.append(OUTPUT)
    mismatched = []
    for name in hooked:
        if name in data.entries:
            shape = shapes[name]
            want = shape[-1] * (shape[0] if len(shape) == 3 else 1)
            got = int(np.asarray(data.entries[name].sums).size)
            if got != want:
                mismatched.append({"tensor": name, "imatrix": got, "model": want})
    return {
        "model": str(model),
        "hooked": len(hooked),
        "missing": [n for n in hooked if n not in data.entries],
        "few_tokens": [n for n in hooked if n in data.entries and _few(data, n)],
        "size_mismatch": mismatched,
        "not_in_model": sorted(n for n in data.entries if n not in shapes),
    }


def model_matrices(model: str | Path, tp_config: str | Path | None = None) -> dict[str, tuple[int, ...]]:
    """GGUF name -> shape (torch order) of the model's 2-D and 3-D weights: a GGUF file's own
    names, any other checkpoint's as `weightops gguf` names them."""
    from ..io.checkpoint import Format, open_checkpoint

    ckpt = open_checkpoint(model, tp_config)
    if ckpt.format is Format.GGUF:
        refs = ckpt.tensors
    else:
        from .gguf_source import gguf_stream, hf_stream  # torch: only when a non-GGUF model is given

        hf_refs, config = hf_stream(ckpt)
        refs = gguf_stream(hf_refs, config, ckpt.path)[1]
    found = {r.name: tuple(r.shape) for r in refs if len(r.shape) in (2, 3)}
    if not any(n.startswith("blk.") for n in found):
        raise WeightopsError(f"{shown(model)}: no blk.* weights, so nothing an importance matrix covers")
    return found


def render_imatrix(summary: dict) -> str:
    """The human summary (file strings escaped, as `render` does)."""
    counted = summary["counted"]
    lines = [
        f"path          {summary['path']}",
        f"format        {summary['format']}",
        f"entries       {summary['entries']}",
        f"chunks        {summary['chunk_count']}"
        + (f" of {summary['chunk_size']} tokens" if summary["chunk_size"] else " (chunk size not recorded)"),
        f"{counted:<14}min {summary['count_min']}, median {summary['count_median']:g}, max {summary['count_max']}",
        "datasets      " + (", ".join(summary["datasets"]) or "-"),
    ]
    cov = summary.get("coverage")
    if cov:
        lines.append(f"model         {cov['model']}: {cov['hooked']} hooked weights")
        for key, label in (("missing", "no entry"), ("few_tokens", "few tokens"), ("not_in_model", "not in model")):
            names = cov[key]
            lines.append(f"{label:<14}{len(names)}" + (": " + ", ".join(names[:8]) if names else ""))
            if len(names) > 8:
                lines.append(f"              ... and {len(names) - 8} more")
        for m in cov["size_mismatch"]:
            lines.append(f"size mismatch {m['tensor']}: imatrix {m['imatrix']}, model {m['model']}")
    return "\n".join(map(shown, lines))
