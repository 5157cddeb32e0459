"""Calibration text -> token chunks, as llama-imatrix makes them (tools/imatrix/imatrix.cpp
`compute_imatrix`): the text is tokenized once (with the tokenizer's BOS, never its EOS) and
cut into `ctx`-token chunks; the first token of every chunk is replaced by BOS when the
tokenizer adds one, and the tail shorter than a chunk is dropped. Chunks are independent.

The tokenizer is the model's: transformers' for an HF or TencentPretrain checkpoint,
llama.cpp's own (llama-cpp-python, vocabulary only) for a GGUF file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import WeightopsError, describe


@dataclass(frozen=True)
class Tokenizer:
    """What chunking needs of a tokenizer: the ids of a text (no special tokens added) and its
    BOS id when it adds one (None when it does not)."""

    source: str
    ids: list[int]  # ids of the text, without special tokens
    bos: int | None


def hf_tokenize(directory: Path, text: str) -> Tokenizer:
    """Tokenize with the HF tokenizer in `directory` (AutoTokenizer)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(str(directory))
    except Exception as e:  # transformers raises many types for unreadable tokenizers
        raise WeightopsError(f"{directory}: cannot load its tokenizer ({describe(e)})") from None
    plain = tok.encode("a", add_special_tokens=False)
    special = tok.encode("a", add_special_tokens=True)
    if special[len(special) - len(plain) :] != plain or len(special) - len(plain) > 1:
        raise WeightopsError(
            f"{directory}: the tokenizer adds tokens other than BOS ({special} for {plain}); "
            "llama-imatrix refuses such tokenizers too"
        )
    bos = special[0] if len(special) > len(plain) else None
    return Tokenizer(str(directory), tok.encode(text, add_special_tokens=False), bos)


def gguf_tokenize(path: Path, text: str) -> Tokenizer:
    """Tokenize with llama.cpp's tokenizer of a GGUF file (what llama-imatrix uses)."""
    try:
        import llama_cpp
    except ImportError:
        raise WeightopsError(f"{path}: tokenizing for a GGUF file needs llama-cpp-python") from None
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        model = llm._model
        bos = model.token_bos() if model.add_bos_token() else None
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    finally:
        llm.close()
    return Tokenizer(str(path), list(ids), bos)


def chunks(tok: Tokenizer, ctx: int, limit: int | None = None) -> torch.Tensor:
    """int64 [n_chunks, ctx]: the tokens (BOS first, when the tokenizer adds it) cut into
    chunks, the first of each replaced by BOS; at most `limit` chunks."""
    if ctx < 1:
        raise WeightopsError(f"--ctx {ctx}: a chunk needs at least one token")
    ids = ([tok.bos] if tok.bos is not None else []) + tok.ids
    n = len(ids) // ctx
    if n == 0:
        raise WeightopsError(
            f"the calibration text tokenizes to {len(ids)} tokens ({tok.source}), fewer than one "
            f"--ctx {ctx} chunk; give a longer text or a smaller --ctx"
        )
    if limit is not None:
        if limit < 1:
            raise WeightopsError(f"--chunks {limit}: give at least 1")
        n = min(n, limit)
    out = torch.tensor(ids[: n * ctx], dtype=torch.int64).reshape(n, ctx)
    if tok.bos is not None:
        out[:, 0] = tok.bos
    return out
