"""`verify_checkpoint(reference, candidate)`: feed both models the same token ids, one model at a time,
compare their next-token distributions and gate the result.

The result is a plain dict (the `weightops verify --json` document); `raise_if_failed`
turns a failed gate into a `MismatchError` (exit 3) naming the worst prompts.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import progress
from ..devices import resolve_device
from ..errors import MismatchError, WeightopsError
from ..io.checkpoint import Format
from ..verify import gate
from ..verify.logits import CachedLogits, LogitCache, LogitStore, Model, describe, load_runner
from ..verify.metrics import TokenMetrics, summarize, token_metrics
from ..verify.prompts import (
    Prompt,
    Tokenized,
    default_prompts,
    first_difference,
    hf_encoder,
    llama_cpp_encoder,
    read_prompts,
    tokenize,
)
from ..verify.structure import compare_structure, compare_tensors

WORST = 3


def verify_checkpoint(
    reference: str | Path,
    candidate: str | Path,
    *,
    prompts: str | Path | Sequence[str] | None = None,
    tokenizer: str | Path | None = None,
    device: str = "auto",
    dtype: str | None = "auto",
    max_kld: float | None = None,
    min_top1: float | None = None,
    structure_only: bool = False,
    gguf_runtime: str = "llama.cpp",
    tp_config: str | Path | None = None,
    max_tokens: int | None = None,
    allow_tokenizer_mismatch: bool = False,
    diagnose: bool = True,
    ram_bytes: int = 1 << 30,
    log: Callable[[str], None] | None = None,
    reference_cache: str | Path | None = None,
) -> dict[str, Any]:
    """Compare CANDIDATE with REFERENCE; returns the result document: `passed`, `failures`, the
    metrics (absent when no logits were compared: --structure-only, or a candidate refused
    before running), what was compared and where. A failed gate does not raise (see
    `raise_if_failed`); a comparison that cannot be made raises WeightopsError.

    prompts: None (built-in set), a prompts file (JSONL or blank-line paragraphs) or texts.
    tokenizer: HF tokenizer directory used instead of the reference's own.
    max_kld / min_top1: gate thresholds; None takes the default of the candidate's kind.
    max_tokens: cut each prompt to this many tokens (besides the models' context).
    diagnose: when the gate fails and both sides store comparable values, name the tensors
    whose values differ. ram_bytes: reference logits held in RAM before spilling to disk.
    reference_cache: a directory that keeps the reference's logits for later verifications of
    the same reference (`verify.logits.LogitCache`: the caller names it by the reference's
    content); `reference_logits` in the result says whether they were computed or reused.
    """
    start = time.perf_counter()
    ref, cand = describe(reference, tp_config), describe(candidate, tp_config)
    kind = gate.candidate_kind(
        ref.tensor_types, cand.tensor_types, ref.format is Format.GGUF, cand.format is Format.GGUF
    )
    limits = gate.thresholds(kind, max_kld, min_top1)
    result: dict[str, Any] = {
        "mode": "structure" if structure_only else "logits",
        "reference": _side(ref),
        "candidate": _side(cand),
        "device": None,
        "thresholds": limits.as_dict(),
        "failures": [],
        "notes": [],
    }
    if structure_only:
        result.update(compare_structure(ref, cand, tokenizer))
        return _finish(result, start)

    texts = _prompts(prompts)
    result["prompt_source"] = (
        "built-in" if prompts is None else (str(prompts) if isinstance(prompts, (str, Path)) else "given texts")
    )
    encode, source = _reference_encoder(ref, tokenizer)
    cap = min((c for c in (max_tokens, ref.context, cand.context) if c), default=None)
    kept = [(p, t) for p, t in zip(texts, tokenize(texts, encode, cap), strict=True) if len(t.ids) >= 2]
    texts, tokenized = [p for p, _ in kept], [t for _, t in kept]
    if not tokenized:
        raise WeightopsError("no prompt has two tokens or more; nothing to compare")
    result["prompts"] = len(tokenized)
    result["tokenizer"] = {"source": source, **_candidate_tokenization(cand, texts, tokenized, cap)}
    if result["tokenizer"]["differences"]:
        msg = _tokenizer_message(result["tokenizer"])
        (result["notes"] if allow_tokenizer_mismatch else result["failures"]).append(msg)
    if not _vocab_fits(ref, cand, tokenized, result):
        return _finish(result, start)

    per_prompt, metrics = _run_pair(
        ref,
        cand,
        tokenized,
        result,
        log or (lambda _msg: None),
        ram_bytes=ram_bytes,
        cache=None if reference_cache is None else LogitCache(reference_cache),
        settings={
            "device": str(resolve_device(device)),
            "dtype": dtype,
            "gguf_runtime": gguf_runtime,
            "tp_config": _file_digest(tp_config),
        },
        device=device,
        dtype=dtype,
        gguf_runtime=gguf_runtime,
    )
    result.update(summarize(metrics))
    result["per_prompt"] = per_prompt
    result["worst_prompts"] = [p["name"] for p in sorted(per_prompt, key=lambda p: -p["kld_mean"])[:WORST]]
    result["failures"] += gate.failures(result, limits)
    if result["failures"] and diagnose and ref.format is not Format.GGUF and cand.format is not Format.GGUF:
        result["differing_tensors"] = compare_tensors(ref, cand)["checksums"]["differ"]
    return _finish(result, start)


def _run_pair(
    ref: Model,
    cand: Model,
    tokenized: list[Tokenized],
    result: dict[str, Any],
    say: Callable[[str], None],
    *,
    ram_bytes: int,
    cache: LogitCache | None,
    settings: dict[str, Any],
    **run_options,
) -> tuple[list[dict], TokenMetrics]:
    """Run the reference over every prompt and keep its logits (or take them from `cache`), free
    it, then run the candidate and compare prompt by prompt. Fills in runtimes, devices, timings."""
    n_ctx = max(len(t.ids) for t in tokenized)
    per_prompt, parts, timing = [], [], {}
    with LogitStore(ram_bytes) as store:
        t0 = time.perf_counter()
        reference: LogitStore | CachedLogits = store

        def keep(_i: int, logits) -> None:
            store.add(logits)

        if cache is None:
            _run_side("reference", ref, tokenized, result, say, n_ctx, run_options, keep)
        else:
            key = cache.key([t.ids for t in tokenized], {**settings, "n_ctx": n_ctx})
            with cache.locked(key):
                hit = cache.load(key)
                if hit is None:
                    _run_side(
                        "reference",
                        ref,
                        tokenized,
                        result,
                        say,
                        n_ctx,
                        run_options,
                        lambda _i, logits: store.add(logits),
                    )
                    info = {k: result["reference"][k] for k in ("runtime", "device", "dtype")}
                    cache.save(key, store, len(tokenized), info)
                    result["reference_logits"] = "computed"
                else:
                    reference = hit
                    result["reference"].update(hit.info)
                    result["reference_logits"] = "reused"
                    say(f"reference logits for these {len(tokenized)} prompts reused from {cache.directory}")
        timing["reference_s"] = round(time.perf_counter() - t0, 3)

        def compare(i: int, logits) -> None:
            t = tokenized[i]
            m = token_metrics(reference.get(i)[:-1], logits[:-1], list(t.ids[1:]))
            parts.append(m)
            per_prompt.append(_prompt_row(t, m))

        t0 = time.perf_counter()
        _run_side("candidate", cand, tokenized, result, say, n_ctx, run_options, compare)
        timing["candidate_s"] = round(time.perf_counter() - t0, 3)
        result["reference_logits_spilled_bytes"] = store.spilled
    result["device"] = result["candidate"]["device"]
    result["timing"] = timing
    return per_prompt, TokenMetrics.concat(parts)


def _run_side(
    side: str,
    model: Model,
    tokenized: list[Tokenized],
    result: dict[str, Any],
    say: Callable[[str], None],
    n_ctx: int,
    run_options: dict[str, Any],
    take: Callable[[int, Any], Any],
) -> None:
    """Load one model, feed it every prompt (`take(i, logits)` for each), free it."""
    runner = load_runner(model, n_ctx=n_ctx, **run_options)
    try:
        result[side].update(runner.info)
        say(
            f"running the {side} on {len(tokenized)} prompts ({runner.info['runtime']}, "
            f"{runner.info['device']}, {runner.info['dtype']})"
        )
        for i, t in enumerate(progress.iterate(tokenized, len(tokenized), side, unit="prompt")):
            take(i, runner.logits(list(t.ids)))
    finally:
        runner.close()


def _file_digest(path: str | Path | None) -> str | None:
    """sha256 of a small settings file (a TencentPretrain config), so a changed one is a new key."""
    return None if path is None else hashlib.sha256(Path(path).read_bytes()).hexdigest()


def raise_if_failed(result: dict[str, Any]) -> None:
    """MismatchError (exit 3) naming what failed and, for a logit comparison, the worst prompts."""
    if result["passed"]:
        return
    msg = "verification failed: " + "; ".join(result["failures"])
    rows = {p["name"]: p for p in result.get("per_prompt") or []}
    if rows:
        msg += "; worst prompts: " + ", ".join(
            f"{n} (KLD {rows[n]['kld_mean']:.4g}, top-1 {100 * rows[n]['top1_agreement']:.1f}%)"
            for n in result["worst_prompts"]
        )
    if result.get("differing_tensors"):
        d = result["differing_tensors"]
        msg += f"; tensors whose values differ: {', '.join(d[:10])}" + (
            f" ... and {len(d) - 10} more" if len(d) > 10 else ""
        )
    raise MismatchError(msg)


def _finish(result: dict[str, Any], start: float) -> dict[str, Any]:
    result["passed"] = not result["failures"]
    result["wall_s"] = round(time.perf_counter() - start, 3)
    return result


def _side(m: Model) -> dict[str, Any]:
    return {
        "path": str(m.path),
        "format": m.format,
        "architecture": m.ckpt.architecture,
        "vocab": m.vocab,
        "tensor_types": sorted(m.tensor_types),
    }


def _prompts(prompts: str | Path | Sequence[str] | None) -> list[Prompt]:
    if prompts is None:
        return default_prompts()
    if isinstance(prompts, (str, Path)):
        return read_prompts(prompts)
    return [Prompt(f"prompt {i}", t) for i, t in enumerate(prompts, 1)]


def _reference_encoder(ref: Model, tokenizer: str | Path | None):
    if tokenizer is not None:
        return hf_encoder(Path(tokenizer)), str(tokenizer)
    if ref.tokenizer is not None:
        return hf_encoder(ref.tokenizer), str(ref.tokenizer)
    if ref.format is Format.GGUF:
        return llama_cpp_encoder(ref.ckpt.path), f"{ref.path} (llama.cpp)"
    raise WeightopsError(f"{ref.path}: no tokenizer files next to the weights; pass --tokenizer DIR")


def _candidate_tokenization(
    cand: Model, texts: list[Prompt], ref_ids: list[Tokenized], cap: int | None
) -> dict[str, Any]:
    """Whether the candidate's own tokenizer gives the same ids (llama.cpp's for GGUF)."""
    try:
        if cand.format is Format.GGUF:
            encode, source = llama_cpp_encoder(cand.ckpt.path), f"{cand.path} (llama.cpp)"
        elif cand.tokenizer is not None:
            encode, source = hf_encoder(cand.tokenizer), str(cand.tokenizer)
        else:
            return {"candidate": "not checked (the candidate carries no tokenizer)", "differences": []}
    except WeightopsError as e:
        return {"candidate": f"not checked ({e})", "differences": []}
    diffs = []
    for t, other in zip(ref_ids, (o.ids for o in tokenize(texts, encode, cap)), strict=True):
        pos = first_difference(t.ids, other)
        if pos is not None:
            diffs.append(
                {
                    "prompt": t.name,
                    "position": pos,
                    "reference_id": t.ids[pos] if pos < len(t.ids) else None,
                    "candidate_id": other[pos] if pos < len(other) else None,
                }
            )
    return {"candidate": source, "differences": diffs}


def _tokenizer_message(tok: dict[str, Any]) -> str:
    d = tok["differences"]
    first = d[0]
    return (
        f"the candidate's tokenizer ({tok['candidate']}) tokenises {len(d)} prompt(s) differently from "
        f"{tok['source']}: first {first['prompt']} at token {first['position']} (id {first['reference_id']} vs "
        f"{first['candidate_id']})"
    )


def _vocab_fits(ref: Model, cand: Model, tokenized: list[Tokenized], result: dict[str, Any]) -> bool:
    """Ids beyond the reference's rows mean the wrong tokenizer (an error); beyond the
    candidate's, a candidate that cannot read these prompts (a failure: False)."""
    top = max(tokenized, key=lambda t: max(t.ids))
    highest = max(top.ids)
    if ref.vocab is not None and highest >= ref.vocab:
        raise WeightopsError(
            f"{ref.path}: prompt {top.name} has token id {highest} but the reference has only "
            f"{ref.vocab} embedding rows: wrong --tokenizer?"
        )
    if cand.vocab is not None and highest >= cand.vocab:
        result["failures"].append(
            f"the candidate's vocabulary ({cand.vocab} rows) cannot represent token id {highest} of prompt {top.name}"
        )
        return False
    known = [v for v in (ref.vocab, cand.vocab) if v]
    result["vocab_compared"] = min(known) if known else None
    if len(set(known)) == 2:
        result["notes"].append(
            f"vocabulary sizes differ ({ref.vocab} vs {cand.vocab}); KL over the first {result['vocab_compared']} ids"
        )
    return True


