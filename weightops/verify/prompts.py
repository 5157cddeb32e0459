"""Prompts for the logit comparison and the tokenizers that turn them into ids.

Both models are fed the same ids: the prompts are tokenised once (by the reference's
tokenizer or `--tokenizer`), and the candidate's own tokenizer is only consulted to report
whether it would have produced other ids.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import WeightopsError, shown
from .default_prompts import PROMPTS

Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class Prompt:
    name: str  # what a failed gate reports: a built-in name, or FILE:LINE
    text: str


@dataclass(frozen=True)
class Tokenized:
    name: str
    ids: tuple[int, ...]


def default_prompts() -> list[Prompt]:
    return [Prompt(name, text) for name, text in PROMPTS]


def read_prompts(path: str | Path) -> list[Prompt]:
    """JSONL (`.jsonl`, or every line a JSON object) with a "text" field (and an optional
    "name"), or plain text with one prompt per blank-line-separated paragraph."""
    path = Path(path)
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise WeightopsError(f"{path}: cannot read prompts ({e})") from None
    lines = content.splitlines()
    jsonl = path.suffix == ".jsonl" or (lines and all(not ln.strip() or ln.lstrip().startswith("{") for ln in lines))
    prompts = _jsonl(path, lines) if jsonl else _paragraphs(path, lines)
    if not prompts:
        raise WeightopsError(f"{path}: no prompts found")
    return prompts


def _jsonl(path: Path, lines: list[str]) -> list[Prompt]:
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError as e:
            raise WeightopsError(f"{path}:{n}: not a JSON object ({e})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
            raise WeightopsError(f'{path}:{n}: a JSONL prompt needs a string field "text"')
        # the name is only a label in reports and errors: escaped once, here
        out.append(Prompt(shown(doc.get("name") or f"{path.name}:{n}"), doc["text"]))
    return out


def _paragraphs(path: Path, lines: list[str]) -> list[Prompt]:
    out: list[Prompt] = []
    buf: list[str] = []
    start = 0
    for n, line in enumerate([*lines, ""], 1):
        if line.strip():
            if not buf:
                start = n
            buf.append(line)
        elif buf:
            out.append(Prompt(shown(f"{path.name}:{start}"), "\n".join(buf)))
            buf = []
    return out


def tokenize(prompts: list[Prompt], encode: Encode, max_tokens: int | None) -> list[Tokenized]:
    """Ids of every prompt, cut to `max_tokens` (the models' context)."""
    out = []
    for p in prompts:
        ids = tuple(int(i) for i in encode(p.text))
        out.append(Tokenized(p.name, ids[:max_tokens] if max_tokens else ids))
    return out


def hf_encoder(directory: Path) -> Encode:
    """The HF tokenizer in `directory`, adding the special tokens it is configured to add (BOS).
    Tokenizer files that disagree are refused: transformers would pick one of them silently."""
    from transformers import AutoTokenizer

    from ..io.tokenizer_files import read_tokenizer_files

    read_tokenizer_files(directory).check()
    try:
        tok = AutoTokenizer.from_pretrained(str(directory))
    except Exception as e:  # transformers raises OSError/ValueError/... for unusable files
        raise WeightopsError(f"{directory}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
    return lambda text: list(tok(text)["input_ids"])


def llama_cpp_encoder(gguf_path: Path) -> Encode:
    """llama.cpp's own tokenizer of a GGUF file (what users of the file will get), adding BOS
    as the file says and parsing special tokens, as transformers does."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise WeightopsError(
            f"{gguf_path}: reading a GGUF tokenizer needs llama-cpp-python "
            "(pip install llama-cpp-python), or pass --tokenizer DIR"
        ) from None
    vocab = Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    return lambda text: list(vocab.tokenize(text.encode("utf-8"), add_bos=True, special=True))


def first_difference(a: tuple[int, ...], b: tuple[int, ...]) -> int | None:
    """Index of the first differing id (the shorter length when one is a prefix), or None."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
