"""`verify --structure-only`: compare two checkpoints without running them.

Tensor names and shapes are compared under HF names (TencentPretrain through the remap view,
GGUF through the architecture table), so a faithful conversion compares equal. Values are
compared by sha256 where both sides store them alike: two torch checkpoints with the same
dtype (TencentPretrain's q/k rows permuted back first), or two GGUF files with the same GGML
type. Then the vocabulary triple and the tokenizer's special tokens.
"""

from __future__ import annotations

from typing import Any

from .. import arch, progress
from ..io.checkpoint import Format
from ..io.vocabulary import vocab_triple
from ..stream import TensorRef, matches_any
from .logits import Model
from .manifest import sha256_tensor

_LISTED = 10
# GGUF token types (gguf.TokenType) that HF tokenizers call special.
_SPECIAL_TOKEN_TYPES = (2, 3)  # UNKNOWN, CONTROL


def hf_named(model: Model, other_is_gguf: bool = False) -> dict[str, TensorRef]:
    """The model's tensors under HF names (values as stored, except TencentPretrain's, which
    come back in HF layout). Tensors with no counterpart across formats are left out: old
    rotary inv_freq buffers, and, opposite a GGUF file, what GGUF does not store."""
    ckpt = model.ckpt
    if ckpt.format is Format.TENCENTPRETRAIN:
        from ..io.remap import hf_view

        return {r.name: r for r in hf_view(ckpt)[0]}
    if not arch.is_supported(ckpt.architecture):
        return {r.name: r for r in ckpt.tensors}
    table = arch.get(ckpt.architecture)
    if ckpt.format is Format.GGUF:
        out = {}
        for r in ckpt.tensors:
            hit = table.lookup(r.name, "gguf")
            out[hit[0].hf.format(n=hit[1]) if hit else r.name] = r
        return out
    skip = [p.replace("{n}", "*") for p in table.droppable]
    return {
        table.normalize_hf(r.name): r
        for r in ckpt.tensors
        if not matches_any(table.normalize_hf(r.name), skip)
        and not (other_is_gguf and (hit := table.lookup(r.name, "hf")) and not hit[0].in_gguf)
    }


def _digest(ref: TensorRef) -> str:
    digest = sha256_tensor(ref)
    ref.release()
    return digest


def compare_tensors(ref: Model, cand: Model, *, values: bool = True) -> dict[str, Any]:
    """Names, shapes and (where comparable, `values=True`) sha256 of the values."""
    a = hf_named(ref, cand.format is Format.GGUF)
    b = hf_named(cand, ref.format is Format.GGUF)
    common = [n for n in a if n in b]
    shape = [f"{n}: {a[n].shape} vs {b[n].shape}" for n in common if a[n].shape != b[n].shape]
    out: dict[str, Any] = {
        "reference": len(a),
        "candidate": len(b),
        "names": "hf",
        "missing": sorted(set(a) - set(b)),
        "extra": sorted(set(b) - set(a)),
        "shape_mismatch": shape,
    }
    same_kind = (ref.format is Format.GGUF) == (cand.format is Format.GGUF)
    comparable = [n for n in common if same_kind and a[n].shape == b[n].shape and a[n].stored_type == b[n].stored_type]
    checks: dict[str, Any] = {"compared": 0, "differ": [], "not_comparable": len(common) - len(comparable)}
    if values:
        for n in progress.iterate(comparable, len(comparable), "comparing tensors"):
            checks["compared"] += 1
            if _digest(a[n]) != _digest(b[n]):
                checks["differ"].append(n)
    out["checksums"] = checks
    return out


