"""verify: compare a candidate checkpoint's next-token distributions with a reference's."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..commands.verify import VERIFY
from ..io.outputs import Output
from ..pipelines.verify import raise_if_failed, render, verify_checkpoint
from ..verify.gate import KINDS
from . import echo_escaped, main

_DEFAULTS = "; ".join(f"{k} {kld:g}/{100 * top1:g}%" for k, (kld, top1) in KINDS.items())


@main.command(
    params=list(VERIFY),
    help=f"""Prove that CANDIDATE computes what REFERENCE computes.

    Both are run on the same token ids, one model at a time (the reference's logits are kept
    in RAM, or in a temporary file when large, while it is freed), and their next-token
    distributions are compared position by position with llama-perplexity's KL-divergence
    definitions: KL(reference || candidate) mean / median / 99% / max, top-1 agreement,
    RMS of Δp of the actual next token, perplexity of each side and their ratio, and the
    largest absolute logit difference. Exit 3 when the gate fails, naming the worst prompts
    (and, when both store comparable values, the tensors that differ).

    \b
    REFERENCE / CANDIDATE: any pair of
      * HF directories (run by transformers),
      * TencentPretrain checkpoints (streamed through the remap into the same transformers
        model; --tp-config for the head counts when no tencentpretrain_config.json is beside it),
      * GGUF files (run by llama.cpp through llama-cpp-python, with an F32 KV cache; or by
        transformers' GGUF loader with --gguf-runtime transformers).

    \b
    Token ids: the prompts are tokenised once, by the reference's tokenizer (or --tokenizer;
    llama.cpp's for a GGUF reference). The verification fails when the candidate's vocabulary
    cannot represent those ids, or when the candidate's own tokenizer (llama.cpp's for GGUF)
    would tokenise a prompt differently (--allow-tokenizer-mismatch makes that a note).

    \b
    Gate: mean KLD <= --max-kld and top-1 agreement >= --min-top1. Defaults depend on what
    the candidate is (the least precise matrix type of either side; the report names the kind
    and which default applied), calibrated on a real 135M model so that llama.cpp's own files
    pass and a wrong q/k permutation fails (kind: max KLD / min top-1):
      {_DEFAULTS}.
    exact = HF/TencentPretrain with the same dtypes as the reference; float = another float
    dtype or GGUF F32/F16/BF16; q8/q6/q5/q4 = GGUF Q8_0, Q6_K, Q5_*, Q4_*; int8 = bitsandbytes
    int8; nf4 counts as q4; low = below Q4, and bitsandbytes fp4. Quantization noise hides
    smaller errors (a wrong RoPE base passes a q4 gate): verify the F16 file too.

    \b
    --structure-only runs no model: tensor names (HF names on both sides) and shapes, sha256
    of values where both store them alike, the vocabulary triple and the special tokens.

    \b
    Examples:
      weightops verify chinese-llama-7b chinese-llama-7b-q8_0.gguf
      weightops verify merged-hf tp-model.bin --tp-config llama_7b_config.json --json report.json
      weightops verify yayi-7b yayi-7b-q4_0.gguf --prompts chat.jsonl --max-kld 0.1 --min-top1 0.85
""",
)
def verify(
    reference: Path,
    candidate: Path,
    prompts: Path | None,
    tokenizer: Path | None,
    device: str,
    dtype: str,
    max_kld: float | None,
    min_top1: float | None,
    max_tokens: int | None,
    json_out: str | None,
    structure_only: bool,
    gguf_runtime: str,
    tp_config: Path | None,
    allow_tokenizer_mismatch: bool,
    force: bool,
    reference_cache: Path | None,
) -> None:
    report = (
        None
        if json_out in (None, "-")
        else Output(
            json_out, [reference, candidate, prompts, tokenizer, tp_config], kind="file", force=force, what="--json"
        )
    )
    result = verify_checkpoint(
        reference,
        candidate,
        prompts=prompts,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        max_kld=max_kld,
        min_top1=min_top1,
        structure_only=structure_only,
        gguf_runtime=gguf_runtime,
        tp_config=tp_config,
        max_tokens=max_tokens,
        allow_tokenizer_mismatch=allow_tokenizer_mismatch,
        log=echo_escaped,
        reference_cache=reference_cache,
    )
    doc = json.dumps(result, indent=2, ensure_ascii=False)
    if json_out == "-":
        click.echo(doc)
    elif report is not None:
        with report.writing() as tmp:
            tmp.write_text(doc + "\n", encoding="utf-8")
    click.echo(render(result), err=json_out == "-")
    raise_if_failed(result)
