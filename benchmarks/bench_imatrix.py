"""`weightops imatrix` wall time and peak memory on synthetic LLaMA-shaped models (random bf16,
hidden 1024 by default) of 8 and 16 layers, on CPU: the layer-by-layer design should keep peak
memory flat as layers are added (one layer + the chunks' hidden states), and wall time linear.

    python benchmarks/bench_imatrix.py [--workdir DIR] [--layers 8 16] [--hidden 1024]
                                       [--ctx 512] [--chunks 4] [--spill] [--repeat N]

No peer runs here: llama-imatrix is not shipped as a binary by llama-cpp-python (it would have to
be built from the source package, as bench_gguf.py builds llama-quantize). The model's tokenizer
is a 400-piece SentencePiece model (weightops.tiny); the text is tiny.corpus(). With --spill the
hidden states go through the memory-mapped temporary file (--memory-budget 1).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
from pathlib import Path

from common import Best, measure, python, synthetic_llama

from weightops import tiny

OURS = """
import sys
from weightops.cli import main
main(["--quiet", "imatrix", *sys.argv[1:], "--device", "cpu", "--force"], prog_name="weightops")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--spill", action="store_true")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-imatrix-"))
    work.mkdir(parents=True, exist_ok=True)
    tok = work / "tokenizer"
    if not (tok / "tokenizer.model").is_file():
        tiny.spm_tokenizer_dir(tok)
    text = work / "calibration.txt"
    text.write_text("\n".join(tiny.corpus(lines=400 * args.chunks)), encoding="utf-8")
    intermediate = args.hidden * 11 // 4
    print(
        f"imatrix on CPU: hidden {args.hidden}, intermediate {intermediate}, {args.chunks} chunks of {args.ctx} tokens"
    )
    for layers in args.layers:
        model = synthetic_llama(work / f"llama-{layers}", layers, hidden=args.hidden, intermediate=intermediate)
        for f in tok.iterdir():
            shutil.copyfile(f, model / f.name)
        best, cpu = Best(), float("inf")
        cmd = [str(model), str(work / f"imatrix-{layers}.gguf"), "--text", str(text)]
        cmd += ["--ctx", str(args.ctx), "--chunks", str(args.chunks)] + (["--memory-budget", "1"] if args.spill else [])
        for _ in range(args.repeat):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            m = measure(python(OURS) + cmd)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = min(cpu, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
            best.add(m, m.wall_s)
        label = f"{layers} layers{' (spill)' if args.spill else ''}"
        print(
            f"{label:<20} wall {best.wall:6.2f} s   CPU {cpu:6.2f} s   peak RSS {best.rss:7.1f} MB   "
            f"peak anon {best.anon:7.1f} MB"
        )


if __name__ == "__main__":
    main()
