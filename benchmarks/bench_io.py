"""Stream-copy a synthetic LLaMA-shaped checkpoint (random bf16, hidden 2048) at 8 and 16
layers through reader -> writer, and compare with `cp` of the same files.

    python benchmarks/bench_io.py [--workdir DIR] [--layers 8 16]

Targets (issue 2): peak anonymous RSS does not grow with layer count (within 10%);
wall <= 1.5x `cp`.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from common import measure, python, synthetic_llama

COPY = """
import sys
from weightops.checkpoint import open_checkpoint, save_hf
src = open_checkpoint(sys.argv[1])
save_hf(src.tensors, sys.argv[2], aux_files=src.aux_files, inputs=[src.path], max_shard_size="2GB")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 16])
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="weightops-bench-io-"))
    results = {}
    for layers in args.layers:
        src = synthetic_llama(work / f"llama-{layers}", layers)
        size = sum(f.stat().st_size for f in src.iterdir()) / 1e9
        for out in (work / "cp-out", work / "stream-out"):
            shutil.rmtree(out, ignore_errors=True)
        cp = measure(["cp", "-r", str(src), str(work / "cp-out")])
        ours = measure(python(COPY) + [str(src), str(work / "stream-out")])
        results[layers] = (cp, ours)
        print(f"\n{layers} layers, {size:.2f} GB")
        print(cp.row("cp -r"))
        print(ours.row("weightops stream copy"))
        print(f"wall ratio weightops / cp: {ours.wall_s / cp.wall_s:.2f}x")
    if len(results) >= 2:
        (lo, hi) = sorted(results)[:1] + sorted(results)[-1:]
        a, b = results[lo][1], results[hi][1]
        print(f"\npeak anon RSS {lo} -> {hi} layers: {a.peak_anon_mb:.1f} -> {b.peak_anon_mb:.1f} MB "
              f"({(b.peak_anon_mb / a.peak_anon_mb - 1) * 100:+.1f}%)")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
