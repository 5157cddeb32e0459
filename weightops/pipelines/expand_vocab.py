"""`weightops expand-vocab`: an HF checkpoint in, its tokenizer edited and its embedding (and
untied lm_head) resized by the row plan of `ops.vocab`, an HF checkpoint out."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .. import arch
from ..arch import Role
from ..errors import WeightopsError
from ..io import tokenizer_edit
from ..io.checkpoint import Checkpoint, open_checkpoint, save_hf
from ..io.outputs import Output
from ..io.tokenizer_files import read_tokenizer_files
from ..io.vocabulary import embedding_name
from ..ops.vocab import INIT_RULES, plan_rows, resize_vocab


def vocab_tensor_names(ckpt: Checkpoint) -> list[str]:
    """The input embedding and, when the checkpoint has one, the (untied) output head."""
    emb = embedding_name(ckpt)
    if emb is None:
        raise WeightopsError(
            f"{ckpt.path}: no input embedding found (architecture "
            f"{ckpt.architecture or 'unknown'}; supported: {', '.join(arch.supported())})"
        )
    spec = arch.get(ckpt.architecture)
    heads = [n for n in ckpt.names() if spec.role(n, "hf") is Role.OUTPUT]
    return [emb, *heads]


@dataclass(frozen=True)
class VocabReport:
    """What `expand_vocab` did, for the CLI summary and for callers."""

    old_tokens: int
    new_tokens: int
    old_rows: int
    rows: int
    added: list[str]  # tokens whose rows were initialised, in id order
    carried: int
    fallback: int  # subtoken-mean tokens with no pieces (got the mean)
    padding: int
    init: str
    rewritten: list[str]
    passed_through: int


def expand_vocab(
    model: str | Path,
    output: str | Path,
    *,
    merge_spm: str | Path | None = None,
    add_tokens: Iterable[str] = (),
    special_tokens: Iterable[str] = (),
    new_tokenizer: str | Path | None = None,
    init: str = "subtoken-mean",
    seed: int = 0,
    pad_to_multiple: int | None = None,
    max_shard_size: str | int = "5GB",
    force: bool = False,
    allow_shrink: bool = False,
    reinit_rows: bool = False,
    read_files: Iterable[str | Path] = (),
) -> VocabReport:
    """Edit MODEL's tokenizer (or take `new_tokenizer`), resize its embedding and untied
    lm_head to match, and write the result to `output` (an HF safetensors directory).
    `force` replaces an OUTPUT weightops wrote; `allow_shrink` allows dropping rows; MODEL's
    tokenizer files must agree with each other and with its embedding, and the trained row of
    every old token is kept unless `reinit_rows`; `read_files` are other files the caller read
    for this (e.g. the --add-tokens file), protected from the output like the inputs."""
    if init not in INIT_RULES:
        raise WeightopsError(f"unknown init rule {init!r}; choose one of {', '.join(INIT_RULES)}")
    if pad_to_multiple is not None and pad_to_multiple < 1:
        raise WeightopsError(f"--pad-to-multiple must be a positive integer, got {pad_to_multiple}")
    ckpt = open_checkpoint(model)
    if not ckpt.format.is_hf:
        raise WeightopsError(
            f"{ckpt.path}: expand-vocab works on Hugging Face checkpoints; this is {ckpt.format} "
            f"(convert it with `weightops convert --to hf` first)"
        )
    target = Output(output, [ckpt.path, new_tokenizer, merge_spm, *read_files], kind="dir", force=force)
    names = vocab_tensor_names(ckpt)
    old_rows = ckpt.tensor(names[0]).shape[0]
    what = f"{names[0]!r} in {ckpt.path}"
    old_files = read_tokenizer_files(ckpt.directory)
    old_files.check(rows=old_rows, config=(ckpt.config or {}).get("vocab_size"), embedding=what)
    old_tok = tokenizer_edit.load(ckpt.directory)
    if new_tokenizer:
        read_tokenizer_files(Path(new_tokenizer)).check()
        tokenizer_edit.load(Path(new_tokenizer))  # a missing tokenizer is named before any work
    with tempfile.TemporaryDirectory(prefix="weightops-tokenizer-") as tmp:
        staged = Path(tmp)
        origin = Path(new_tokenizer) if new_tokenizer else ckpt.directory
        tokenizer_edit.copy_tokenizer_files(origin, staged)
        tokenizer_edit.edit(
            staged,
            merge=Path(merge_spm) if merge_spm else None,
            add_tokens=add_tokens,
            special_tokens=special_tokens,
            origin=origin,
        )
        new_tok = tokenizer_edit.load(staged)
        new_files = read_tokenizer_files(staged)
        new_files.check()
        new_size = new_files.size
        assert new_size is not None  # tokenizer_edit.load found tokenizer files
        plan = plan_rows(
            old_tok,
            new_tok,
            old_rows,
            new_size,
            pad_to_multiple=pad_to_multiple,
            allow_shrink=allow_shrink,
            reinit_rows=reinit_rows,
            subtokens=init == "subtoken-mean",
            what=what,
        )
        keep = [f for f in ckpt.aux_files if f.name not in tokenizer_edit.TOKENIZER_FILES]
        save_hf(
            resize_vocab(ckpt.tensors, names, plan, init, seed),
            target,
            aux_files=keep + sorted(staged.iterdir()),
            max_shard_size=max_shard_size,
            config_update={"vocab_size": plan.rows},
            desc="expand-vocab",
        )
    id_to_token = {i: t for t, i in new_tok.get_vocab().items()}
    new = plan.new_tokens
    return VocabReport(
        old_tokens=old_files.size or 0,
        new_tokens=new_size,
        old_rows=old_rows,
        rows=plan.rows,
        added=[id_to_token[i] for i in new],
        carried=len(plan.carried),
        fallback=sum(1 for i in new if not plan.pieces.get(i)) if init == "subtoken-mean" else 0,
        padding=len(plan.padding),
        init=init,
        rewritten=names,
        passed_through=len(ckpt.tensors) - len(names),
    )
