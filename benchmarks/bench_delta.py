"""apply-delta / make-delta against the reference scripts' approach and against the I/O floor.

Synthetic LLaMA-shaped checkpoints (random bf16, hidden 2048, 2 GB shards) at two depths: a
base, and a "fine-tune" with other random weights; the delta is made by our make-delta
first (and timed). Each contender runs in a fresh process with the input files evicted from
the page cache (`--cache cold`, the default) or read once just before (`--cache warm`):

- ours:     `weightops apply-delta` / `make-delta` (streaming, a tensor pair in flight);
- baseline: load both models whole, add (or subtract) in place in bf16, save one file, fsync
            (what FastChat's / ChatYuan's apply_delta.py and make_delta.py do, minus
            building transformers models around the tensors: a lower bound on their cost);
- floor:    plain file copies: read the first input to /dev/null, `cp -r` the second input to
            the output (it reads it and writes as many bytes as the output has), fsync.

Each contender runs --repeat times, interleaved with the others; the best wall time and the
highest memory peaks are reported. Targets (issue 3): peak anonymous RSS flat in model size; wall <= 1.3x the I/O floor.

    python benchmarks/bench_delta.py [--layers 4 8] [--hidden 2048 --intermediate 5632]
                                     [--no-baseline] [--cache cold|warm] [--workdir DIR]

`--hidden 4096 --intermediate 11008 --layers 16 32` gives LLaMA-7B-shaped checkpoints of 7.0
and 13.5 GB; there the baseline needs both models in RAM (27 GB at 32 layers): `--no-baseline`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from common import Best, Measured, measure, python, rotated, set_cache, synthetic_llama

# Python contenders write the wall time of the work itself (after interpreter start and
# imports, a fixed cost of a few seconds on a loaded machine) to the file named by argv[4].
OURS = """
import sys, time
from pathlib import Path
from weightops.pipelines.deltas import {fn}
t0 = time.perf_counter()
{fn}(sys.argv[1], sys.argv[2], sys.argv[3])
Path(sys.argv[4]).write_text(str(time.perf_counter() - t0))
"""

BASELINE = """
import os, sys, time
from pathlib import Path
from safetensors.torch import load_file, save_file
t0 = time.perf_counter()

def load(d):
    out = {{}}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out

first, second = load(sys.argv[1]), load(sys.argv[2])
if "{job}" == "apply":  # apply_delta.py: base param += delta
    for name, param in first.items():
        param += second[name]
    result = first
else:  # make_delta.py: target param -= base
    for name, param in second.items():
        param -= first[name]
    result = second
Path(sys.argv[3]).mkdir()
save_file(result, Path(sys.argv[3]) / "model.safetensors", metadata={{"format": "pt"}})
fd = os.open(Path(sys.argv[3]) / "model.safetensors", os.O_RDONLY); os.fsync(fd)
Path(sys.argv[4]).write_text(str(time.perf_counter() - t0))
"""

FLOOR = 'cat "$1"/*.safetensors > /dev/null && cp -r "$2" "$3" && sync "$3"/*'


def weight_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def run(cmd: list[str], first: Path, second: Path, out: Path, cache: str) -> tuple[Measured, float]:
    """(process measurement, wall of the work alone: without interpreter start and imports)."""
    shutil.rmtree(out, ignore_errors=True)
    set_cache(weight_files(first) + weight_files(second), cache)
    clock = out.with_name(out.name + ".time")
    clock.unlink(missing_ok=True)
    m = measure(cmd + [str(first), str(second), str(out), str(clock)])
    return m, float(clock.read_text()) if clock.exists() else m.wall_s


def contenders(job: str, baseline: bool) -> dict[str, list[str]]:
    fn = {"apply": "apply_delta", "make": "make_delta"}[job]
    found = {
        "ours": python(OURS.format(fn=fn)),
        "baseline": python(BASELINE.format(job=job)),
        "floor": ["sh", "-c", FLOOR, "floor"],
    }
    if not baseline:
        del found["baseline"]
    return found


def same_tensors(a: Path, b: Path) -> bool:
    """Our output against the baseline's: float32 arithmetic rounded once equals in-place bf16."""
    from weightops.io.checkpoint import open_checkpoint

    ours = {r.name: r for r in open_checkpoint(a).tensors}
    theirs = {r.name: r for r in open_checkpoint(b).tensors}
    return ours.keys() == theirs.keys() and all(ours[n].raw().tobytes() == theirs[n].raw().tobytes() for n in ours)


