"""`weightops bnb` vs transformers' load-quantize-save (BitsAndBytesConfig + save_pretrained)
on a synthetic LLaMA-shaped model (random bf16, 16 layers, hidden 1024, vocab 32000), on CPU.

    python benchmarks/bench_bnb.py [--workdir DIR] [--layers 16] [--hidden 1024] [--specs int8 nf4 nf4-dq]
                                   [--repeat N]

Each contender runs in a fresh interpreter; wall time, CPU time (user + system, which barely
moves when other jobs share the machine) and peak memory (VmHWM, and RssAnon sampled from
/proc) are measured from outside. With --repeat the contenders alternate and the best wall
and CPU time of each are kept (other work on the machine only ever slows a run down).
A baseline row is an interpreter that only imports torch, bitsandbytes and transformers:
the memory floor both contenders start from. The two outputs are then compared file by
file: the benchmark fails if they are not byte-identical.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
from pathlib import Path

from common import Measured, measure, python, synthetic_llama

SPECS = {
    "int8": (["--bits", "8"], "load_in_8bit=True"),
    "nf4": (["--bits", "4", "--quant-type", "nf4"], "load_in_4bit=True, bnb_4bit_quant_type='nf4'"),
    "nf4-dq": (
        ["--bits", "4", "--quant-type", "nf4", "--double-quant"],
        "load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True",
    ),
}

OURS = """
import sys
from weightops.cli import main
main(["--quiet", "bnb", *sys.argv[1:], "--device", "cpu"], prog_name="weightops")
"""

TRANSFORMERS = """
import sys
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="cpu",
                                             quantization_config=BitsAndBytesConfig({args}))
model.save_pretrained(sys.argv[2])
"""

IMPORTS = "import torch, bitsandbytes.functional, transformers; from transformers import AutoModelForCausalLM"


def _run(cmd: list[str]) -> tuple[Measured, float]:
    """common.measure plus the child's CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = measure(cmd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return m, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def _best(runs: list[tuple[Measured, float]]) -> tuple[Measured, float]:
    return (
        Measured(
            min(m.wall_s for m, _ in runs), max(m.peak_rss_mb for m, _ in runs), max(m.peak_anon_mb for m, _ in runs), 0
        ),
        min(cpu for _, cpu in runs),
    )


def _same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("model*"))
    if names != sorted(p.name for p in b.glob("model*")):
        return False
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--specs", nargs="+", choices=list(SPECS), default=list(SPECS))
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="weightops-bench-bnb-"))
    src = synthetic_llama(
        work / f"llama-{args.layers}x{args.hidden}",
        args.layers,
        hidden=args.hidden,
        intermediate=args.hidden * 11 // 4,
        heads=args.hidden // 64,
        kv_heads=args.hidden // 64,
    )
    size = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 1e9
    print(f"model: {args.layers} layers, hidden {args.hidden}, {size:.2f} GB bf16 ({src})")
    base, base_cpu = _run(python(IMPORTS))
    print(f"{base.row('baseline: imports only')}   CPU {base_cpu:6.2f} s")
    for spec in args.specs:
        options, bnb_args = SPECS[spec]
        ours_out, theirs_out = work / f"ours-{spec}", work / f"transformers-{spec}"
        ours_runs, theirs_runs = [], []
        for _ in range(args.repeat):
            for out in (ours_out, theirs_out):
                shutil.rmtree(out, ignore_errors=True)
            ours_runs.append(_run(python(OURS) + [str(src), str(ours_out), *options]))
            theirs_runs.append(_run(python(TRANSFORMERS.format(args=bnb_args)) + [str(src), str(theirs_out)]))
        (ours, ours_cpu), (theirs, theirs_cpu) = _best(ours_runs), _best(theirs_runs)
        identical = _same_files(ours_out, theirs_out)
        print(f"\n{spec}: outputs byte-identical: {identical}")
        print(f"{ours.row('weightops bnb')}   CPU {ours_cpu:6.2f} s")
        print(f"{theirs.row('transformers load+quantize+save')}   CPU {theirs_cpu:6.2f} s")
        print(
            f"weightops / transformers: wall {ours.wall_s / theirs.wall_s:.2f}x   CPU {ours_cpu / theirs_cpu:.2f}x   "
            f"peak RSS {ours.peak_rss_mb / theirs.peak_rss_mb:.2f}x   "
            f"peak anon {ours.peak_anon_mb / theirs.peak_anon_mb:.2f}x"
        )
        if not identical:
            raise SystemExit(f"{spec}: weightops and transformers outputs differ")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
