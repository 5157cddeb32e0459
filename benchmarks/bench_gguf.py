"""GGUF export: `weightops gguf` against the library path and the two-pass pipeline, on a tiny
LLaMA and on synthetic LLaMA-shaped checkpoints (random bf16, hidden 2048, GQA 16/4 heads).

    python benchmarks/bench_gguf.py [--workdir DIR] [--layers 8 16] [--skip-library] [--repeat N]
                                    [--convert-script PATH/convert_hf_to_gguf.py] [--matrix-only]

Contenders, each a fresh child process (wall time and peak RSS / anonymous RSS sampled from /proc):
  q8_0  weightops gguf --type q8_0
        vs the library path: the same streaming writer, but each tensor quantized with
        gguf.quants.quantize (numpy), as convert_hf_to_gguf.py --outtype q8_0 does;
  q4_0  weightops gguf --type q4_0 --pure (one pass, from the bf16 source)
        vs the two-pass pipeline: an F16 GGUF (pass 1) then llama.cpp's own quantizer
        (llama_cpp.llama_model_quantize, pure Q4_0, 2 threads) on it (pass 2);
  q4_k_m  weightops gguf --type q4_k_m (llama-quantize's mix, one pass) vs the same pass 1
        and llama_model_quantize Q4_K_M (2 threads) on it. Pass 1 is
        llama.cpp's convert_hf_to_gguf.py --outtype f16 when --convert-script names it (with
        its gguf-py beside it), else `weightops gguf --type f16` as a stand-in, which is
        faster than the script, so the ratio is then conservative. The script ships in
        llama-cpp-python's source package, the same llama.cpp as its quantizer:
            pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
            ... --convert-script llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py

  matrix  the release matrix {Q8_0, Q6_K, Q5_K_M, Q4_K_M}: one `weightops gguf OUTDIR --type ...`
        run (the source read once, shared encodings computed once) vs four single
        `weightops gguf` runs vs llama.cpp's way: one F16 conversion (pass 1 as above) then one
        llama_model_quantize per type (2 threads). --matrix-only runs just these.

Targets (issues 6 and 16): whole HF -> Q4_0 and HF -> Q4_K_M jobs <= 0.5x the two-pass
pipeline; peak (anonymous) RSS <= 0.5x the pipeline's and flat in model size (8 vs 16 layers).
Issue 19: the matrix <= 0.6x four single runs and <= 0.4x llama.cpp's way; its peak RSS flat
in model size and <= 1.5x a single run's.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from common import Measured, measure, python, synthetic_llama

from weightops.io.checkpoint import open_checkpoint

LIBRARY_Q8_0 = """
import sys
import numpy as np, torch, gguf
from gguf import GGMLQuantizationType as Q
from weightops.arch import get
from weightops.arch.transforms import to_gguf
from weightops.io.checkpoint import open_checkpoint
from weightops.io.gguf import GGUFTensor, plan_writer, write_gguf
from weightops.quant.policy import is_always_f32
ckpt = open_checkpoint(sys.argv[1]); cfg = ckpt.config; table = get("llama")
hp = table.config.hparams(cfg)
planned = []
for ref in ckpt.tensors:
    row, layer, _ = table.lookup(ref.name, "hf")
    name = row.gguf.format(n=layer)
    qtype = Q.F32 if is_always_f32(name, ref.shape) else Q.Q8_0
    def produce(ref=ref, transform=row.to_gguf, qtype=qtype):
        x = to_gguf(transform, ref.load().float(), hp)
        return [gguf.quants.quantize(x.numpy(), qtype)]
    planned.append(GGUFTensor(name, ref.shape, qtype, produce, ref.release))
write_gguf(plan_writer("llama", planned), planned, sys.argv[2])
"""

LLAMA_CPP_QUANTIZE = """
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3])
p.nthread = 2
p.pure = sys.argv[3] == "Q4_0"
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


def weightops(*args: str) -> list[str]:
    return python("from weightops.cli import run; run()") + ["-q", "gguf", *args, "--force"]


@dataclass
class Run:
    """Wall time and peak memory (common.measure) plus the child's CPU time (user + system),
    which, unlike wall time, barely moves when other jobs share the machine."""

    m: Measured
    cpu_s: float

    def row(self, label: str) -> str:
        return f"{self.m.row(label)}   CPU {self.cpu_s:7.2f} s"