def run_size(
    work: Path, layers: int, repeat: int, cache: str, shape: dict[str, int], baseline: bool
) -> dict[tuple[str, str], Best]:
    base = synthetic_llama(work / f"base-{layers}", layers, seed=0, **shape)
    target = synthetic_llama(work / f"target-{layers}", layers, seed=1, **shape)
    delta = work / f"delta-{layers}"
    size = sum(f.stat().st_size for f in weight_files(base)) / 1e9
    print(f"\n{layers} layers, {size:.2f} GB per checkpoint (load average {os.getloadavg()[0]:.1f})")
    res: dict[tuple[str, str], Best] = {}
    for job, (first, second) in (("make", (base, target)), ("apply", (base, delta))):
        for round_ in range(repeat):  # interleaved, so that load from other processes hits all alike
            for name, cmd in rotated(list(contenders(job, baseline).items()), round_):
                out = delta if (job, name) == ("make", "ours") else work / f"{job}-{name}"
                res.setdefault((job, name), Best()).add(*run(cmd, first, second, out, cache))
                if name == "floor" or (name, job, baseline) == ("ours", "apply", False):
                    shutil.rmtree(out)  # not compared: free the disk (at 32 layers, 7B-wide, 13.5 GB each)
        for name in contenders(job, baseline):
            print(res[job, name].row(f"{job}-delta {name}"))
        o, f = res[job, "ours"], res[job, "floor"]
        print(f"{job}-delta ratios: ours/floor wall {o.wall / f.wall:.2f}x (work {o.work / f.work:.2f}x)")
        if baseline:
            ours_out = delta if job == "make" else work / "apply-ours"
            print(f"{job}-delta: ours == baseline bit for bit: {same_tensors(ours_out, work / f'{job}-baseline')}")
            b = res[job, "baseline"]
            print(
                f"{job}-delta: ours/baseline wall {o.wall / b.wall:.2f}x (work {o.work / b.work:.2f}x); "
                f"baseline/ours peak RSS {b.rss / o.rss:.1f}x, peak anon {b.anon / o.anon:.1f}x"
            )
    for p in (base, target, delta, *work.glob("apply-*"), *work.glob("make-*")):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--cache", choices=("cold", "warm"), default="cold")
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs per contender; the fastest wall and the largest memory peaks are reported",
    )
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument(
        "--no-baseline",
        dest="baseline",
        action="store_false",
        help="skip the load-everything baseline (it needs both models in RAM)",
    )
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    shape = {"hidden": args.hidden, "intermediate": args.intermediate}
    work = args.workdir or Path(tempfile.mkdtemp(prefix="weightops-bench-delta-"))
    print(
        f"inputs {args.cache} in the page cache, {os.cpu_count()} CPUs; peak RSS = VmHWM (mapped input pages "
        "included), peak anon = RssAnon"
    )
    try:
        results = {
            layers: run_size(work, layers, args.repeat, args.cache, shape, args.baseline) for layers in args.layers
        }
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    lo, hi = min(results), max(results)
    print()
    for job in ("make", "apply"):
        for name in ("ours", "baseline") if args.baseline else ("ours",):
            a, b = results[lo][job, name], results[hi][job, name]
            print(
                f"{job}-delta {name}: {lo} -> {hi} layers, peak RSS {a.rss:.0f} -> {b.rss:.0f} MB "
                f"({(b.rss / a.rss - 1) * 100:+.0f}%), peak anon {a.anon:.0f} -> {b.anon:.0f} MB "
                f"({(b.anon / a.anon - 1) * 100:+.0f}%)"
            )
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
