"""HF tokenizer files -> GGUF `tokenizer.ggml.*` metadata, as llama.cpp's converter writes it
(reference: shared/reference/gguf.md).

Three encodings, tried in the order the architecture gives:
- `sentencepiece` (tokenizer.model): model "llama", pieces with scores and types;
- `llama-hf` (a byte-fallback BPE tokenizer.json made from SentencePiece): model "llama";
- `gpt2` (byte-level BPE tokenizer.json): model "gpt2", tokens, types, merges and the
  pre-tokenizer name llama.cpp must use to split text before BPE.
The token list always has exactly as many entries as the embedding has rows: missing ids
become `[PAD{i}]` (UNUSED). Added tokens are CONTROL when special, USER_DEFINED otherwise,
so that llama.cpp matches them whole and never splits them. Special ids, add_bos/add_eos/
add_sep, merges and the chat template are read by gguf's `SpecialVocab` as the pinned
converter runs it (`special_vocab`). The BPE vocabulary and its pre-tokenizer hash come from
the `tokenizers` library directly: transformers (seconds to import) is never loaded here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf
from gguf import TokenType

from ..errors import WeightopsError
from .special_vocab import SpecialVocab
from .tokenizer_files import read_tokenizer_files

# llama.cpp identifies a BPE pre-tokenizer by hashing the ids its tokenizer gives for this text.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
    "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 "
    "3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
    "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= \u043d\u0435\u0449\u043e \u043d\u0430 "
    "\u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 ''''''```````\"\"\"\"......!!!!!!?????? I've been "
    "'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256 of str(ids of CHECK_TEXT) -> tokenizer.ggml.pre, from llama.cpp's convert_hf_to_gguf.py
# (a selection: the LLaMA/BLOOM families and widely used byte-level BPE tokenizers).
KNOWN_PRE: dict[str, str] = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "c7ea5862a53e4272c035c8238367063e2b270d51faa48c0f09e9d5b54746c360": "poro-chat",
    "7fc505bd3104ca1083b150b17d088b59534ede9bde81f0dd2090967d7fe52cee": "viking",
    "b53802fb28e26d645c3a310b34bfe07da813026ec7c7716883404d5e0f8b1901": "jais",
    "7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f": "codeshell",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7": "bloom",
    "bc01ce58980e1db43859146dc51b1758b3b88729b217a74792e9f8d43e479d21": "gpt3-finnish",
    "4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae": "exaone",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "60824e3c0d9401f89943cbb2fff727f0e2d4c545ba4df2d6e4f09a6db0f5b450": "chameleon",
    "b6e8e1518dc4305be2fe39c313ed643381c4da5db34a98f6a04c093f8afbe99b": "chatglm-bpe",
    "81d72c7348a9f0ebe86f23298d37debe0a5e71149e29bd283904c02262b27516": "chatglm-bpe",
    "a1336059768a55c99a734006ffb02203cd450fed003e9a71886c88acf24fdbc2": "glm4",
    "1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35": "minerva-7b",
    "ad851be1dba641f2e3711822f816db2c265f788b37c63b4e1aeacb9ee92de8eb": "gigachat",
    "d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1": "megrez",
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec": "seed-coder",
}
PRE_NAMES = sorted(set(KNOWN_PRE.values()) | {"default"})

# tokenizer.json Split regexes whose llama.cpp pre-tokenizer is known (for unknown vocabularies).
_GPT2_REGEX = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"
_LLAMA3_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
# BLOOM's tokenizer.json splits with this before a ByteLevel step (llama.cpp's "bloom" pre-tokenizer).
BLOOM_SPLIT_REGEX = " ?[^(\\s|[.,!?…。，、।۔،])]+"
# Qwen2's: LLaMA 3's with single digits (llama.cpp's "qwen2" pre-tokenizer).
QWEN2_SPLIT_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
_SPLIT_PRE = {_GPT2_REGEX: "gpt-2", _LLAMA3_REGEX: "llama-bpe", BLOOM_SPLIT_REGEX: "bloom", QWEN2_SPLIT_REGEX: "qwen2"}


@dataclass
class TokenizerSummary:
    """What went into the file, for the report and the tests."""

    model: str  # tokenizer.ggml.model
    pre: str  # tokenizer.ggml.pre
    pre_source: str  # how `pre` was chosen
    tokens: int
    padding: int  # [PAD{i}] entries added to reach the embedding rows
    control: list[str]  # added special tokens typed CONTROL


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError as e:
        raise WeightopsError(f"{path}: invalid JSON ({e})") from None


def looks_special(text: str) -> bool:
    """Added tokens some models forget to mark special (llama.cpp's converter treats them as such)."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


@contextmanager
def quiet_gguf() -> Iterator[None]:
    """gguf's SpecialVocab logs parser notes (e.g. about TemplateProcessing) that mean nothing to users."""
    loggers = [logging.getLogger(name) for name in ("gguf.vocab", "gguf.gguf_writer")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def add_tokenizer(
    writer: gguf.GGUFWriter,
    directory: Path,
    *,
    n_vocab: int,
    encodings: Sequence[str],
    default_pre: str,
    add_space_prefix: bool,
    pre_tokenizer: str | None = None,
    config_vocab: int | None = None,
    embedding: str | None = None,
    warn: Callable[[str], None] = lambda msg: None,
) -> TokenizerSummary:
    """Add the `tokenizer.ggml.*` keys for the HF tokenizer in `directory`, with `n_vocab` tokens
    (the rows of `embedding`). Tokenizer files that disagree with each other, with those rows
    or with `config_vocab` are refused: the file would otherwise hold whichever one is read."""
    directory = Path(directory)
    read_tokenizer_files(directory).check(rows=n_vocab, config=config_vocab, embedding=embedding)
    config = _read_json(directory / "tokenizer_config.json")
    if add_space_prefix and config.get("add_prefix_space") is not None:
        writer.add_add_space_prefix(config["add_prefix_space"])
    for encoding in encodings:
        if encoding == "sentencepiece" and (directory / "tokenizer.model").is_file():
            return _sentencepiece(writer, directory, config, n_vocab)
        if encoding == "llama-hf" and (directory / "tokenizer.json").is_file():
            try:
                vocab = gguf.LlamaHfVocab(directory)
            except (FileNotFoundError, TypeError):
                continue  # not a byte-fallback BPE made from SentencePiece
            return _llama_hf(writer, directory, vocab, n_vocab)
        if encoding == "gpt2" and (directory / "tokenizer.json").is_file():
            return _gpt2(writer, directory, n_vocab, default_pre, pre_tokenizer, warn)
    wanted = " or ".join(
        {"sentencepiece": "tokenizer.model", "gpt2": "tokenizer.json"}.get(e, "tokenizer.json")
        for e in encodings
        if e != "llama-hf"
    )
    raise WeightopsError(f"{directory}: no tokenizer found (looked for {wanted}); pass --tokenizer DIR")


def _sentencepiece(writer: gguf.GGUFWriter, directory: Path, config: dict, n_vocab: int) -> TokenizerSummary:
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [int(TokenType.UNUSED)] * n_vocab
    for i in range(sp.vocab_size()):
        tokens[i], scores[i] = sp.IdToPiece(i), sp.GetScore(i)
        types[i] = int(
            TokenType.UNKNOWN
            if sp.IsUnknown(i)
            else TokenType.CONTROL
            if sp.IsControl(i)
            else TokenType.UNUSED
            if sp.IsUnused(i)
            else TokenType.BYTE
            if sp.IsByte(i)
            else TokenType.NORMAL
        )

    def put(token_id: int, text: str, special: bool) -> None:
        tokens[token_id], scores[token_id] = text if special else text.replace("\u2581", " "), -1000.0
        types[token_id] = int(TokenType.CONTROL if special else TokenType.USER_DEFINED)

    for text, token_id in _read_json(directory / "added_tokens.json").items():
        tokens[token_id], scores[token_id], types[token_id] = text, -1000.0, int(TokenType.USER_DEFINED)
    for key, data in config.get("added_tokens_decoder", {}).items():
        put(int(key), data["content"], bool(data.get("special")) or looks_special(data["content"]))
    # transformers 5 keeps added tokens only in tokenizer.json: type the ids nothing else defined
    for data in _read_json(directory / "tokenizer.json").get("added_tokens", []):
        if types[data["id"]] == TokenType.UNUSED:
            put(data["id"], data["content"], bool(data.get("special")) or looks_special(data["content"]))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    with quiet_gguf():
        SpecialVocab(directory, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    return _summary("llama", "default", "SentencePiece", tokens, types)


def _llama_hf(writer: gguf.GGUFWriter, directory: Path, vocab: Any, n_vocab: int) -> TokenizerSummary:
    tokens, scores, types = [], [], []
    for text, score, toktype in vocab.all_tokens():
        tokens.append(text.decode("utf-8") if isinstance(text, bytes) else text)
        scores.append(score)
        types.append(int(toktype))
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]")
        scores.append(-10000.0)
        types.append(int(TokenType.UNUSED))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    with quiet_gguf():
        SpecialVocab(directory, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    return _summary("llama", "default", "SentencePiece-style tokenizer.json", tokens, types)


def _gpt2(
    writer: gguf.GGUFWriter,
    directory: Path,
    n_vocab: int,
    default_pre: str,
    pre_tokenizer: str | None,
    warn: Callable[[str], None],
) -> TokenizerSummary:
    """The converter's get_vocab_base, on the `tokenizers` object transformers itself wraps."""
    tok = load_fast_tokenizer(directory)
    vocab: dict[str, int] = tok.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    decoder = tok.get_added_tokens_decoder()
    added = {t.content: i for i, t in sorted(decoder.items())}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
            continue
        text = by_id[i]
        if text in added:
            info = decoder.get(i) or decoder[added[text]]
            if not info.normalized:  # llama.cpp expects added tokens pre-normalized
                text = tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)
            if info.special or looks_special(text):
                types.append(int(TokenType.CONTROL))
            else:
                text = text.replace("\u2581", " ")
                types.append(int(TokenType.USER_DEFINED))
        else:
            types.append(int(TokenType.NORMAL))
        tokens.append(text)
    pre, source = choose_pre(tok, directory, default_pre, pre_tokenizer, warn)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with quiet_gguf():
        SpecialVocab(directory, load_merges=True).add_to_gguf(writer, quiet=True)
    return _summary("gpt2", pre, source, tokens, types)


def load_fast_tokenizer(directory: Path) -> Any:
    """directory/tokenizer.json as a `tokenizers.Tokenizer` (the object transformers' fast
    tokenizers wrap; loading it directly takes milliseconds, not transformers' seconds)."""
    from tokenizers import Tokenizer

    path = Path(directory) / "tokenizer.json"
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for unreadable files
        raise WeightopsError(f"{path}: the tokenizers library cannot load it ({e})") from None


def check_hash(tokenizer: Any) -> str:
    """The hash llama.cpp's converter computes to recognise a BPE pre-tokenizer: sha256 of the
    ids (special tokens added, as transformers' `encode` does) of CHECK_TEXT."""
    return sha256(str(tokenizer.encode(CHECK_TEXT).ids).encode()).hexdigest()


def choose_pre(
    tokenizer: Any, directory: Path, default_pre: str, requested: str | None, warn: Callable[[str], None]
) -> tuple[str, str]:
    """(tokenizer.ggml.pre, how it was chosen): --pre-tokenizer, else llama.cpp's hash table,
    else the tokenizer.json pre-tokenizer regex, else the architecture's default."""
    if requested:
        if requested not in PRE_NAMES:
            warn(
                f"--pre-tokenizer {requested!r} is not one weightops knows ({', '.join(PRE_NAMES)}); "
                "llama.cpp refuses files whose pre-tokenizer it does not know"
            )
        return requested, "--pre-tokenizer"
    digest = check_hash(tokenizer)
    if digest in KNOWN_PRE:
        return KNOWN_PRE[digest], "llama.cpp check-text hash"
    from_regex = _pre_from_tokenizer_json(_read_json(directory / "tokenizer.json"))
    pre, reason = (
        (from_regex, "tokenizer.json pre-tokenizer regex") if from_regex else (default_pre, "architecture default")
    )
    warn(
        f"{directory}: BPE pre-tokenizer not recognised by llama.cpp's check-text hash ({digest[:16]}...), "
        f"e.g. an expanded vocabulary; writing tokenizer.ggml.pre={pre!r} ({reason}). If llama.cpp splits text "
        f"differently from the HF tokenizer, re-run with --pre-tokenizer NAME (one of: {', '.join(PRE_NAMES)})"
    )
    return pre, reason


def _pre_from_tokenizer_json(data: dict) -> str | None:
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if step.get("type") == "Split":
            pattern = step.get("pattern", {})
            regex = pattern.get("Regex", pattern.get("String", ""))
            if regex in _SPLIT_PRE:
                return _SPLIT_PRE[regex]
            if regex.startswith(" ?[^(") and "\u3002\uff0c\u3001" in regex:  # BLOOM's " ?[^(\s|[.,!?…。，、।۔،])]+"
                return "bloom"
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        return "gpt-2"  # ByteLevel's built-in regex is GPT-2's
    return None


def _summary(model: str, pre: str, source: str, tokens: list[str], types: list[int]) -> TokenizerSummary:
    padding = sum(
        1 for i, (t, k) in enumerate(zip(tokens, types, strict=False)) if k == TokenType.UNUSED and t == f"[PAD{i}]"
    )
    return TokenizerSummary(
        model,
        pre,
        source,
        len(tokens),
        padding,
        [t for t, k in zip(tokens, types, strict=False) if k == TokenType.CONTROL],
    )
