"""Stream-copy a synthetic LLaMA-shaped checkpoint (random bf16, hidden 2048) at 8 and 16
layers through reader -> writer, and compare with `cp` of the same files.

    python benchmarks/bench_io.py [--layers 8 16] [--cache cold|warm] [--repeat 3] [--workdir DIR]

Every run starts alike: pending writeback flushed (`sync`), inputs evicted from (cold) or
read into (warm) the page cache. Contenders are interleaved; the fastest wall and the
highest memory peaks of the repeats are reported. `cp` does not fsync, we do (an output
must be durable before it is published), so `cp -r && sync` is shown as well.

Targets (issue 2): peak anonymous RSS does not grow with layer count (within 10%);
wall <= 1.5x `cp`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from common import Best, measure, python, rotated, set_cache, synthetic_llama

COPY = """
import sys, time
from weightops.io.checkpoint import open_checkpoint, save_hf
t1 = time.perf_counter()
src = open_checkpoint(sys.argv[1])
save_hf(src.tensors, sys.argv[2], aux_files=src.aux_files, inputs=[src.path], max_shard_size="2GB")
print(f"{time.perf_counter() - t1:.3f}", file=open(sys.argv[3], "w"))
"""


def contenders(src: Path, out: Path, clock: Path) -> dict[str, list[str]]:
    return {
        "cp -r": ["cp", "-r", str(src), str(out)],
        "cp -r && sync": ["sh", "-c", 'cp -r "$1" "$2" && sync "$2"/*', "cp", str(src), str(out)],
        "weightops stream copy": python(COPY) + [str(src), str(out), str(clock)],
    }


def run_size(work: Path, layers: int, repeat: int, cache: str) -> dict[str, Best]:
    src = synthetic_llama(work / f"llama-{layers}", layers)
    size = sum(f.stat().st_size for f in src.iterdir()) / 1e9
    out, clock = work / "out", work / "clock"
    res: dict[str, Best] = {}
    for round_ in range(repeat):
        for name, cmd in rotated(list(contenders(src, out, clock).items()), round_):
            shutil.rmtree(out, ignore_errors=True)
            clock.unlink(missing_ok=True)
            set_cache(sorted(src.iterdir()), cache)
            m = measure(cmd)
            res.setdefault(name, Best()).add(m, float(clock.read_text()) if clock.exists() else m.wall_s)
    print(f"\n{layers} layers, {size:.2f} GB, inputs {cache} (load average {os.getloadavg()[0]:.1f})")
    for name, best in res.items():
        print(best.row(name))
    ours = res["weightops stream copy"]
    print(
        f"wall ratio weightops / cp: {ours.wall / res['cp -r'].wall:.2f}x "
        f"(work alone {ours.work / res['cp -r'].wall:.2f}x); "
        f"weightops / (cp && sync): {ours.wall / res['cp -r && sync'].wall:.2f}x"
    )
    shutil.rmtree(out, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--cache", choices=("cold", "warm"), default="cold")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="weightops-bench-io-"))
    try:
        results = {layers: run_size(work, layers, args.repeat, args.cache) for layers in args.layers}
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if len(results) >= 2:
        lo, hi = min(results), max(results)
        a, b = results[lo]["weightops stream copy"], results[hi]["weightops stream copy"]
        print(
            f"\npeak anon RSS {lo} -> {hi} layers: {a.anon:.1f} -> {b.anon:.1f} MB "
            f"({(b.anon / a.anon - 1) * 100:+.1f}%); peak RSS {a.rss:.1f} -> {b.rss:.1f} MB"
        )


if __name__ == "__main__":
    main()