def _prompt_row(t: Tokenized, m: TokenMetrics) -> dict[str, Any]:
    return {
        "name": t.name,
        "tokens": len(m),
        "kld_mean": float(m.kld.mean()),
        "kld_max": float(m.kld.max()),
        "top1_agreement": float(m.top1_same.mean()),
    }


def render(result: dict[str, Any]) -> str:
    """The human-readable table of a result."""
    r, c = result["reference"], result["candidate"]
    lines = [f"reference  {r['path']}  [{r['format']}{_run(r)}]", f"candidate  {c['path']}  [{c['format']}{_run(c)}]"]
    if result["mode"] == "structure":
        lines += _render_structure(result)
    else:
        lines += _render_logits(result)
    t = result["thresholds"]
    lines.append("")
    for note in result["notes"]:
        lines.append(f"note: {note}")
    if result["passed"]:
        gate_text = (
            ""
            if result["mode"] == "structure"
            else f" (mean KLD <= {t['max_kld']:g}, top-1 >= {100 * t['min_top1']:.1f}%, {t['source']})"
        )
        lines.append("PASSED" + gate_text)
    else:
        lines.append("FAILED")
        lines += [f"  - {f}" for f in result["failures"]]
    return "\n".join(lines)


def _run(side: dict[str, Any]) -> str:
    return "".join(f", {side[k]}" for k in ("runtime", "device", "dtype") if side.get(k))


