"""`weightops convert`: a TencentPretrain checkpoint <-> a Hugging Face checkpoint, streamed
through `remap` and published atomically.

TP -> HF writes what `from_pretrained` needs: safetensors weights, config.json,
generation_config.json and tokenizer files (made from a SentencePiece tokenizer.model for
LLaMA, copied from an HF tokenizer directory otherwise). HF -> TP writes the TencentPretrain
state dict (one file, or parts + index past --max-shard-size), the model config json its
--config_path takes, and the tokenizer files (tokenizer.model is its --spm_model_path).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import progress
from ..arch import get as get_arch
from ..errors import WeightopsError
from ..io import tencentpretrain as tp_io
from ..io import tokenizer_edit
from ..io.checkpoint import Format, open_checkpoint, save_hf
from ..io.index import parse_size
from ..io.outputs import Output, content
from ..io.remap import hf_view, tp_view
from ..io.tokenizer_files import read_tokenizer_files
from ..stream import cast

TARGETS = ("hf", "tencentpretrain")


@dataclass
class ConvertReport:
    output: Path
    files: list[Path]
    architecture: str
    tensors: int
    tokenizer: str | None  # where the tokenizer files came from
    warnings: list[str] = field(default_factory=list)


def convert_checkpoint(
    input: str | Path,
    output: str | Path,
    *,
    to: str,
    arch: str | None = None,
    tp_config: str | Path | None = None,
    tokenizer: str | Path | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: str | None = None,
    force: bool = False,
) -> ConvertReport:
    """Convert `input` to format `to` ("hf" or "tencentpretrain") at `output`."""
    if to not in TARGETS:
        raise WeightopsError(f"--to {to!r}: choose one of {', '.join(TARGETS)}")
    ckpt = open_checkpoint(input, tp_config)
    source = "tencentpretrain" if ckpt.format is Format.TENCENTPRETRAIN else "hf" if ckpt.format.is_hf else None
    if source is None:
        raise WeightopsError(
            f"{ckpt.path}: {ckpt.format} checkpoints cannot be converted here "
            "(inputs: TencentPretrain .bin or an HF directory)"
        )
    if source == to:
        raise WeightopsError(
            f"{ckpt.path}: is already a {'Hugging Face' if to == 'hf' else 'TencentPretrain'} "
            "checkpoint; --to names the format to produce"
        )
    tok_dir = Path(tokenizer) if tokenizer is not None else ckpt.directory
    target = Output(output, [ckpt.path, tp_config, tokenizer], kind="dir", force=force)
    if tok_dir.is_dir():  # a directory whose tokenizer files disagree has no one tokenizer to ship
        read_tokenizer_files(tok_dir).check()
    if to == "hf":
        return _to_hf(ckpt, target, arch, tok_dir, tokenizer is not None, dtype, max_shard_size or "5GB")
    return _to_tp(ckpt, target, arch, tok_dir, dtype, max_shard_size)


def _to_hf(
    ckpt,
    target: Output,
    arch: str | None,
    tok_path: Path,
    explicit: bool,
    dtype: torch.dtype | None,
    max_shard_size: str,
) -> ConvertReport:
    refs, config = hf_view(ckpt, arch=arch)
    refs = list(cast(refs, dtype))
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    warnings: list[str] = []
    tok_files, tok = hf_tokenizer_files(tok_path, config["model_type"], required=explicit)
    files: dict[str, str | bytes] = {**tok_files}  # and the configs below, as text
    if tok is None:
        warnings.append(
            f"no tokenizer found beside {ckpt.path}; the output has none (pass --tokenizer: a "
            "SentencePiece tokenizer.model for LLaMA, an HF tokenizer directory for BLOOM)"
        )
    else:
        warnings += _check_vocab(tok, config["vocab_size"], tok_path)
        config.update(
            {k: v for k in ("bos_token_id", "eos_token_id", "pad_token_id") if (v := getattr(tok, k)) is not None}
        )
    files["config.json"] = json.dumps(config, indent=2, sort_keys=True) + "\n"
    files["generation_config.json"] = _generation_config(config)
    written = save_hf(refs, target, max_shard_size=max_shard_size, extra_files=files, desc="converting to HF")
    return ConvertReport(
        target.path, written, config["model_type"], len(refs), str(tok_path) if tok else None, warnings
    )


def _to_tp(
    ckpt, target: Output, arch: str | None, tok_path: Path, dtype: torch.dtype | None, max_shard_size: str | None
) -> ConvertReport:
    refs, tp_config = tp_view(ckpt, arch=arch)
    refs = list(cast(refs, dtype))
    limit = parse_size(max_shard_size) if max_shard_size else None
    with target.writing() as tmp, progress.bar(sum(r.nbytes for r in refs), "converting to TencentPretrain") as b:
        tp_io.write_tp(refs, tmp, limit, on_tensor=lambda r: b.update(r.nbytes))
        (tmp / tp_io.CONFIG).write_text(json.dumps(tp_config, indent=2) + "\n")
        found = _copy_tokenizer(tok_path, tmp)
    warnings = (
        []
        if found
        else [f"no tokenizer files found in {tok_path}; TencentPretrain needs the tokenizer.model for --spm_model_path"]
    )
    return ConvertReport(
        target.path,
        content(target.path),
        arch or ckpt.architecture,
        len(refs),
        str(tok_path) if found else None,
        warnings,
    )


def hf_tokenizer_files(path: Path, model_type: str, *, required: bool) -> tuple[dict[str, bytes], object | None]:
    """HF tokenizer files (name -> bytes) from `path` and the tokenizer they load as.

    `path` is a SentencePiece model file, a directory with HF tokenizer files (copied as
    they are), or a directory with only tokenizer.model (HF files are generated for it).
    Nothing found gives ({}, None), or an error when `required`.
    """
    spm = "sentencepiece" in get_arch(model_type).vocab.encodings  # a tokenizer.model is enough
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if path.is_file():
            if not spm:
                raise WeightopsError(
                    f"--tokenizer {path}: {model_type} needs an HF tokenizer directory, not a SentencePiece model file"
                )
            shutil.copyfile(path, tmp / "tokenizer.model")
            write_spm_tokenizer_files(tmp)
        elif (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            tokenizer_edit.copy_tokenizer_files(path, tmp)
        elif (path / "tokenizer.model").is_file() and spm:
            shutil.copyfile(path / "tokenizer.model", tmp / "tokenizer.model")
            write_spm_tokenizer_files(tmp)
        elif required:
            raise WeightopsError(f"--tokenizer {path}: no tokenizer.model, tokenizer.json or tokenizer_config.json")
        else:
            return {}, None
        tok = tokenizer_edit.load(tmp)
        return {f.name: f.read_bytes() for f in sorted(tmp.iterdir()) if f.is_file()}, tok


def write_spm_tokenizer_files(directory: Path) -> None:
    """Beside directory/tokenizer.model (a LLaMA SentencePiece model), the HF files that make
    `AutoTokenizer.from_pretrained(directory)` give LLaMA's tokenizer (BOS added, no EOS)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    piece = {
        name: sp.id_to_piece(i)
        for name, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id()))
        if i >= 0
    }
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "add_bos_token": True,
                "add_eos_token": False,
                **piece,
                "legacy": False,
            }
        )
    )
    AutoTokenizer.from_pretrained(directory).save_pretrained(directory)


def _copy_tokenizer(path: Path, dest: Path) -> bool:
    """Tokenizer files for the TencentPretrain side: a .model file, or an HF tokenizer directory's files."""
    if path.is_file():
        shutil.copyfile(path, dest / "tokenizer.model")
        return True
    tokenizer_edit.copy_tokenizer_files(path, dest)
    return any((dest / n).is_file() for n in tokenizer_edit.TOKENIZER_FILES)


def _check_vocab(tok, rows: int, source: Path) -> list[str]:
    size = len(tok)
    if size > rows:
        raise WeightopsError(
            f"the tokenizer from {source} has {size} tokens, but the embedding only {rows} rows: "
            "wrong --tokenizer for this checkpoint?"
        )
    if size < rows:
        return [f"the embedding has {rows} rows for {size} tokens (padding rows are kept; vocab_size = {rows})"]
    return []


def _generation_config(config: dict) -> str:
    from transformers import AutoConfig, GenerationConfig

    fields = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    return GenerationConfig.from_model_config(AutoConfig.for_model(config["model_type"], **fields)).to_json_string()
