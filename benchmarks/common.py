"""Shared benchmark helpers: synthetic LLaMA-shaped checkpoints written streaming, and
wall/peak-memory measurement of a command in a child process.

Peak memory is reported two ways: total RSS (VmHWM; includes pages of memory-mapped
inputs, which the kernel can reclaim) and anonymous RSS (RssAnon, sampled), which is what
a user's machine cannot give back and what must stay flat as models grow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from weightops.dtypes import name_of  # noqa: E402
from weightops.io.checkpoint import save_hf  # noqa: E402
from weightops.stream import TensorRef  # noqa: E402


def llama_shapes(
    layers: int, hidden: int = 2048, intermediate: int = 5632, vocab: int = 32000, kv_heads: int = 16, heads: int = 16
) -> dict[str, tuple[int, ...]]:
    kv = hidden // heads * kv_heads
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (hidden, hidden),
                p + "self_attn.k_proj.weight": (kv, hidden),
                p + "self_attn.v_proj.weight": (kv, hidden),
                p + "self_attn.o_proj.weight": (hidden, hidden),
                p + "mlp.gate_proj.weight": (intermediate, hidden),
                p + "mlp.up_proj.weight": (intermediate, hidden),
                p + "mlp.down_proj.weight": (hidden, intermediate),
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
            }
        )
    return shapes


def synthetic_llama(
    directory: Path,
    layers: int,
    hidden: int = 2048,
    intermediate: int = 5632,
    vocab: int = 32000,
    heads: int = 16,
    kv_heads: int = 16,
    seed: int = 0,
    max_shard_size: str = "2GB",
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """A random LLaMA checkpoint with config.json, generated and written one tensor at a time."""
    directory = Path(directory)
    if (directory / "config.json").is_file():
        return directory
    shapes = llama_shapes(layers, hidden, intermediate, vocab, kv_heads, heads)

    def make(i: int, shape: tuple[int, ...]):
        def load() -> torch.Tensor:
            g = torch.Generator().manual_seed(seed * 100_003 + i)
            if len(shape) == 1:
                return (1 + 0.1 * torch.randn(shape, generator=g)).to(dtype)
            return (0.02 * torch.randn(shape, generator=g)).to(dtype)

        return load

    refs = [TensorRef(n, s, name_of(dtype), "synthetic", loader=make(i, s)) for i, (n, s) in enumerate(shapes.items())]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "hidden_act": "silu",
    }
    save_hf(refs, directory, max_shard_size=max_shard_size, extra_files={"config.json": json.dumps(config, indent=2)})
    return directory


def rotated(items: list, round_: int) -> list:
    """`items` starting at position `round_` (mod len): each contender goes first in some round.

    Why: on virtual machines whose memory the host backs lazily (this CI-class VM), freed
    guest pages go back to the host within about a minute, and the next first touch costs a lot
    (writing 2 GB into the page cache: 3.2-4.2 s on such pages, 0.4-0.7 s on pages just freed by
    the previous run). Whoever runs first in a round pays that; rotating spreads it."""
    k = round_ % len(items) if items else 0
    return items[k:] + items[:k]


def set_cache(paths: list[Path], cache: str) -> None:
    """Start every contender alike: flush what earlier runs left to write back (so one
    contender's dirty pages are not written during the next one's run), then evict the
    inputs from the page cache (cold) or read them into it (warm)."""
    os.sync()
    for p in paths:
        if cache == "warm":
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass
        else:
            fd = os.open(p, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


@dataclass
class Measured:
    wall_s: float
    peak_rss_mb: float
    peak_anon_mb: float
    returncode: int

    def row(self, label: str) -> str:
        return (
            f"{label:<44} wall {self.wall_s:7.2f} s   peak RSS {self.peak_rss_mb:8.1f} MB   "
            f"peak anon {self.peak_anon_mb:8.1f} MB"
        )


@dataclass
class Best:
    """The fastest of the repeated runs and the highest memory peaks among them."""

    wall: float = float("inf")  # the whole process, interpreter start and imports included
    work: float = float("inf")  # the work alone
    rss: float = 0.0  # MB, VmHWM
    anon: float = 0.0  # MB, RssAnon

    def add(self, m: Measured, work: float) -> None:
        self.wall, self.work = min(self.wall, m.wall_s), min(self.work, work)
        self.rss, self.anon = max(self.rss, m.peak_rss_mb), max(self.anon, m.peak_anon_mb)

    def row(self, label: str) -> str:
        return (
            f"{label:<22} wall {self.wall:6.2f} s (work {self.work:6.2f} s)   peak RSS {self.rss:7.1f} MB   "
            f"peak anon {self.anon:7.1f} MB"
        )


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon", "VmRSS"):
                out[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def measure(cmd: list[str], interval: float = 0.01, log: Path | None = None) -> Measured:
    """Run `cmd`, sampling its memory; raises if it fails. With `log`, its output goes there."""
    out = open(log, "wb") if log else None  # noqa: SIM115  (closed below, after the child exits)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=out)
    peak = {"VmHWM": 0, "RssAnon": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            s = _status(proc.pid)
            for k in peak:
                peak[k] = max(peak[k], s.get(k, 0))
            time.sleep(interval)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    rc = proc.wait()
    wall = time.perf_counter() - start
    done.set()
    t.join()
    if out:
        out.close()
    if rc != 0:
        raise SystemExit(f"command failed ({rc}): {' '.join(cmd)}" + (f" (output in {log})" if log else ""))
    return Measured(wall, peak["VmHWM"] / 1024, peak["RssAnon"] / 1024, rc)


def python(code: str) -> list[str]:
    """A command running `code` in a fresh interpreter (so imports count the same for every contender)."""
    return [sys.executable, "-c", code]


def llama_imatrix() -> Path:
    """llama.cpp's own llama-imatrix, built from the source package of the installed
    llama-cpp-python against its libllama/libggml with llama.cpp's Release flags, by the
    builder the test oracles use (tests/oracles/llama_cpp_build.py; its command-line parser
    is tests/oracles/llama_imatrix.cpp). Cached after the first build (about a minute)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "oracles"))
    import llama_cpp_build as build

    try:
        tools = build.build_tools(build.LLAMA_IMATRIX, build.IMATRIX_COMMON, optimize=("-O3", "-DNDEBUG"))
    except build.Unavailable as e:
        raise SystemExit(f"cannot build llama-imatrix: {e}") from None
    return tools["llama-imatrix"]
