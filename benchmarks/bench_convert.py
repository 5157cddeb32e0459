"""`weightops convert` both ways on a synthetic LLaMA (random bf16, 16 layers, hidden 2048,
16 heads / 4 key-value heads), against the whole-model approach of TencentPretrain's own
script (load every tensor, convert, save) reimplemented here, and `cp` of the same files.

    python benchmarks/bench_convert.py [--workdir DIR] [--layers 16]

Each contender runs in a fresh interpreter; wall time and peak memory (VmHWM and sampled
RssAnon, see common.py) come from /proc. Target (issue 4): peak anonymous RSS a few
tensors, not the model.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from common import measure, python, synthetic_llama

# The whole-model peers: what TencentPretrain's convert script does (every tensor in memory).
WHOLE_HF_TO_TP = """
import sys, collections, glob, torch
from safetensors.torch import load_file
heads, kv, layers = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
hf = {}
for f in sorted(glob.glob(sys.argv[1] + "/*.safetensors")):
    hf.update({k: v.clone() for k, v in load_file(f).items()})
def perm(w, h):
    return w.reshape(h, 2, w.shape[0] // h // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)
out = collections.OrderedDict(); out["embedding.word.embedding.weight"] = hf["model.embed_tokens.weight"]
for i in range(layers):
    h, t = f"model.layers.{i}.", f"encoder.transformer.{i}."
    out[t + "self_attn.linear_layers.0.weight"] = perm(hf[h + "self_attn.q_proj.weight"], heads)
    out[t + "self_attn.linear_layers.1.weight"] = perm(hf[h + "self_attn.k_proj.weight"], kv)
    for a, b in (("self_attn.linear_layers.2", "self_attn.v_proj"), ("self_attn.final_linear", "self_attn.o_proj"),
                 ("layer_norm_1", "input_layernorm"), ("feed_forward.linear_gate", "mlp.gate_proj"),
                 ("feed_forward.linear_1", "mlp.up_proj"), ("feed_forward.linear_2", "mlp.down_proj"),
                 ("layer_norm_2", "post_attention_layernorm")):
        out[t + a + ".weight"] = hf[h + b + ".weight"]
out["encoder.layer_norm.weight"] = hf["model.norm.weight"]
out["target.lm.output_layer.weight"] = hf["lm_head.weight"]
torch.save(out, sys.argv[2])
"""

OURS = "import sys; from weightops.cli import run; sys.argv[0] = 'weightops'; run()"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--layers", type=int, default=16)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="weightops-bench-convert-"))
    heads, kv_heads = 16, 4
    src = synthetic_llama(work / f"llama-{args.layers}", args.layers, heads=heads, kv_heads=kv_heads)
    size = sum(f.stat().st_size for f in src.iterdir()) / 1e9
    tp, hf, whole = work / "tp", work / "hf", work / "whole.bin"
    for p in (tp, hf, work / "cp-out"):
        shutil.rmtree(p, ignore_errors=True)
    whole.unlink(missing_ok=True)
    tp_config = work / "tp-config.json"

    cp = measure(["cp", "-r", str(src), str(work / "cp-out")])
    startup = measure(python("import weightops.cli, transformers; transformers.AutoConfig"))
    to_tp = measure(python(OURS) + ["convert", str(src), str(tp), "--to", "tencentpretrain"])
    shutil.copyfile(tp / "tencentpretrain_config.json", tp_config)
    to_hf = measure(
        python(OURS)
        + ["convert", str(tp / "tencentpretrain_model.bin"), str(hf), "--to", "hf", "--tp-config", str(tp_config)]
    )
    peer = measure(python(WHOLE_HF_TO_TP) + [str(src), str(whole), str(heads), str(kv_heads), str(args.layers)])

    print(f"\nsynthetic LLaMA: {args.layers} layers, hidden 2048, {heads}/{kv_heads} heads, bf16, {size:.2f} GB")
    print(cp.row("cp -r (HF directory)"))
    print(startup.row("startup: import weightops + transformers"))
    print(to_tp.row("weightops convert HF -> TencentPretrain"))
    print(to_hf.row("weightops convert TencentPretrain -> HF"))
    print(peer.row("whole-model HF -> TP (TencentPretrain's way)"))
    print(
        f"HF -> TP wall: {to_tp.wall_s / cp.wall_s:.2f}x cp, {to_tp.wall_s / peer.wall_s:.2f}x whole-model; "
        f"peak anon RSS {to_tp.peak_anon_mb:.0f} MB vs whole-model {peer.peak_anon_mb:.0f} MB"
    )
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
