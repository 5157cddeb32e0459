"""gguf: write a llama.cpp GGUF file from any checkpoint in one streaming pass."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import click

from ..devices import DEVICES
from ..pipelines.gguf import QUALITIES, export_gguf_matrix
from ..quant.ggml_types import FILE_TYPE_NAMES, FILE_TYPES, NAMES, VIA_NAMES
from . import main, warn
from .merge_lora import lora_options

_CONVERTER = "/".join(f.name for f in FILE_TYPES if not f.quantizer)
_QUANTIZER = "/".join(f.name for f in FILE_TYPES if f.quantizer)
_QUANTIZER_SPAN = " ... ".join(_QUANTIZER.split("/")[:: len(_QUANTIZER.split("/")) - 1])  # first ... last


@main.command(
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
""".replace("{converter}", _CONVERTER).replace("{quantizer}", _QUANTIZER)
)
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.argument("output", type=click.Path())
@click.option(
    "--type",
    "qtype",
    type=click.Choice(FILE_TYPE_NAMES, case_sensitive=False),
    multiple=True,
    default=["f16"],
    show_default=True,
    help="File type: the 2-D weights' type, or one of llama-quantize's mixes (see above). Repeat it for a "
    "matrix: OUTPUT is then a directory with one file per type.",
)
@click.option(
    "--pure",
    is_flag=True,
    help=f"With a llama-quantize --type ({_QUANTIZER_SPAN}): every 2-D weight in the mix's base type, no "
    "mix rules "
    "(= llama-quantize --pure).",
)
@click.option(
    "--tensor-type",
    "tensor_types",
    multiple=True,
    metavar="GLOB=TYPE",
    help="Type of matching tensors (GGUF names, shell globs; repeatable, the first match wins, as in "
    "llama-quantize), e.g. 'blk.*.ffn_down.weight=q8_0' or 'output.weight=f16'.",
)
@click.option(
    "--output-tensor-type",
    type=click.Choice(NAMES, case_sensitive=False),
    help="Type of output.weight (of token_embd when the embeddings are tied), before any other rule "
    "(= llama-quantize --output-tensor-type).",
)
@click.option(
    "--token-embedding-type",
    type=click.Choice(NAMES, case_sensitive=False),
    help="Type of token_embd.weight, before any other rule (= llama-quantize --token-embedding-type).",
)
@click.option(
    "--via",
    type=click.Choice(VIA_NAMES, case_sensitive=False),
    help=f"With a llama-quantize --type ({_QUANTIZER_SPAN}): round the weights to this type first, to "
    "reproduce byte for byte a file made the two-pass way (convert to F16/BF16, then llama-quantize). "
    "Default: quantize from the source values (= llama-quantize on an F32 file).",
)
@click.option(
    "--imatrix",
    metavar="FILE",
    type=click.Path(exists=True, dir_okay=False),
    help=f"With a llama-quantize --type ({_QUANTIZER_SPAN}): an importance matrix (weightops imatrix or "
    "llama-imatrix, GGUF or .dat): weighted quantization, its type rules and its quantize.imatrix.* "
    "metadata, byte for byte as llama-quantize --imatrix FILE. Tensors without an entry are quantized "
    "unweighted; an entry whose size does not fit the model is refused.",
)
@click.option(
    "--quality",
    type=click.Choice(QUALITIES),
    default="reference",
    show_default=True,
    help="Quantization rounding: 'reference' is llama.cpp's own (bit-identical blocks).",
)
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="auto",
    show_default=True,
    help="Where the quantization kernels run: auto = CUDA when available, else CPU. The bytes are the same either way.",
)
@click.option(
    "--tokenizer",
    type=click.Path(exists=True, path_type=Path),
    help="Directory with the HF tokenizer files (default: MODEL's directory). Needed for "
    "TencentPretrain checkpoints, which carry no tokenizer.",
)
@click.option(
    "--pre-tokenizer",
    metavar="NAME",
    help="llama.cpp pre-tokenizer name for a BPE tokenizer (e.g. bloom, gpt-2, llama-bpe); default: "
    "recognised as llama.cpp does, else from tokenizer.json or the architecture.",
)
@click.option(
    "--tp-config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TencentPretrain model config JSON, for a TencentPretrain MODEL.",
)
@click.option(
    "--lora",
    multiple=True,
    metavar="ADAPTER",
    type=click.Path(exists=True, path_type=Path),
    help="Merge this LoRA adapter on the way, as merge-lora does (repeatable, applied in order); "
    "no merged checkpoint is written.",
)
@lora_options("--lora-rounding")
@click.option(
    "--split-max-size",
    metavar="SIZE",
    help="Write a split set OUTPUT-00001-of-0000N.gguf ... whose files hold at most SIZE bytes of tensor data "
    "each (bytes, or a whole number of K, M or G: decimal, 1G = 10^9; metadata not counted; a larger tensor "
    "gets a file of its own), laid out as convert_hf_to_gguf.py --split-max-size lays it out.",
)
@click.option(
    "--split-max-tensors",
    type=click.IntRange(min=1),
    metavar="N",
    help="Write a split set whose files hold at most N tensors each (= convert_hf_to_gguf.py --split-max-tensors).",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the temporary a killed run of the same command left (tensors whose bytes match its "
    "journal are kept); without it such a temporary is removed.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing OUTPUT that weightops wrote (it says what it removes); anything else at "
    "OUTPUT is refused.",
)
def gguf(
    model: Path,
    output: str,
    qtype: tuple[str, ...],  # every --type given
    pure: bool,
    tensor_types: tuple[str, ...],
    output_tensor_type: str | None,
    token_embedding_type: str | None,
    via: str | None,
    imatrix: str | None,
    quality: str,
    device: str,
    tokenizer: Path | None,
    pre_tokenizer: str | None,
    tp_config: Path | None,
    lora: tuple[Path, ...],
    rounding: str,
    tp_lora_r: int | None,
    tp_lora_alpha: float | None,
    split_max_size: str | None,
    split_max_tensors: int | None,
    resume: bool,
    force: bool,
) -> None:
    directory = len(qtype) > 1 or output.endswith(os.sep)  # a trailing slash names a directory
    if directory and Path(output).suffix.lower() == ".gguf":
        raise click.UsageError(
            f"{len(qtype)} --type write a directory of files (MODEL-TYPE.gguf), but OUTPUT {output} names a "
            ".gguf file: name a directory",
            ctx=click.get_current_context(),
        )
    results = export_gguf_matrix(
        model,
        output if directory else [output],
        qtype,
        pure=pure,
        tensor_types=tensor_types,
        output_tensor_type=output_tensor_type,
        token_embedding_type=token_embedding_type,
        via=via,
        imatrix=imatrix,
        quality=quality,
        device=device,
        tokenizer=tokenizer,
        pre_tokenizer=pre_tokenizer,
        tp_config=tp_config,
        force=force,
        warn=warn,
        lora=lora,
        lora_options={"rounding": rounding, "tp_lora_r": tp_lora_r, "tp_lora_alpha": tp_lora_alpha},
        split_max_size=split_max_size,
        split_max_tensors=split_max_tensors,
        resume=resume,
    )
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
            + (f"; {result.resumed} tensors kept from the interrupted run" if result.resumed else "")
        )
    if len(results) > 1:
        encoded = sum(r.encoded for r in results)
        click.echo(
            f"{len(results)} files, {encoded + sum(r.shared for r in results)} tensors written from {encoded} "
            "encodings, the source read once"
        )
