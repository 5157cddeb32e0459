"""Which token of a new tokenizer is which of an old one: the maps `ops.vocab` plans rows with.
They take loaded tokenizer objects, never files."""

from __future__ import annotations

from collections.abc import Iterable


def token_map(old_tok, new_tok) -> dict[int, int]:
    """new id -> old id for every token string both tokenizers know."""
    old = old_tok.get_vocab()
    return {i: old[t] for t, i in new_tok.get_vocab().items() if t in old}


def decompose(old_tok, new_tok, tokens: Iterable[str]) -> dict[str, list[int]]:
    """Ids of each token (strings of `new_tok`) under the old tokenizer, without BOS/EOS.

    An added token is text, so it is encoded as text. A model piece is split by the old
    tokenizer's model directly when both tokenizers normalise and pre-tokenize alike (exact:
    a word-internal piece like `们` gets no `▁` that re-encoding as a word would add);
    otherwise it is decoded to text and re-encoded.
    """
    added = new_tok.get_added_vocab()
    old_backend, new_backend = getattr(old_tok, "backend_tokenizer", None), getattr(new_tok, "backend_tokenizer", None)
    direct = old_backend is not None and new_backend is not None and _pretok(old_backend) == _pretok(new_backend)
    out = {}
    for token in tokens:
        if token in added:
            out[token] = old_tok.encode(token, add_special_tokens=False)
        elif direct and old_backend is not None:  # `direct` implies a backend
            out[token] = [t.id for t in old_backend.model.tokenize(token)]
        else:
            out[token] = old_tok.encode(new_tok.convert_tokens_to_string([token]), add_special_tokens=False)
    return out


def _pretok(backend) -> tuple:
    """The normaliser and pre-tokenizer settings (serialised; not the whole vocabulary)."""
    return tuple(None if c is None else c.__getstate__() for c in (backend.normalizer, backend.pre_tokenizer))
