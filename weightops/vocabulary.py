"""The vocabulary triple — config `vocab_size`, tokenizer size, embedding rows — whose
drift breaks deltas, merges and GGUF conversion; read from files without loading a model."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from . import arch
from .arch import Role
from .checkpoint import Checkpoint


@dataclass(frozen=True)
class VocabTriple:
    config: int | None
    tokenizer: int | None
    embedding_rows: int | None

    @property
    def agree(self) -> bool:
        """config == embedding rows, and every token id has a row. A tokenizer smaller than
        the embedding is padding (BLOOM's 250880 rows, --pad-to-multiple), not drift."""
        if self.config is not None and self.embedding_rows is not None and self.config != self.embedding_rows:
            return False
        rows = self.embedding_rows if self.embedding_rows is not None else self.config
        return self.tokenizer is None or rows is None or self.tokenizer <= rows

    @property
    def padding_rows(self) -> int:
        rows = self.embedding_rows if self.embedding_rows is not None else self.config
        return max(0, rows - self.tokenizer) if rows is not None and self.tokenizer is not None else 0

    def as_dict(self) -> dict:
        return {"config": self.config, "tokenizer": self.tokenizer, "embedding_rows": self.embedding_rows,
                "padding_rows": self.padding_rows, "agree": self.agree}


def tokenizer_size(directory: Path) -> int | None:
    """Number of token ids (highest id + 1) the HF tokenizer files in `directory` define."""
    directory = Path(directory)
    ids: set[int] = set()
    tj = directory / "tokenizer.json"
    if tj.is_file():
        data = json.loads(tj.read_text())
        vocab = data.get("model", {}).get("vocab") or {}
        if isinstance(vocab, dict):
            ids.update(vocab.values())
        else:  # Unigram: a list of [piece, score]
            ids.update(range(len(vocab)))
        ids.update(t["id"] for t in data.get("added_tokens", []))
    elif (directory / "tokenizer.model").is_file():
        import sentencepiece as spm
        ids.update(range(spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model")).get_piece_size()))
    else:
        return None
    added = directory / "added_tokens.json"
    if added.is_file():
        ids.update(json.loads(added.read_text()).values())
    return max(ids) + 1 if ids else 0


def embedding_name(ckpt: Checkpoint) -> str | None:
    """Name of the input embedding in this checkpoint's own naming scheme."""
    if not arch.is_supported(ckpt.architecture):
        return None
    table = arch.get(ckpt.architecture)
    scheme = {"tencentpretrain": "tp", "gguf": "gguf"}.get(ckpt.format, "hf")
    names = set(ckpt.names())
    for candidate in table.tensor(Role.EMBEDDING).names(scheme):
        for name in (candidate, candidate.removeprefix(table.hf_prefix)):
            if name in names:
                return name
    return None


def vocab_triple(ckpt: Checkpoint) -> VocabTriple:
    emb = embedding_name(ckpt)
    rows = ckpt.tensor(emb).shape[0] if emb else None
    if ckpt.format == "gguf":
        meta = ckpt.config or {}
        tokens = meta.get("tokenizer.ggml.tokens")
        return VocabTriple(meta.get(f"{ckpt.architecture}.vocab_size"), len(tokens) if tokens else None, rows)
    config = (ckpt.config or {}).get("vocab_size") if ckpt.format != "tencentpretrain" else None
    return VocabTriple(config, tokenizer_size(ckpt.directory), rows)
