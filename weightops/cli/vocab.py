"""`weightops expand-vocab`: grow or remap a model's vocabulary, tokenizer and embeddings
in one streaming step."""

from __future__ import annotations

from pathlib import Path

import click

from ..commands.vocab import EXPAND_VOCAB
from ..errors import WeightopsError, names_file, shown
from ..pipelines.expand_vocab import VocabReport, expand_vocab
from . import main


@names_file("token list (UTF-8 text, one token per line)")
def _read_tokens(path: Path) -> list[str]:
    tokens = [line for line in path.read_text(encoding="utf-8").splitlines() if line]  # spaces are kept
    if not tokens:
        raise WeightopsError(f"{path}: no tokens (expected one token per line)")
    return tokens


def _summary(model: Path, output: Path, r: VocabReport) -> str:
    added = ", ".join(repr(t) for t in r.added[:8]) + (", ..." if len(r.added) > 8 else "")
    fallback = f" ({r.fallback} had no pieces and got the mean)" if r.fallback else ""
    lines = [
        f"expand-vocab  {model} -> {output}",
        f"tokenizer     {r.old_tokens} -> {r.new_tokens} tokens",
        f"rows          {r.old_rows} -> {r.rows}: {r.carried} carried bit-identical, "
        f"{len(r.added)} new tokens initialised with {r.init}{fallback}, {r.padding} padding rows (mean)",
        f"new tokens    {added or '-'}",
        f"tensors       rewritten {', '.join(map(shown, r.rewritten))}; {r.passed_through} passed through untouched",
        f"config.json   vocab_size = {r.rows}",
    ]
    return "\n".join(lines)


@main.command("expand-vocab", params=list(EXPAND_VOCAB))
def expand_vocab_cmd(
    model: Path,
    output: Path,
    merge_spm: Path | None,
    add_tokens: Path | None,
    special_tokens: tuple[str, ...],
    new_tokenizer: Path | None,
    init: str,
    seed: int,
    pad_to_multiple: int | None,
    max_shard_size: str,
    allow_shrink: bool,
    force: bool,
    reinit_rows: bool,
) -> None:
    """Grow or remap MODEL's vocabulary and write OUTPUT (an HF safetensors directory).

    The tokenizer is edited (merge a SentencePiece model, add tokens, add special tokens)
    or replaced (--new-tokenizer); then only the input embedding and an untied lm_head are
    rewritten to the new size, with rows of known tokens carried bit-identical; every other
    tensor streams through untouched. config.json vocab_size is set to the new row count,
    so `weightops inspect OUTPUT` shows an agreeing vocabulary triple (unless padded).
    Shrinking is refused unless --allow-shrink; so is a MODEL whose tokenizer files disagree
    with each other or with its embedding, and (unless --reinit-rows) a remap that would
    re-initialise the trained rows of tokens the new tokenizer lacks.

    \b
    Examples:
      # Chinese-LLaMA: merge a Chinese SentencePiece model into LLaMA's 32000 pieces
      weightops expand-vocab llama-7b chinese-llama-7b --merge-spm chinese_sp.model
      # YaYi on BLOOMZ (250880 rows = 250680 tokens + padding; 512 keeps that count)
      weightops expand-vocab bloomz-7b1-mt yayi-7b --special-token '<|System|>' \\
          --special-token '<|Human|>' --special-token '<|YaYi|>' --special-token '<|End|>' \\
          --pad-to-multiple 512
    """
    report = expand_vocab(
        model,
        output,
        merge_spm=merge_spm,
        add_tokens=_read_tokens(add_tokens) if add_tokens else (),
        special_tokens=special_tokens,
        new_tokenizer=new_tokenizer,
        init=init,
        seed=seed,
        pad_to_multiple=pad_to_multiple,
        max_shard_size=max_shard_size,
        force=force,
        allow_shrink=allow_shrink,
        read_files=[add_tokens] if add_tokens else [],
        reinit_rows=reinit_rows,
    )
    click.echo(_summary(model, output, report))
