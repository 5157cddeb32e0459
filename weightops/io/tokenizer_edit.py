"""Tokenizer edits for vocabulary expansion, and the token-string maps that say which
embedding row goes where.

Edits go through sentencepiece's model proto, `tokenizers` and transformers, never by
rewriting token tables by hand: a SentencePiece merge by Chinese-LLaMA's rule (see
shared/reference/vocab.md), added normal tokens, and added special tokens (never split,
marked special) for SentencePiece-based and `tokenizer.json` (BPE) tokenizers alike.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from ..errors import WeightopsError
from .hf import AUX_FILES

# Everything in AUX_FILES except the model's own config files belongs to the tokenizer.
TOKENIZER_FILES = tuple(n for n in AUX_FILES if n not in ("config.json", "generation_config.json"))


def _proto(data: bytes, source: str | Path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as e:  # protobuf raises its own DecodeError
        raise WeightopsError(f"{source}: not a SentencePiece model ({e})") from None
    return proto


def merge_spm(base: bytes, other: bytes, *, source: str | Path = "other model") -> tuple[bytes, list[str]]:
    """Append every piece of `other` that `base` lacks, in `other`'s order, with score 0 and
    type NORMAL; base ids never move and `trainer_spec` stays as it was (Chinese-LLaMA's rule).

    The other model's own unknown/control pieces (`<unk>`, `<s>`, `</s>`) are skipped even
    if spelled differently from the base's: appended as normal text they would be wrong.
    Returns the merged model's bytes and the appended pieces.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    merged, extra = _proto(base, "base tokenizer.model"), _proto(other, source)
    have = {p.piece for p in merged.pieces}
    skip = (pb.ModelProto.SentencePiece.UNKNOWN, pb.ModelProto.SentencePiece.CONTROL)
    added = []
    for p in extra.pieces:
        if p.piece in have or p.type in skip:
            continue
        piece = merged.pieces.add()
        piece.piece, piece.score = p.piece, 0.0
        have.add(p.piece)
        added.append(p.piece)
    return merged.SerializeToString(), added


def load(directory: Path):
    """The transformers tokenizer in `directory` (a clear error when there is none)."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not any((directory / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        raise WeightopsError(f"{directory}: no tokenizer (tokenizer.json or tokenizer.model) found")
    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as e:
        raise WeightopsError(f"{directory}: transformers cannot load the tokenizer ({type(e).__name__}: {e})") from None


def copy_tokenizer_files(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)


def edit(
    directory: Path,
    *,
    merge: Path | None = None,
    add_tokens: Iterable[str] = (),
    special_tokens: Iterable[str] = (),
    origin: Path | None = None,
) -> None:
    """Apply the edits in place to the tokenizer files in `directory`, in this order: merge
    the SentencePiece model `merge`, add normal tokens, add special tokens. `origin` is where
    the files came from, named in error messages (default: `directory`)."""
    directory = Path(directory)
    add_tokens, special_tokens = list(add_tokens), list(special_tokens)
    if merge is not None:
        _merge_into(directory, Path(merge), Path(origin or directory))
    if add_tokens or special_tokens:
        tok = load(directory)
        tok.add_tokens(add_tokens)
        tok.add_special_tokens({"additional_special_tokens": special_tokens}, replace_extra_special_tokens=False)
        tok.save_pretrained(directory)
        _write_compat_files(directory, tok)


def _merge_into(directory: Path, other: Path, origin: Path) -> None:
    """Merge `other` into directory/tokenizer.model and regenerate tokenizer.json from it."""
    model = directory / "tokenizer.model"
    if not model.is_file():
        raise WeightopsError(
            f"--merge-spm needs a SentencePiece tokenizer.model next to the model; "
            f"{origin} has none (a tokenizer.json-only BPE tokenizer cannot be merged)"
        )
    if not other.is_file():
        raise WeightopsError(f"{other}: no such SentencePiece model")
    pieces = _proto(model.read_bytes(), model).pieces
    beyond = {t: i for t, i in load(directory).get_added_vocab().items() if i >= len(pieces)}
    if beyond:
        raise WeightopsError(
            f"{origin}: tokens {sorted(beyond, key=lambda t: beyond[t])} are added after the "
            f"{len(pieces)} pieces of tokenizer.model; merging would move their ids. Merge "
            f"into the plain SentencePiece tokenizer and add them afterwards (--special-token)"
        )
    merged, _ = merge_spm(model.read_bytes(), other.read_bytes(), source=other)
    # BOS/EOS insertion lives in tokenizer.json's post-processor (transformers 5 no longer keeps
    # add_bos_token in tokenizer_config.json), and a conversion from tokenizer.model alone adds
    # neither; the base's ids of <s> and </s> do not move, so its post-processor still holds.
    post_processor = load(directory).backend_tokenizer.post_processor
    model.write_bytes(merged)
    for stale in ("tokenizer.json", "added_tokens.json"):
        (directory / stale).unlink(missing_ok=True)
    tok = load(directory)  # transformers converts tokenizer.model into a fast tokenizer
    _rank_merges_by_score(tok, _proto(merged, model))
    if post_processor is not None:
        tok.backend_tokenizer.post_processor = post_processor
    tok.save_pretrained(directory)


def _rank_merges_by_score(tok, proto) -> None:
    """Order a converted BPE tokenizer's merges by SentencePiece score, as SentencePiece does.

    transformers 5 ranks the merges by piece id, which would put the appended score-0
    pieces after every base merge; SentencePiece prefers the highest score, so they win.
    Ranking by score (as transformers 4's LlamaConverter did) makes tokenizer.json encode
    as tokenizer.model does, except where equal scores are broken differently
    (SentencePiece: leftmost pair; tokenizers: lower rank).
    """
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import models
    from transformers.tokenization_utils_base import generate_merges

    old = tok.backend_tokenizer.model
    if proto.trainer_spec.model_type != pb.TrainerSpec.BPE or not isinstance(old, models.BPE):
        return
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    scores = {p.piece: p.score for p in proto.pieces if p.type == pb.ModelProto.SentencePiece.NORMAL}
    options = {
        k: getattr(old, k)
        for k in (
            "unk_token",
            "fuse_unk",
            "byte_fallback",
            "dropout",
            "ignore_merges",
            "continuing_subword_prefix",
            "end_of_word_suffix",
        )
    }
    tok.backend_tokenizer.model = models.BPE(
        vocab=vocab, merges=generate_merges(vocab, scores), **{k: v for k, v in options.items() if v is not None}
    )


def _write_compat_files(directory: Path, tok) -> None:
    """What transformers 5 no longer writes but older loaders and GGUF converters read:
    special_tokens_map.json (with additional_special_tokens) and, for SentencePiece models,
    the tokens beyond tokenizer.model's pieces in added_tokens.json (id by text) and in
    tokenizer_config.json `added_tokens_decoder` (with their `special` flag, which
    llama.cpp's converter needs to type them CONTROL rather than USER_DEFINED)."""
    special = {**tok.special_tokens_map, "additional_special_tokens": list(tok.extra_special_tokens)}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
    model = directory / "tokenizer.model"
    if not model.is_file():
        return
    pieces = len(_proto(model.read_bytes(), model).pieces)
    extra = {i: t for i, t in sorted(tok.added_tokens_decoder.items()) if i >= pieces}
    (directory / "added_tokens.json").write_text(
        json.dumps({t.content: i for i, t in extra.items()}, indent=2, ensure_ascii=False) + "\n"
    )
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["added_tokens_decoder"] = {str(i): t.__getstate__() for i, t in extra.items()}
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False, sort_keys=True) + "\n")
