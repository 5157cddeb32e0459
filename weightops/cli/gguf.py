"""gguf: write a llama.cpp GGUF file from any checkpoint in one streaming pass."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import click

from ..commands.gguf import CONVERTER_TYPES, GGUF, QUANTIZER_TYPES, export_arguments
from ..pipelines.gguf import export_gguf_matrix
from . import main, warn


@main.command(
    params=list(GGUF),
    help="""Write MODEL as a llama.cpp GGUF file, quantized, in one pass; or, with several
    --type, a directory of GGUF files (a release matrix) from one read of MODEL.

    MODEL is an HF directory (safetensors or .bin, sharded or not) or a TencentPretrain
    checkpoint (with --tp-config). The file is what llama.cpp's convert_hf_to_gguf.py
    would write for the same model (tensor names, q/k layout, metadata keys, tokenizer),
    and with a block --type its tensors are byte for byte what llama.cpp's quantizer
    makes from the original weights. No full-size f16 intermediate is written: each
    tensor is read, quantized and written in turn, so memory stays at a few tensors.

    \b
    Which tensor gets which type:
      * 1-D tensors (norms, biases) are always F32, as in llama.cpp's own files;
      * {converter}: every other weight in that type
        (= convert_hf_to_gguf.py --outtype TYPE);
      * {quantizer}:
        llama-quantize's mixes, rule for rule (llama.cpp 0c1e57098, as vendored in
        llama-cpp-python 0.3.36), and its file: the same bytes as llama-quantize run on
        an F32 GGUF of the model (--via f16: on the F16 GGUF); --pure: every weight TYPE;
      * --output-tensor-type / --token-embedding-type, then the first matching
        --tensor-type GLOB=TYPE (GGUF names), come before the mix rules;
      * rows that do not split into the type's blocks fall back as llama-quantize does
        (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0, else F16), with a
        warning naming the tensor.

    \b
    Several --type (or an OUTPUT ending in /): OUTPUT is a directory holding one file per
    type, named after MODEL's directory and the type (MODEL-Q4_K_M.gguf), published as a
    whole. Each source tensor is read once and an encoding several files share (the Q6_K
    output tensor of the K mixes) is computed once; each file is byte for byte the one a
    single-type run writes.

    \b
    --resume: a run killed outright (SIGKILL, out of memory, power) leaves its temporary
    beside OUTPUT, with a journal of the tensors written and their hashes; --resume
    continues it from the last tensor written (checked against the hashes), giving the
    same bytes as an uninterrupted run. Without --resume the temporary is removed.

    \b
    Tokenizer: SentencePiece (tokenizer.model) or byte-level BPE (tokenizer.json) from
    MODEL's directory or --tokenizer. Added special tokens (e.g. YaYi's <|End|>) become
    CONTROL tokens that llama.cpp never splits; embedding rows beyond the tokenizer get
    [PAD{i}] tokens. A BPE tokenizer llama.cpp does not recognise (an expanded BLOOM
    vocabulary) gets the pre-tokenizer of its architecture, with a warning:
    set it with --pre-tokenizer if llama.cpp then splits text differently.

    \b
    Examples:
      weightops gguf chinese-alpaca-7b alpaca-q4_k_m.gguf --type q4_k_m
      weightops gguf yayi-7b yayi-q8_0.gguf --type q8_0
      weightops gguf yayi-7b release --type q8_0 --type q6_k --type q5_k_m --type q4_k_m
      weightops gguf tp-llama.bin out.gguf --tp-config llama_7b_config.json \\
          --tokenizer chinese-llama-tokenizer --type q5_1 --pure
""".replace("{converter}", CONVERTER_TYPES).replace("{quantizer}", QUANTIZER_TYPES),
)
def gguf(model: Path, output: str, qtype: tuple[str, ...], **options: Any) -> None:  # qtype: every --type
    directory = len(qtype) > 1 or output.endswith(os.sep)  # a trailing slash names a directory
    if directory and Path(output).suffix.lower() == ".gguf":
        raise click.UsageError(
            f"{len(qtype)} --type write a directory of files (MODEL-TYPE.gguf), but OUTPUT {output} names a "
            ".gguf file: name a directory",
            ctx=click.get_current_context(),
        )
    outputs = output if directory else [output]
    results = export_gguf_matrix(model, outputs, qtype, warn=warn, **export_arguments(options))
    for result in results:
        counts = Counter(result.tensor_types.values())
        tok = result.tokenizer
        files = f" and {len(result.files) - 1} more split files" if len(result.files) > 1 else ""
        click.echo(
            f"wrote {result.output}{files} ({result.bytes_written / 2**20:.1f} MiB, {result.architecture}, "
            f"{result.file_type}): "
            + ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
            + f"; tokenizer {tok.model}/{tok.pre} ({tok.pre_source}), {tok.tokens} tokens"
            + (f", {tok.padding} [PAD] fillers" if tok.padding else "")
            + result.resumed_note
        )
    if len(results) > 1:
        encoded = sum(r.encoded for r in results)
        click.echo(
            f"{len(results)} files, {encoded + sum(r.shared for r in results)} tensors written from {encoded} "
            "encodings, the source read once"
        )