def run(cmd: list[str]) -> Run:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = measure(cmd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return Run(m, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)


def convert_script_command(script: Path, model: Path, tokenizer: Path, f16: Path) -> list[str]:
    """llama.cpp's converter on `model` with the tokenizer files beside the weights, as it expects."""
    with_tokenizer = model.with_name(model.name + "-with-tokenizer")
    with_tokenizer.mkdir(exist_ok=True)
    for f in [*model.iterdir(), *tokenizer.iterdir()]:
        link = with_tokenizer / f.name
        if not link.exists():
            link.symlink_to(f.resolve())
    return [
        "env",
        f"PYTHONPATH={script.resolve().parent / 'gguf-py'}",
        sys.executable,
        str(script),
        str(with_tokenizer),
        "--outtype",
        "f16",
        "--outfile",
        str(f16),
    ]


def bench_model(
    name: str, model: Path, tokenizer: Path, work: Path, library: bool, repeat: int, convert_script: Path | None
) -> dict[str, Run]:
    """Every contender once per round, `repeat` rounds (interleaved, so that a busy spell on a
    shared machine hits all of them alike); each contender's median-wall run is reported."""
    out, f16 = work / "out.gguf", work / "f16.gguf"
    tok = ["--tokenizer", str(tokenizer)]
    commands = {"ours q8_0": weightops(str(model), str(out), "--type", "q8_0", *tok)}
    if library:
        commands["library q8_0"] = python(LIBRARY_Q8_0) + [str(model), str(out)]
    commands["ours q4_0"] = weightops(str(model), str(out), "--type", "q4_0", "--pure", *tok)
    if convert_script:
        commands["pass 1: convert_hf_to_gguf.py f16"] = convert_script_command(convert_script, model, tokenizer, f16)
    else:
        commands["pass 1: f16 GGUF (weightops stand-in)"] = weightops(str(model), str(f16), "--type", "f16", *tok)
    commands["pass 2: llama.cpp quantize"] = python(LLAMA_CPP_QUANTIZE) + [str(f16), str(out), "Q4_0"]
    commands["ours q4_k_m"] = weightops(str(model), str(out), "--type", "q4_k_m", *tok)
    commands["pass 2: llama.cpp quantize Q4_K_M"] = python(LLAMA_CPP_QUANTIZE) + [str(f16), str(out), "Q4_K_M"]
    runs: dict[str, list[Run]] = {label: [] for label in commands}
    sizes: dict[str, int] = {}
    for _ in range(repeat):
        for label, cmd in commands.items():
            out.unlink(missing_ok=True)  # the library contender does not pass --force
            runs[label].append(run(cmd))
            if out.is_file():  # pass 1 writes f16.gguf, not out.gguf
                sizes[label] = out.stat().st_size
    r = {label: sorted(rs, key=lambda x: x.m.wall_s)[len(rs) // 2] for label, rs in runs.items()}
    q8_size, q4_size = sizes["ours q8_0"], sizes["ours q4_0"]
    one, two = next(v for k, v in r.items() if k.startswith("pass 1")), r["pass 2: llama.cpp quantize"]
    for total, second in (("two-pass total", two), ("two-pass total Q4_K_M", r["pass 2: llama.cpp quantize Q4_K_M"])):
        r[total] = _total([one, second])
    f16.unlink()
    out.unlink()
    size = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e9
    print(
        f"\n== {name}: {size:.3f} GB bf16 safetensors; Q8_0 file {q8_size / 1e9:.3f} GB, "
        f"pure Q4_0 file {q4_size / 1e9:.3f} GB; load average {os.getloadavg()[0]:.1f}"
    )
    for label, m in r.items():
        print(m.row(label))
    ours = r["ours q4_0"]
    if library:
        print(
            f"q8_0: weightops / library path: wall {r['ours q8_0'].m.wall_s / r['library q8_0'].m.wall_s:.2f}x, "
            f"CPU {r['ours q8_0'].cpu_s / r['library q8_0'].cpu_s:.2f}x"
        )
    params = sum(t.numel for t in open_checkpoint(model).tensors)
    print(
        f"throughput, M values per wall second / per CPU second: llama.cpp quantizer alone (pass 2, reading the "
        f"f16 file) {params / two.m.wall_s / 1e6:.1f} / {params / two.cpu_s / 1e6:.1f}; weightops whole job "
        f"(reading bf16, writing Q4_0) {params / ours.m.wall_s / 1e6:.1f} / {params / ours.cpu_s / 1e6:.1f}"
    )
    for mix, total in (("q4_0", "two-pass total"), ("q4_k_m", "two-pass total Q4_K_M")):
        ours, pipeline = r[f"ours {mix}"], r[total]
        print(
            f"{mix}: weightops one pass / two-pass pipeline: wall {ours.m.wall_s / pipeline.m.wall_s:.2f}x, "
            f"CPU {ours.cpu_s / pipeline.cpu_s:.2f}x, peak RSS {ours.m.peak_rss_mb / pipeline.m.peak_rss_mb:.2f}x "
            "(targets <= 0.5x)"
        )
    return r


MATRIX = ("q8_0", "q6_k", "q5_k_m", "q4_k_m")


def bench_matrix(
    name: str, model: Path, tokenizer: Path, work: Path, repeat: int, convert_script: Path | None
) -> dict[str, Run]:
    """The release matrix three ways, every command once per round, `repeat` rounds interleaved;
    each command's median-wall run counts. A way of several commands sums their wall and CPU
    time and takes the highest of their memory peaks."""
    outdir, out, f16 = work / "matrix", work / "out.gguf", work / "f16.gguf"
    tok = ["--tokenizer", str(tokenizer)]
    commands = {"ours matrix (one run, 4 files)": weightops(str(model), str(outdir), *tok, *_types(MATRIX))}
    commands.update({f"ours single {t}": weightops(str(model), str(out), "--type", t, *tok) for t in MATRIX})
    if convert_script:
        commands["pass 1: convert_hf_to_gguf.py f16"] = convert_script_command(convert_script, model, tokenizer, f16)
    else:
        commands["pass 1: f16 GGUF (weightops stand-in)"] = weightops(str(model), str(f16), "--type", "f16", *tok)
    commands.update(
        {
            f"llama.cpp quantize {t.upper()}": python(LLAMA_CPP_QUANTIZE) + [str(f16), str(out), t.upper()]
            for t in MATRIX
        }
    )
    runs: dict[str, list[Run]] = {label: [] for label in commands}
    for _ in range(repeat):
        for label, cmd in commands.items():
            runs[label].append(run(cmd))
    r = {label: sorted(rs, key=lambda x: x.m.wall_s)[len(rs) // 2] for label, rs in runs.items()}
    r["four single runs"] = _total([r[f"ours single {t}"] for t in MATRIX])
    r["llama.cpp: f16 + 4 quantize"] = _total([v for k, v in r.items() if k.startswith(("pass 1", "llama.cpp q"))])
    sizes = sum(p.stat().st_size for p in outdir.glob("*.gguf"))
    shutil.rmtree(outdir)
    f16.unlink()
    out.unlink()
    size = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e9
    print(
        f"\n== matrix {{{', '.join(t.upper() for t in MATRIX)}}}, {name}: {size:.3f} GB bf16 safetensors, "
        f"{sizes / 1e9:.3f} GB of GGUF files; load average {os.getloadavg()[0]:.1f}"
    )
    for label, m in r.items():
        print(m.row(label))
    ours, singles, theirs = r["ours matrix (one run, 4 files)"], r["four single runs"], r["llama.cpp: f16 + 4 quantize"]
    single_rss = max(r[f"ours single {t}"].m.peak_rss_mb for t in MATRIX)
    print(
        f"matrix / four single runs: wall {ours.m.wall_s / singles.m.wall_s:.2f}x, "
        f"CPU {ours.cpu_s / singles.cpu_s:.2f}x "
        f"(target <= 0.6x); / llama.cpp's way: wall {ours.m.wall_s / theirs.m.wall_s:.2f}x, CPU "
        f"{ours.cpu_s / theirs.cpu_s:.2f}x (target <= 0.4x); peak RSS {ours.m.peak_rss_mb:.0f} MB = "
        f"{ours.m.peak_rss_mb / single_rss:.2f}x a single run's (target <= 1.5x)"
    )
    return r


def _types(types: tuple[str, ...]) -> list[str]:
    return [a for t in types for a in ("--type", t)]


def _total(runs: list[Run]) -> Run:
    """Commands run one after another: wall and CPU add up, memory is the highest peak."""
    return Run(
        Measured(
            sum(x.m.wall_s for x in runs),
            max(x.m.peak_rss_mb for x in runs),
            max(x.m.peak_anon_mb for x in runs),
            0,
        ),
        sum(x.cpu_s for x in runs),
    )


def kernel_throughput() -> None:
    """Values per second (wall and CPU) of the block kernels alone on one 5632 x 2048 float32
    tensor, in process: weightops' torch kernels and gguf.quants' numpy ones."""

    import gguf
    import torch

    from weightops.quant import ggml

    x = torch.randn(5632, 2048, generator=torch.Generator().manual_seed(0)) * 0.02
    print(
        "\n== kernels on one 5632 x 2048 float32 tensor (11.5 M values), CPU, "
        f"{torch.get_num_threads()} torch threads; M values per wall second / per CPU second"
    )
    for qtype in ("q8_0", "q4_0"):
        ours = min((_timed(lambda q=qtype: ggml.quantize(x, q)) for _ in range(3)), key=lambda t: t[1])
        numpy = _timed(lambda q=qtype: gguf.quants.quantize(x.numpy(), getattr(gguf.GGMLQuantizationType, q.upper())))
        n = x.numel() / 1e6
        print(
            f"{qtype}: weightops.quant.ggml {n / ours[0]:7.1f} / {n / ours[1]:7.1f}   "
            f"gguf.quants (numpy) {n / numpy[0]:7.1f} / {n / numpy[1]:7.1f}"
        )


def _timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of fn()."""
    import time

    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--skip-library", action="store_true", help="skip the (slow) numpy library path on big models")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of runs (contenders interleaved); each contender's median wall time is reported",
    )
    ap.add_argument(
        "--convert-script",
        type=Path,
        default=None,
        help="llama.cpp's convert_hf_to_gguf.py, for pass 1 of the two-pass pipeline",
    )
    ap.add_argument("--matrix-only", action="store_true", help="run only the release-matrix contenders")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="weightops-bench-gguf-"))
    work.mkdir(parents=True, exist_ok=True)
    from weightops import tiny

    spm = work / "spm"
    if not (spm / "tokenizer.model").is_file():
        tiny.spm_tokenizer_dir(spm)
    small = work / "tiny-llama"
    if not (small / "config.json").is_file():
        tiny.tiny_llama(small, spm)
    if not args.matrix_only:
        kernel_throughput()
        bench_model("tiny LLaMA (2 layers, hidden 64)", small, spm, work, True, args.repeat, args.convert_script)
    results, matrices = {}, {}
    for layers in args.layers:
        model = synthetic_llama(work / f"llama-{layers}", layers, kv_heads=4)
        label = f"synthetic LLaMA, {layers} layers, hidden 2048"
        matrices[layers] = bench_matrix(label, model, spm, work, args.repeat, args.convert_script)
        if args.matrix_only:
            continue
        results[layers] = bench_model(
            label,
            model,
            spm,
            work,
            not args.skip_library,
            args.repeat,
            args.convert_script,
        )
    if len(matrices) >= 2:
        lo, hi = min(matrices), max(matrices)
        a, b = matrices[lo]["ours matrix (one run, 4 files)"].m, matrices[hi]["ours matrix (one run, 4 files)"].m
        print(
            f"ours matrix: peak RSS {lo} -> {hi} layers {a.peak_rss_mb:.0f} -> {b.peak_rss_mb:.0f} MB, "
            f"peak anon {a.peak_anon_mb:.0f} -> {b.peak_anon_mb:.0f} MB"
        )
    if len(results) >= 2:
        lo, hi = min(results), max(results)
        for label in ("ours q8_0", "ours q4_0", "ours q4_k_m"):
            a, b = results[lo][label].m, results[hi][label].m
            print(
                f"{label}: peak anon RSS {lo} -> {hi} layers {a.peak_anon_mb:.0f} -> {b.peak_anon_mb:.0f} MB "
                f"({(b.peak_anon_mb / a.peak_anon_mb - 1) * 100:+.1f}%), peak RSS {a.peak_rss_mb:.0f} -> "
                f"{b.peak_rss_mb:.0f} MB"
            )
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
