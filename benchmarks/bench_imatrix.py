"""`weightops imatrix` against llama.cpp's own `llama-imatrix`: wall time, CPU time and peak
memory on synthetic LLaMA-shaped models (random bf16, hidden 1024 by default) of 8 and 16 layers,
the same text, on CPU. The layer-by-layer design should keep our peak memory flat as layers are
added (one layer + the chunks' hidden states); llama-imatrix holds the whole model.

    python benchmarks/bench_imatrix.py [--workdir DIR] [--layers 8 16] [--hidden 1024] [--ctx 512]
                                       [--chunks 4] [--threads 2] [--spill] [--repeat N] [--no-peer]

Contenders, each a fresh child process (common.measure), in rotated order per round:
  ours   weightops imatrix MODEL (the bf16 HF directory) --device cpu, torch on --threads threads;
  peer   llama-imatrix -m MODEL-f16.gguf -t THREADS --no-ppl, built from the source package of the
         installed llama-cpp-python (benchmarks/common.py llama_imatrix; only its command-line
         parser is ours, tests/oracles/llama_imatrix.cpp). Its F16 GGUF is written beforehand by
         `weightops gguf --type f16` (not timed). --no-ppl: we compute no perplexity, so it is
         not asked to. It still computes the logits of every token (it asks llama.cpp for all
         outputs), which we skip without --process-output.

Both tokenize the same text with the model's tokenizer (a 400-piece SentencePiece model,
weightops.tiny; the GGUF carries it, padded to the 32,000 embedding rows), cut --ctx-token
chunks and use the first --chunks. The entries of the two files are compared (median relative
difference of the per-column means), to show both did the same work. With --spill our hidden
states go through the memory-mapped temporary file (--memory-budget 1).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
from pathlib import Path

import numpy as np
from common import Best, llama_imatrix, measure, python, rotated, synthetic_llama

from weightops import tiny
from weightops.io.imatrix import read_imatrix

OURS = """
import sys
from weightops.cli import main
main(["--quiet", "imatrix", *sys.argv[1:], "--device", "cpu", "--force"], prog_name="weightops")
"""
F16 = """
import sys
from weightops.cli import main
main(["--quiet", "gguf", *sys.argv[1:], "--type", "f16", "--force"], prog_name="weightops")
"""


def agreement(ours: Path, theirs: Path) -> str:
    """How far apart the two files' per-column means are (they differ by float rounding only)."""
    a, b = read_imatrix(ours).entries, read_imatrix(theirs).entries
    common = sorted(a.keys() & b.keys())
    rel = []
    for name in common:
        x = a[name].sums / a[name].counts[:, None]
        y = b[name].sums / b[name].counts[:, None]
        rel.append(np.abs(x - y) / np.maximum(np.abs(y), 1e-12))
    flat = np.concatenate([r.ravel() for r in rel]) if rel else np.zeros(1)
    return (
        f"entries ours {len(a)} / llama-imatrix {len(b)} (common {len(common)}); "
        f"relative difference of the means: median {np.median(flat):.1e}, 99% {np.percentile(flat, 99):.1e}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spill", action="store_true")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--no-peer", action="store_true")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-imatrix-"))
    work.mkdir(parents=True, exist_ok=True)
    peer = None if args.no_peer else llama_imatrix()
    tok = work / "tokenizer"
    if not (tok / "tokenizer.model").is_file():
        tiny.spm_tokenizer_dir(tok)
    text = work / "calibration.txt"
    text.write_text("\n".join(tiny.corpus(lines=400 * args.chunks)), encoding="utf-8")
    intermediate = args.hidden * 11 // 4
    threads = str(args.threads)
    os.environ.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)  # torch's intra-op threads in `ours`
    print(
        f"imatrix on CPU, {args.threads} threads: hidden {args.hidden}, intermediate {intermediate}, "
        f"vocab 32000, {args.chunks} chunks of {args.ctx} tokens"
    )
    for layers in args.layers:
        model = synthetic_llama(work / f"llama-{layers}", layers, hidden=args.hidden, intermediate=intermediate)
        for f in tok.iterdir():
            shutil.copyfile(f, model / f.name)
        ours_out, theirs_out = work / f"imatrix-{layers}-ours.gguf", work / f"imatrix-{layers}-llama.gguf"
        chunking = ["--ctx", str(args.ctx), "--chunks", str(args.chunks)]
        commands = {
            "weightops imatrix": python(OURS)
            + [str(model), str(ours_out), "--text", str(text), *chunking]
            + (["--memory-budget", "1"] if args.spill else [])
        }
        if peer is not None:
            f16 = work / f"llama-{layers}-f16.gguf"
            if not f16.is_file():
                measure(python(F16) + [str(model), str(f16)])
            commands["llama-imatrix"] = [str(peer), "-m", str(f16), "-f", str(text), "-o", str(theirs_out)]
            commands["llama-imatrix"] += ["-c", str(args.ctx), "--chunks", str(args.chunks), "-t", threads, "--no-ppl"]
        best = {label: Best() for label in commands}
        cpu = dict.fromkeys(commands, float("inf"))
        for round_ in range(args.repeat):
            for label, cmd in rotated(list(commands.items()), round_):
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                m = measure(cmd, log=work / "llama-imatrix.log" if label == "llama-imatrix" else None)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                used = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
                cpu[label] = min(cpu[label], used)
                best[label].add(m, m.wall_s)
        for label, b in best.items():
            name = f"{layers} layers {label}{' (spill)' if args.spill and label.startswith('weightops') else ''}"
            print(
                f"{name:<36} wall {b.wall:7.2f} s   CPU {cpu[label]:7.2f} s   peak RSS {b.rss:7.1f} MB   "
                f"peak anon {b.anon:7.1f} MB"
            )
        if peer is not None:
            ratio = best["weightops imatrix"].wall / best["llama-imatrix"].wall
            print(f"{layers} layers: ours / llama-imatrix wall {ratio:.2f}x; {agreement(ours_out, theirs_out)}")


if __name__ == "__main__":
    main()
