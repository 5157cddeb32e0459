"""merge-lora against PEFT's merge_and_unload and against the I/O floor.

Synthetic LLaMA-shaped bf16 checkpoints (`common.synthetic_llama`) at two depths, and a
rank-64 adapter on every linear layer (q/k/v/o, gate/up/down; float32 factors, written as
PEFT saves them). Each contender runs in a fresh process:

- ours:  `weightops merge-lora` (streaming, `--rounding peft` so the outputs can be compared);
- peft:  `AutoModelForCausalLM.from_pretrained` + `PeftModel.from_pretrained` +
         `merge_and_unload()` + `save_pretrained` (the whole model in memory);
- floor: read the base to /dev/null and copy it to the output (`cp -r`), fsync: cp may copy
         in the kernel (copy_file_range), as weightops does for tensors it leaves unchanged;
- write floor: the base's bytes read and written through user space (`dd bs=16M`), fsync: what
         writing new bytes costs at the least.

Targets (issue 18): <= 0.5x PEFT's wall with <= 0.2x its peak RSS; our peak RSS flat from 8 to
16 layers; at LLaMA-7B width, wall <= 1.3x the I/O floor.

    python benchmarks/bench_lora.py [--layers 8 16] [--hidden 1024 --intermediate 2816] [--no-peft]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from common import Best, measure, python, rotated, set_cache, synthetic_llama
from safetensors.torch import save_file

OURS = """
import sys, time
from pathlib import Path
from weightops.pipelines.merge_lora import merge_lora
t0 = time.perf_counter()
merge_lora(sys.argv[1], [sys.argv[2]], sys.argv[3], rounding="peft")
Path(sys.argv[4]).write_text(str(time.perf_counter() - t0))
"""

PEFT = """
import sys, time, warnings
from pathlib import Path
warnings.filterwarnings("ignore")
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3])
Path(sys.argv[4]).write_text(str(time.perf_counter() - t0))
"""

FLOOR = 'cat "$1"/*.safetensors > /dev/null && cp -r "$1" "$3" && sync "$3"/*'
# the same bytes moved through user space, as any writer of new bytes must (cp may copy in the kernel)
WRITE_FLOOR = (
    'mkdir "$3" && for f in "$1"/*; do dd if="$f" of="$3/$(basename "$f")" bs=16M status=none || exit 1; done '
    '&& sync "$3"/*'
)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def adapter(directory: Path, base: Path, rank: int = 64) -> Path:
    """A rank-`rank` PEFT adapter on every linear layer of the synthetic base."""
    if (directory / "adapter_config.json").is_file():
        return directory
    from weightops.io.checkpoint import open_checkpoint

    directory.mkdir(parents=True)
    g = torch.Generator().manual_seed(7)
    tensors = {}
    for ref in open_checkpoint(base).tensors:
        module = ref.name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in LINEARS:
            out, inp = ref.shape
            tensors[f"base_model.model.{module}.lora_A.weight"] = 0.01 * torch.randn(rank, inp, generator=g)
            tensors[f"base_model.model.{module}.lora_B.weight"] = 0.01 * torch.randn(out, rank, generator=g)
    save_file(tensors, directory / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(LINEARS)}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--cache", choices=("cold", "warm"), default="warm")
    ap.add_argument("--no-peft", dest="peft", action="store_false")
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-lora-"))
    contenders = {
        "ours": python(OURS),
        "peft": python(PEFT),
        "floor": ["sh", "-c", FLOOR, "floor"],
        "write floor": ["sh", "-c", WRITE_FLOOR, "floor"],
    }
    if not args.peft:
        del contenders["peft"]
    heads = args.hidden // 128
    for layers in args.layers:
        base = synthetic_llama(
            work / f"base-{layers}",
            layers,
            hidden=args.hidden,
            intermediate=args.intermediate,
            heads=heads,
            kv_heads=heads,
        )
        lora = adapter(work / f"lora-{layers}", base)
        size = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
        print(f"\n{layers} layers, base {size:.2f} GB")
        best: dict[str, Best] = {}
        for round_ in range(args.repeat):
            for name, cmd in rotated(list(contenders.items()), round_):
                out, clock = work / f"out-{name}", work / f"out-{name}.time"
                shutil.rmtree(out, ignore_errors=True)
                clock.unlink(missing_ok=True)
                set_cache(sorted(base.glob("*.safetensors")), args.cache)
                m = measure(cmd + [str(base), str(lora), str(out), str(clock)])
                best.setdefault(name, Best()).add(m, float(clock.read_text()) if clock.exists() else m.wall_s)
        for name, b in best.items():
            print(b.row(f"merge-lora {name}"))
        o, f, w = best["ours"], best["floor"], best["write floor"]
        print(f"ours/floor wall {o.wall / f.wall:.2f}x (work {o.work / f.work:.2f}x)")
        print(f"ours/write floor wall {o.wall / w.wall:.2f}x (work {o.work / w.work:.2f}x)")
        if "peft" in best:
            p = best["peft"]
            print(
                f"ours/peft wall {o.wall / p.wall:.2f}x (work {o.work / p.work:.2f}x); "
                f"ours/peft peak RSS {o.rss / p.rss:.2f}x"
            )
        for p in work.glob("out-*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()


if __name__ == "__main__":
    main()
