"""`weightops demo`: the embedded default job, built from nothing (no downloads).

It makes a tiny LLaMA (SentencePiece tokenizer) with a fine-tune of it, extra Chinese
pieces, and a tiny BLOOM (BPE tokenizer), then runs the release job template
`examples/release.toml` on them — every operator, with verification in llama.cpp — and
returns the release report.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .. import jobs, tiny
from ..io.outputs import Output


def build_models(models: Path) -> None:
    """The inputs named in the job template's [inputs]."""
    spm = tiny.spm_tokenizer_dir(models / "tokenizer-spm")
    base = tiny.tiny_llama(models / "llama-base", spm)
    tiny.finetune(base, models / "llama-chat")
    tiny.train_spm(models / "zh-pieces.model", 400, lines=tiny.chinese_lines())
    tiny.tiny_bloom(models / "bloom", tiny.bpe_tokenizer_dir(models / "tokenizer-bpe"))


def template() -> str:
    return resources.files("weightops.examples").joinpath("release.toml").read_text()


def run_demo(workdir: Path, force: bool = False) -> dict:
    """Build the models and the job file into WORKDIR (an output like any other: `force`
    replaces only a WORKDIR weightops wrote), then run the job there; returns the report
    document (`jobs.run_job`), whose summary the runner has shown."""
    target = Output(workdir, kind="dir", force=force, what="WORKDIR")
    with target.writing() as tmp:
        build_models(tmp / "models")
        (tmp / "release.toml").write_text(template())
    return jobs.run_job(target.path / "release.toml")
