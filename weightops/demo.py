"""`weightops demo`: the embedded default job, built from nothing (no downloads)."""
from __future__ import annotations

import shutil
from pathlib import Path

from .checkpoint import open_checkpoint, save_hf
from .errors import WeightopsError
from .inspection import render, summarize
from .verify import manifest
from . import tiny


def run_demo(workdir: Path, force: bool = False) -> str:
    """Make a tiny LLaMA, stream-copy it into sharded safetensors, inspect and manifest it."""
    workdir = Path(workdir)
    if workdir.exists() and any(workdir.iterdir()):
        if not force:
            raise WeightopsError(f"{workdir} exists and is not empty; pass --force to replace it")
        shutil.rmtree(workdir)
    tok = tiny.spm_tokenizer_dir(workdir / "tokenizer")
    base = tiny.tiny_llama(workdir / "tiny-llama", tok)
    src = open_checkpoint(base)
    copy = workdir / "tiny-llama-sharded"
    save_hf(src.tensors, copy, aux_files=src.aux_files, inputs=[base], max_shard_size="100KB")
    manifest.create(copy)
    checked = manifest.check(copy)
    same = all(open_checkpoint(copy).tensor(r.name).load().equal(r.load()) for r in src.tensors)
    if not same:
        raise WeightopsError("demo: the stream copy differs from its source")
    return "\n\n".join([render(summarize(open_checkpoint(copy))),
                        f"stream copy bit-exact: {same}; manifest: {len(checked['files'])} files, "
                        f"{len(checked['tensors'])} tensors verified"])
