"""`weightops demo`: the embedded default job, built from nothing (no downloads).

It makes a tiny LLaMA (SentencePiece tokenizer) with a fine-tune of it, extra Chinese
pieces, and a tiny BLOOM (BPE tokenizer), then runs the release job template
`examples/release.toml` on them — every operator, with verification in llama.cpp — and
returns the release report.
"""
from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from . import jobs, tiny
from .errors import WeightopsError


def build_models(models: Path) -> None:
    """The inputs named in the job template's [inputs]."""
    spm = tiny.spm_tokenizer_dir(models / "tokenizer-spm")
    base = tiny.tiny_llama(models / "llama-base", spm)
    tiny.finetune(base, models / "llama-chat")
    tiny.train_spm(models / "zh-pieces.model", 400, lines=tiny.chinese_lines())
    tiny.tiny_bloom(models / "bloom", tiny.bpe_tokenizer_dir(models / "tokenizer-bpe"))


def template() -> str:
    return resources.files("weightops.examples").joinpath("release.toml").read_text()


def run_demo(workdir: Path, force: bool = False) -> str:
    workdir = Path(workdir)
    if workdir.exists() and any(workdir.iterdir()):
        if not force:
            raise WeightopsError(f"{workdir} exists and is not empty; pass --force to replace it")
        shutil.rmtree(workdir)
    build_models(workdir / "models")
    job_file = workdir / "release.toml"
    job_file.write_text(template())
    report = jobs.run_job(job_file)
    return jobs.render_report(report)