def _render_logits(result: dict[str, Any]) -> list[str]:
    lines = [
        f"prompts {result.get('prompts')} ({result.get('prompt_source')}), tokenizer "
        f"{result.get('tokenizer', {}).get('source')}, candidate kind {result['thresholds']['candidate_kind']}"
    ]
    if "tokens" not in result:  # refused before running
        return lines
    rows = [
        ("tokens compared", f"{result['tokens']}"),
        ("mean KLD", f"{result['kld_mean']:.6g}"),
        ("median KLD", f"{result['kld_median']:.6g}"),
        ("99% KLD", f"{result['kld_p99']:.6g}"),
        ("max KLD", f"{result['kld_max']:.6g}"),
        ("top-1 agreement", f"{100 * result['top1_agreement']:.2f} %"),
        ("RMS Δp", f"{100 * result['rms_dp']:.3f} %"),
        ("PPL reference", f"{result['ppl_reference']:.4f}"),
        ("PPL candidate", f"{result['ppl_candidate']:.4f}"),
        ("PPL ratio", f"{result['ppl_ratio']:.6f}"),
        ("max |Δ logit|", f"{result['max_abs_logit_diff']:.6g}"),
    ]
    lines += ["", *(f"  {k:<18}{v:>14}" for k, v in rows), "", "  worst prompts       tokens    mean KLD   top-1"]
    rows_by_name = {p["name"]: p for p in result["per_prompt"]}
    for name in result["worst_prompts"]:
        p = rows_by_name[name]
        lines.append(f"  {name[:18]:<18}{p['tokens']:>8}{p['kld_mean']:>12.4g}{100 * p['top1_agreement']:>7.1f}%")
    return lines


def _render_structure(result: dict[str, Any]) -> list[str]:
    t = result["tensors"]
    ck = t["checksums"]
    lines = [
        f"tensors    {t['reference']} vs {t['candidate']} (compared under {t['names']} names): "
        f"{len(t['missing'])} missing, {len(t['extra'])} extra, {len(t['shape_mismatch'])} shape mismatches",
        f"values     {ck['compared']} compared by sha256, {len(ck['differ'])} differ, "
        f"{ck['not_comparable']} not comparable (different storage type or format)",
    ]
    for side in ("reference", "candidate"):
        v = result["vocab"][side]
        lines.append(
            f"vocab      {side}: config {v['config']}, tokenizer {v['tokenizer']}, embedding rows {v['embedding_rows']}"
        )
    for side in ("reference", "candidate"):
        s = result["special_tokens"][side]
        lines.append(
            f"specials   {side}: "
            + (
                "no tokenizer"
                if s is None
                else ", ".join(f"{k}={v}" for k, v in s["roles"].items()) + f"; {len(s['special'])} special tokens"
            )
        )
    return lines
