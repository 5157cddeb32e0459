"""verify: wall time and peak memory of one-model-at-a-time against loading both models at once.

A synthetic LLaMA-shaped pair (16 layers, hidden 1024, vocab 32000, random weights): the
reference in bf16 and the candidate with the same random values rounded to fp16 (a "float"
candidate, as a bf16 -> fp16 re-save is). Both run on CPU in float32 on the built-in
prompts tokenised by a tiny SentencePiece tokenizer and cut to --max-tokens per prompt.
Each contender runs in a fresh process (peak memory measured from /proc):

- ours:        weightops.pipelines.verify.verify_checkpoint (reference, free it, then candidate; the
               reference logits in RAM);
- ours, spill: the same with the reference logits in a temporary file (ram_bytes=0);
- both:        load both models with from_pretrained, run each on the same ids, compare with
               the same metric code: what a script that holds the pair in memory does.

    python benchmarks/bench_verify.py [--layers 16] [--hidden 1024] [--max-tokens 32] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from common import Measured, measure, python, synthetic_llama

OURS = """
import json, sys, time
t0 = time.perf_counter()
from weightops.pipelines.verify import verify_checkpoint
doc = verify_checkpoint(sys.argv[1], sys.argv[2], tokenizer=sys.argv[3], max_tokens=int(sys.argv[4]), device="cpu",
             ram_bytes=int(sys.argv[5]))
doc["work_s"] = time.perf_counter() - t0
open(sys.argv[6], "w").write(json.dumps(doc))
"""

BOTH = """
import json, sys, time
t0 = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging
from weightops.verify.metrics import TokenMetrics, summarize, token_metrics
from weightops.verify.prompts import default_prompts, hf_encoder, tokenize
logging.disable_progress_bar()
prompts = tokenize(default_prompts(), hf_encoder(sys.argv[3]), int(sys.argv[4]))
ref = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
cand = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32).eval()
parts = []
with torch.inference_mode():
    for p in prompts:
        ids = torch.tensor([p.ids])
        a, b = ref(input_ids=ids).logits[0].float().numpy(), cand(input_ids=ids).logits[0].float().numpy()
        parts.append(token_metrics(a[:-1], b[:-1], list(p.ids[1:])))
doc = summarize(TokenMetrics.concat(parts))
doc["work_s"] = time.perf_counter() - t0
open(sys.argv[6], "w").write(json.dumps(doc))
"""


def run(code: str, ref: Path, cand: Path, tok: Path, max_tokens: int, ram: int, out: Path) -> tuple[Measured, dict]:
    m = measure(python(code) + [str(ref), str(cand), str(tok), str(max_tokens), str(ram), str(out)])
    return m, json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per prompt (13 built-in prompts)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per contender; fastest wall, highest peaks")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="weightops-bench-verify-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from weightops import tiny

        tok = work / "tokenizer"
        if not tok.is_dir():
            tiny.spm_tokenizer_dir(tok)
        shape = dict(
            layers=args.layers,
            hidden=args.hidden,
            intermediate=args.hidden * 11 // 4 // 32 * 32,
            heads=args.hidden // 64,
            kv_heads=args.hidden // 64,
            vocab=32000,
        )
        ref = synthetic_llama(work / "reference", dtype=torch.bfloat16, **shape)
        cand = synthetic_llama(work / "candidate", dtype=torch.float16, **shape)
        size = sum(f.stat().st_size for f in ref.glob("*.safetensors")) / 1e9
        params = size / 2
        print(
            f"{args.layers} layers, hidden {args.hidden}: {params * 1e3:.0f} M parameters, {size:.2f} GB per "
            f"checkpoint (float32 in RAM: {params * 4:.2f} GB per model); {os.cpu_count()} CPUs, CPU only, "
            f"load average {os.getloadavg()[0]:.1f}"
        )
        contenders = {
            "ours (one at a time)": (OURS, 1 << 30),
            "ours, logits spilled": (OURS, 0),
            "both models at once": (BOTH, 0),
        }
        best: dict[str, list] = {}
        for _ in range(args.repeat):
            for name, (code, ram) in contenders.items():
                m, doc = run(code, ref, cand, tok, args.max_tokens, ram, work / "result.json")
                b = best.setdefault(name, [float("inf"), float("inf"), 0.0, 0.0, doc])
                b[0], b[1] = min(b[0], m.wall_s), min(b[1], doc["work_s"])
                b[2], b[3] = max(b[2], m.peak_rss_mb), max(b[3], m.peak_anon_mb)
        print(
            f"\n{'contender':<24}{'wall s':>9}{'work s':>9}{'peak RSS MB':>13}{'peak anon MB':>14}"
            f"{'tokens':>8}{'mean KLD':>11}{'top-1':>8}"
        )
        for name, (wall, work_s, rss, anon, doc) in best.items():
            print(
                f"{name:<24}{wall:>9.2f}{work_s:>9.2f}{rss:>13.0f}{anon:>14.0f}{doc['tokens']:>8}"
                f"{doc['kld_mean']:>11.3g}{doc['top1_agreement']:>8.3f}"
            )
        ours, both = best["ours (one at a time)"], best["both models at once"]
        print(
            f"\nboth-at-once / ours: peak RSS {both[2] / ours[2]:.2f}x, peak anon {both[3] / ours[3]:.2f}x; "
            f"ours / both-at-once wall {ours[0] / both[0]:.2f}x"
        )
        if "timing" in ours[4]:
            print(
                f"ours: reference {ours[4]['timing']['reference_s']:.1f} s, candidate "
                f"{ours[4]['timing']['candidate_s']:.1f} s, spilled "
                f"{best['ours, logits spilled'][4]['reference_logits_spilled_bytes'] / 2**20:.0f} MiB of logits"
            )
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