def special_tokens(model: Model, tokenizer_dir=None) -> dict[str, Any] | None:
    """Role ids (bos/eos/unk/pad) and the special tokens {token: id}, from the HF tokenizer
    files or GGUF metadata; None when the model carries no tokenizer."""
    if model.format is Format.GGUF:
        meta = model.ckpt.config or {}
        tokens, types = meta.get("tokenizer.ggml.tokens") or [], meta.get("tokenizer.ggml.token_type") or []
        roles = {
            role: meta.get(f"tokenizer.ggml.{key}_token_id")
            for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))
        }
        special = {t: i for i, (t, ty) in enumerate(zip(tokens, types, strict=False)) if ty in _SPECIAL_TOKEN_TYPES}
        return {"roles": roles, "special": special}
    directory = tokenizer_dir or model.tokenizer
    if directory is None:
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(directory))
    roles = {role: getattr(tok, f"{role}_token_id") for role in ("bos", "eos", "unk", "pad")}
    special = {t: i for t, i in zip(tok.all_special_tokens, tok.all_special_ids, strict=True)}
    return {"roles": roles, "special": special}


def _vocab_problems(side: str, t: dict) -> list[str]:
    out = [f"{side}: {c}" for c in t.get("conflicts", [])]
    if t["tokenizer"] is not None and t["embedding_rows"] is not None and t["tokenizer"] > t["embedding_rows"]:
        out.append(f"{side}: the tokenizer has {t['tokenizer']} ids but the embedding only {t['embedding_rows']} rows")
    if t["config"] is not None and t["embedding_rows"] is not None and t["config"] != t["embedding_rows"]:
        out.append(f"{side}: config vocab_size {t['config']} != {t['embedding_rows']} embedding rows")
    return out


def _listing(names: list[str]) -> str:
    more = len(names) - _LISTED
    return ", ".join(names[:_LISTED]) + (f" ... and {more} more" if more > 0 else "")


def compare_structure(ref: Model, cand: Model, tokenizer_dir=None) -> dict[str, Any]:
    """The whole structural comparison; `failures` lists every disagreement in words."""
    tensors = compare_tensors(ref, cand)
    failures = []
    for key, what in (
        ("missing", "missing from the candidate"),
        ("extra", "only in the candidate"),
        ("shape_mismatch", "with different shapes"),
    ):
        if tensors[key]:
            failures.append(f"{len(tensors[key])} tensor(s) {what}: {_listing(tensors[key])}")
    if tensors["checksums"]["differ"]:
        differ = tensors["checksums"]["differ"]
        failures.append(f"{len(differ)} tensor(s) with different values: {_listing(differ)}")
    vocab = {"reference": vocab_triple(ref.ckpt).as_dict(), "candidate": vocab_triple(cand.ckpt).as_dict()}
    for side in ("reference", "candidate"):
        failures += _vocab_problems(side, vocab[side])
    for key in ("embedding_rows", "tokenizer"):
        x, y = vocab["reference"][key], vocab["candidate"][key]
        if x is not None and y is not None and x != y:
            failures.append(f"vocabulary: {key} {x} (reference) vs {y} (candidate)")
    specials = {"reference": special_tokens(ref, tokenizer_dir), "candidate": special_tokens(cand)}
    failures += _special_problems(specials["reference"], specials["candidate"])
    return {"tensors": tensors, "vocab": vocab, "special_tokens": specials, "failures": failures}


def _special_problems(a: dict | None, b: dict | None) -> list[str]:
    if a is None or b is None:
        return []
    out = [
        f"special token {role}: id {a['roles'][role]} (reference) vs {b['roles'][role]} (candidate)"
        for role in a["roles"]
        if a["roles"][role] is not None and b["roles"].get(role) is not None and a["roles"][role] != b["roles"][role]
    ]
    only_a = sorted(f"{t!r}={i}" for t, i in a["special"].items() if b["special"].get(t) != i)
    only_b = sorted(f"{t!r}={i}" for t, i in b["special"].items() if a["special"].get(t) != i)
    if only_a or only_b:
        out.append(
            f"special tokens differ: reference only {_listing(only_a) or '-'}; candidate only {_listing(only_b) or '-'}"
        )
    return out
