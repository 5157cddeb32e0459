"""The vocabulary triple — config `vocab_size`, tokenizer size, embedding rows — whose
drift breaks deltas, merges and GGUF conversion; read from files without loading a model."""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import arch
from ..arch import Role
from .checkpoint import Checkpoint, Format
from .tokenizer_files import read_tokenizer_files


@dataclass(frozen=True)
class VocabTriple:
    config: int | None
    tokenizer: int | None
    embedding_rows: int | None
    tokenizer_files: dict[str, int] = field(default_factory=dict)  # file -> ids it defines
    conflicts: tuple[str, ...] = ()  # tokenizer files that disagree, in words

    @property
    def agree(self) -> bool:
        """config == embedding rows, every token id has a row, and the tokenizer files agree.
        A tokenizer smaller than the embedding is padding (BLOOM's 250880 rows,
        --pad-to-multiple), not drift."""
        if self.conflicts:
            return False
        if self.config is not None and self.embedding_rows is not None and self.config != self.embedding_rows:
            return False
        rows = self.embedding_rows if self.embedding_rows is not None else self.config
        return self.tokenizer is None or rows is None or self.tokenizer <= rows

    @property
    def padding_rows(self) -> int:
        rows = self.embedding_rows if self.embedding_rows is not None else self.config
        return max(0, rows - self.tokenizer) if rows is not None and self.tokenizer is not None else 0

    def as_dict(self) -> dict:
        return {
            "config": self.config,
            "tokenizer": self.tokenizer,
            "embedding_rows": self.embedding_rows,
            "padding_rows": self.padding_rows,
            "agree": self.agree,
            "tokenizer_files": self.tokenizer_files,
            "conflicts": list(self.conflicts),
        }


def embedding_name(ckpt: Checkpoint) -> str | None:
    """Name of the input embedding in this checkpoint's own naming scheme."""
    if not arch.is_supported(ckpt.architecture):
        return None
    table = arch.get(ckpt.architecture)
    scheme = {"tencentpretrain": "tp", "gguf": "gguf"}.get(ckpt.format, "hf")
    names = set(ckpt.names())
    embedding = table.tensor(Role.EMBEDDING)
    for candidate in embedding.names(scheme) if embedding else ():
        for name in (candidate, candidate.removeprefix(table.hf_prefix)):
            if name in names:
                return name
    return None


def vocab_triple(ckpt: Checkpoint) -> VocabTriple:
    emb = embedding_name(ckpt)
    rows = ckpt.tensor(emb).shape[0] if emb else None
    if ckpt.format is Format.GGUF:
        meta = ckpt.config or {}
        tokens = meta.get("tokenizer.ggml.tokens")
        return VocabTriple(meta.get(f"{ckpt.architecture}.vocab_size"), len(tokens) if tokens else None, rows)
    config = (ckpt.config or {}).get("vocab_size") if ckpt.format is not Format.TENCENTPRETRAIN else None
    files = read_tokenizer_files(ckpt.directory)
    return VocabTriple(config, files.size, rows, files.sizes, files.conflicts)
