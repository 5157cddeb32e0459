"""The tokenizer files of a directory, each read on its own, checked against each other and
against the embedding: one check shared by every command that reads a vocabulary.

A directory can hold several descriptions of its tokenizer (tokenizer.model, tokenizer.json,
vocab.json + merges.txt, added tokens in three places) and each consumer reads a different
one: transformers the tokenizer.json, llama.cpp's converter the tokenizer.model, weightops'
size count the union. When they disagree — transformers 5's
`LlamaTokenizer(vocab_file=...).save_pretrained` writes a 3-token tokenizer.json beside a
32,000-piece tokenizer.model — a command would silently work on a vocabulary other than the
one the model was trained with, so the disagreement is refused (and reported by `inspect`),
naming both files and both sizes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..errors import WeightopsError

T = TypeVar("T")


@dataclass(frozen=True)
class TokenizerFiles:
    """What the tokenizer files in `directory` define.

    `sizes`: file -> token ids it defines (highest id + 1; tokenizer.model: its pieces, which
    added tokens elsewhere may extend). `size`: the ids all files define together (None: no
    tokenizer files). `conflicts`: the disagreements between files, in words.
    """

    directory: Path
    sizes: dict[str, int]
    size: int | None
    conflicts: tuple[str, ...]

    def problems(self, *, rows: int | None = None, config: Any = None, embedding: str | None = None) -> list[str]:
        """The conflicts, then more token ids than `rows` embedding rows (`embedding` says which
        tensor of which file) or than the config's `vocab_size`. Fewer is padding (BLOOM's
        250880 rows), not drift."""
        out = list(self.conflicts)
        where = f" ({embedding})" if embedding else ""
        if self.size is not None and rows is not None and self.size > rows:
            out.append(
                f"{self.directory}: the tokenizer files define {self.size} token ids ({self.listing()}) "
                f"but the embedding has only {rows} rows{where}"
            )
        elif self.size is not None and isinstance(config, int) and self.size > config:
            out.append(
                f"{self.directory}: the tokenizer files define {self.size} token ids ({self.listing()}) "
                f"but config.json vocab_size is {config}"
            )
        return out

    def check(self, *, rows: int | None = None, config: Any = None, embedding: str | None = None) -> None:
        """Raise on any of `problems`: a command must not pick one of two vocabularies, nor
        read token ids the model has no rows for."""
        problems = self.problems(rows=rows, config=config, embedding=embedding)
        if self.conflicts:
            raise WeightopsError(
                "; ".join(problems) + ". Keep only the files of the tokenizer the model was "
                "trained with (e.g. regenerate tokenizer.json from tokenizer.model)"
            )
        if problems:
            raise WeightopsError(
                "; ".join(problems) + ": resize the embedding (weightops expand-vocab) or use "
                "the tokenizer the model was trained with"
            )

    def listing(self) -> str:
        return ", ".join(f"{name} {n}" for name, n in self.sizes.items())


def read_tokenizer_files(directory: Path) -> TokenizerFiles:
    """Read every tokenizer file in `directory` on its own and compare them."""
    directory = Path(directory)
    base: dict[str, int] = {}  # file -> size of its own vocabulary (no added tokens)
    sizes: dict[str, int] = {}  # file -> ids it defines
    merges: dict[str, int] = {}
    slow: dict[int, str] = {}  # the slow tokenizer's id -> token (tokenizer.model, else vocab.json)
    fast: dict[int, str] | None = None  # tokenizer.json's id -> token: the whole fast tokenizer
    if (directory / "tokenizer.model").is_file():
        slow = dict(enumerate(_spm_pieces(directory / "tokenizer.model")))
        base["tokenizer.model"] = sizes["tokenizer.model"] = len(slow)
    data = _json(directory / "tokenizer.json")
    if data is not None:
        own, added, n_merges = _parsed(directory / "tokenizer.json", lambda: _fast_tokenizer(data))
        fast = {**own, **added}
        base["tokenizer.json"] = max(own, default=-1) + 1
        sizes["tokenizer.json"] = max(fast, default=-1) + 1
        if n_merges is not None:
            merges["tokenizer.json"] = n_merges
    vocab_json = _json(directory / "vocab.json")
    if vocab_json is not None:
        vocab_ids = _parsed(directory / "vocab.json", lambda: {int(i): str(t) for t, i in vocab_json.items()})
        base["vocab.json"] = sizes["vocab.json"] = max(vocab_ids, default=-1) + 1
        slow = slow or vocab_ids
    if (directory / "merges.txt").is_file():
        lines = (directory / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges["merges.txt"] = sum(1 for line in lines if line.strip() and not line.startswith("#version"))
    conflicts = _mismatches(directory, base, "vocabulary has", "tokens") + _mismatches(
        directory, merges, "list has", "merges"
    )

    # Added tokens must be the same token in every file that has their id; with a
    # tokenizer.json (the complete fast tokenizer) they must be in it.
    reference = "tokenizer.json" if fast is not None else next(iter(base), "")
    known = {i: (t, reference) for i, t in (fast if fast is not None else slow).items()}
    for name, added_ids in _added_tokens(directory).items():
        sizes[name] = max(added_ids, default=-1) + 1
        for token_id, text in sorted(added_ids.items()):
            other, where = known.setdefault(token_id, (text, name))
            if other != text:
                conflicts.append(f"{directory}: token id {token_id} is {text!r} in {name} but {other!r} in {where}")
            elif fast is not None and where == name:
                conflicts.append(
                    f"{directory}: {name} defines token {text!r} (id {token_id}) that tokenizer.json "
                    f"({sizes['tokenizer.json']} tokens) lacks"
                )
    size = max(sizes.values()) if sizes else None
    return TokenizerFiles(directory, sizes, size, tuple(dict.fromkeys(conflicts)))


def _fast_tokenizer(data: dict) -> tuple[dict[int, str], dict[int, str], int | None]:
    """(model vocabulary, added tokens, merge count) of a tokenizer.json document."""
    model = data.get("model") or {}
    vocab = model.get("vocab") or {}
    own = dict(enumerate(p[0] for p in vocab)) if isinstance(vocab, list) else {int(i): t for t, i in vocab.items()}
    added = {int(t["id"]): t["content"] for t in data.get("added_tokens") or []}
    merges = model.get("merges")
    return own, added, len(merges) if isinstance(merges, list) else None


def _added_tokens(directory: Path) -> dict[str, dict[int, str]]:
    """Added tokens by file: added_tokens.json (text -> id) and tokenizer_config.json's
    added_tokens_decoder (id -> {content})."""
    out = {}
    added = _json(directory / "added_tokens.json")
    if added:
        out["added_tokens.json"] = _parsed(
            directory / "added_tokens.json", lambda: {int(i): str(t) for t, i in added.items()}
        )
    config = _json(directory / "tokenizer_config.json")
    decoder = config.get("added_tokens_decoder") if isinstance(config, dict) else None
    if decoder:
        out["tokenizer_config.json"] = _parsed(
            directory / "tokenizer_config.json", lambda: {int(i): d["content"] for i, d in decoder.items()}
        )
    return out


def _mismatches(directory: Path, counts: dict[str, int], verb: str, unit: str) -> list[str]:
    """Each file whose count differs from the first file's, both named with both counts."""
    items = list(counts.items())
    return [
        f"{directory}: {name}'s {verb} {n} {unit} but {items[0][0]}'s {items[0][1]}"
        for name, n in items[1:]
        if n != items[0][1]
    ]


def _parsed(path: Path, parse: Callable[[], T]) -> T:
    """`parse()` of a JSON document read from `path`; a document of the wrong shape is named."""
    try:
        return parse()
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise WeightopsError(f"{path}: unexpected structure ({type(e).__name__}: {e})") from None


def _json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise WeightopsError(f"{path}: not a valid JSON tokenizer file ({e})") from None


def _spm_pieces(path: Path) -> list[str]:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf raises its own DecodeError
        raise WeightopsError(f"{path}: not a SentencePiece model ({e})") from None
    return [p.piece for p in proto.pieces]
