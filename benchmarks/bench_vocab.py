"""expand-vocab against the usual transformers workflow, Chinese-LLaMA-shaped.

A synthetic LLaMA (random bf16, hidden 1024 by default, vocab 32000, untied) with a 32000-piece
SentencePiece tokenizer gets a 20000-piece "Chinese" SentencePiece model merged in
(Chinese-LLaMA: 32000 -> 49953 rows in its real case). Each contender runs in a fresh
process with the inputs in the page cache:

- ours:      `expand_vocab(..., merge_spm=..., init=normal)` (tokenizer merge + HF files,
             streaming write; the embedding and lm_head are the only tensors loaded);
- ours-subtoken: the same with the default subtoken-mean init;
- baseline:  the merged tokenizer given for free, then AutoModelForCausalLM.from_pretrained,
             resize_token_embeddings(len(tokenizer), mean_resizing=True), save_pretrained
             (the merge_tokenizers.py + resize + save route, minus the tokenizer work);
- baseline-plain: the same with mean_resizing=False (new rows N(0, initializer_range)): the
             load/resize/save cost without transformers' per-sample normal draws.

    python benchmarks/bench_vocab.py [--layers 8 24] [--hidden 1024] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from common import measure, python, synthetic_llama

OURS = """
import sys
from weightops.pipelines.expand_vocab import expand_vocab
expand_vocab(sys.argv[1], sys.argv[3], merge_spm=sys.argv[2], init="{init}")
"""

BASELINE = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model.resize_token_embeddings(len(tok), mean_resizing={mean_resizing})
model.save_pretrained(sys.argv[3])
tok.save_pretrained(sys.argv[3])
"""


def synthetic_spm(path: Path, pieces: list[str]) -> Path:
    """The tiny LLaMA-style SentencePiece model with `pieces` appended (a big vocabulary
    without training one)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    from weightops import tiny
    from weightops.io.tokenizer_edit import merge_spm

    base = tiny.train_spm(path.with_suffix(".base.model"), 400).read_bytes()
    extra = pb.ModelProto()
    for p in pieces:
        extra.pieces.add(piece=p, score=0.0)
    path.write_bytes(merge_spm(base, extra.SerializeToString())[0])
    return path


def tokenizer_dir(directory: Path, model: Path) -> Path:
    """HF tokenizer files for a SentencePiece model (transformers converts it)."""
    import json

    from transformers import AutoTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, directory / "tokenizer.model")
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "legacy": False,
            }
        )
    )
    AutoTokenizer.from_pretrained(directory).save_pretrained(directory)
    return directory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 24])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="weightops-bench-vocab-"))
    try:
        base_spm = synthetic_spm(work / "base.model", [f"\u2581w{i}" for i in range(31600)])
        chinese = synthetic_spm(work / "chinese.model", [chr(0x4E00 + i) for i in range(19600)])
        tok = tokenizer_dir(work / "tok", base_spm)
        merged_tok = work / "merged-tok"
        merged_tok.mkdir()
        shutil.copyfile(tok / "tokenizer_config.json", merged_tok / "tokenizer_config.json")
        from weightops.io import tokenizer_edit

        tokenizer_edit.copy_tokenizer_files(tok, merged_tok)
        tokenizer_edit.edit(merged_tok, merge=chinese)  # the baseline gets this for free
        merged_size = len(tokenizer_edit.load(merged_tok))
        for layers in args.layers:
            model = synthetic_llama(
                work / f"model-{layers}",
                layers,
                hidden=args.hidden,
                intermediate=args.hidden * 11 // 4,
                heads=args.hidden // 128,
                kv_heads=args.hidden // 128,
            )
            tokenizer_edit.copy_tokenizer_files(tok, model)
            size = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e9
            print(f"\n{layers} layers, hidden {args.hidden}, {size:.2f} GB; vocab 32000 -> {merged_size}")
            runs = {
                "ours (normal)": (python(OURS.format(init="normal")), chinese),
                "ours (subtoken-mean)": (python(OURS.format(init="subtoken-mean")), chinese),
                "baseline (transformers)": (python(BASELINE.format(mean_resizing=True)), merged_tok),
                "baseline-plain (transformers)": (python(BASELINE.format(mean_resizing=False)), merged_tok),
            }
            res = {}
            for name, (cmd, extra) in runs.items():
                out = work / f"out-{layers}-{name.split()[0]}-{len(res)}"
                for f in model.glob("*.safetensors"):  # warm the page cache for every contender alike
                    f.read_bytes()
                res[name] = m = measure(cmd + [str(model), str(extra), str(out)])
                print(m.row(name))
                shutil.rmtree(out, ignore_errors=True)
            o = res["ours (normal)"]
            for name in ("baseline (transformers)", "baseline-plain (transformers)"):
                b = res[name]
                print(
                    f"{name.split()[0]}/ours (normal): wall {b.wall_s / o.wall_s:.2f}x, peak RSS "
                    f"{b.peak_rss_mb / o.peak_rss_mb:.2f}x, peak anon {b.peak_anon_mb / o.peak_anon_mb:.2f}x"
                )
            shutil.rmtree(model, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
