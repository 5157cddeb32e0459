"""Throughput of our GGML block-quantization kernels (weightops/quant/ggml.py, and the K-quants in
weightops/quant/kquants/) against:
- gguf.quants (numpy; the library path of convert_hf_to_gguf.py; legacy types only, it does not
  write K-quants),
- libggml's quantizer kernel (`ggml_quantize_chunk`, what llama-quantize runs per tensor;
  called through ctypes on llama-cpp-python's libggml, rows split over the same threads),
- llama.cpp's quantizer tool (`llama_cpp.llama_model_quantize`, `pure`, on an F32 and on an
  F16 GGUF holding the same matrices: file read + conversion + quantization + file write).

    python benchmarks/bench_quant_kernels.py [--threads 2] [--matrices 4] [--size 2048] [--repeat 7]

Every contender sees the same 2048x2048 matrices (random normal * 0.02); ours runs with
torch.set_num_threads(threads). Reported: ms per matrix (best of --repeat; contenders are
interleaved so machine load hits them alike) and MB/s of float32 input; ratio = our
throughput / theirs (> 1: we are faster), against our run on the same input dtype. The
bytes are checked to be identical too.
Target (issues 6 and 16): our kernels >= llama.cpp's quantizer throughput on the same cores.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import common  # noqa: F401  (puts the repository on sys.path)
import gguf
import llama_cpp
import numpy as np
import torch
from gguf import GGUFReader, GGUFWriter, quants

from weightops.quant import ggml, ggml_types

FTYPES = {  # with `pure`, every weight gets the file type's default tensor type
    "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1,
    "q5_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_0,
    "q5_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_1,
    "q2_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K,
    "q3_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_S,
    "q4_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "q5_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
}
NAMES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def libggml_quantize_chunk() -> Callable[..., int]:
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    fn = lib.ggml_quantize_chunk  # (type, src, dst, start, nrows, n_per_row, imatrix) -> bytes
    fn.restype = ctypes.c_size_t
    fn.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    return fn


def libggml(fn, a: np.ndarray, qtype: str, threads: int) -> np.ndarray:
    """Quantize float32 `a` with libggml, its rows split over `threads` threads (ctypes drops the GIL)."""
    out = np.empty((a.shape[0], ggml.row_bytes(a.shape[1], qtype)), dtype=np.uint8)
    qtype_id = int(ggml_types.parse(qtype).ggml)
    bounds = np.linspace(0, a.shape[0], threads + 1).astype(int)
    workers = [
        threading.Thread(
            target=fn,
            args=(qtype_id, a[lo:hi].ctypes.data, out[lo:hi].ctypes.data, 0, hi - lo, a.shape[1], None),
        )
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return out


def write_gguf(path: Path, mats: list[np.ndarray], dtype: np.dtype) -> list[str]:
    """A minimal llama GGUF holding `mats` as 2-D weights (llama.cpp's quantizer reads the
    architecture and these hyper-parameters before it quantizes anything)."""
    n = mats[0].shape[0]
    w = GGUFWriter(str(path), "llama")
    layers = -(-len(mats) // len(NAMES))
    w.add_block_count(layers)
    w.add_context_length(2048)
    w.add_embedding_length(n)
    w.add_feed_forward_length(n)
    w.add_head_count(16)
    w.add_head_count_kv(16)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == np.float32 else gguf.LlamaFileType.MOSTLY_F16)
    names = [f"blk.{i // len(NAMES)}.{NAMES[i % len(NAMES)]}.weight" for i in range(len(mats))]
    for name, m in zip(names, mats, strict=True):
        w.add_tensor(name, m.astype(dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return names


@contextlib.contextmanager
def quiet_stderr():
    """llama.cpp logs every tensor to fd 2; keep the table readable."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def llama_quantize(src: Path, dst: Path, qtype: str, threads: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = FTYPES[qtype]
    params.pure = True
    with quiet_stderr():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({src} -> {qtype}) failed with {rc}")


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data).reshape(-1) for t in GGUFReader(str(path)).tensors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--matrices", type=int, default=4)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--types", nargs="+", default=list(FTYPES), choices=list(FTYPES))
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.workdir is None:
        with tempfile.TemporaryDirectory(prefix="weightops-bench-quant-") as tmp:
            run(args, Path(tmp))
    else:
        args.workdir.mkdir(parents=True, exist_ok=True)
        run(args, args.workdir)


def run(args: argparse.Namespace, work: Path) -> None:
    rng = np.random.default_rng(0)
    mats = [(rng.standard_normal((args.size, args.size)) * 0.02).astype(np.float32) for _ in range(args.matrices)]
    mats16 = [m.astype(np.float16) for m in mats]
    tensors, tensors16 = [torch.from_numpy(m) for m in mats], [torch.from_numpy(m) for m in mats16]
    f32_file, f16_file = work / "in-f32.gguf", work / "in-f16.gguf"
    names = write_gguf(f32_file, mats, np.float32)
    write_gguf(f16_file, mats, np.float16)
    chunk = libggml_quantize_chunk()
    mb = sum(m.nbytes for m in mats) / 1e6
    print(
        f"{args.matrices} matrices {args.size}x{args.size} ({mb:.1f} MB float32), {args.threads} threads, "
        f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'type':6} {'contender':44} {'ms/matrix':>10} {'MB/s':>8} {'ours/them':>10}")

    for qtype in args.types:
        out_f32, out_f16 = work / f"out-f32-{qtype}.gguf", work / f"out-f16-{qtype}.gguf"
        contenders: dict[str, Callable[[], object]] = {
            # each lambda binds this iteration's values (default arguments), not the loop's last ones
            "weightops torch kernels (float32 input)": lambda q=qtype: [ggml.quantize(t, q) for t in tensors],
            "weightops torch kernels (float16 input)": lambda q=qtype: [ggml.quantize(t, q) for t in tensors16],
            "libggml ggml_quantize_chunk (kernel)": lambda q=qtype: [libggml(chunk, m, q, args.threads) for m in mats],
            "llama_model_quantize, F32 GGUF (tool)": lambda q=qtype, out=out_f32: llama_quantize(
                f32_file, out, q, args.threads
            ),
            "llama_model_quantize, F16 GGUF (tool)": lambda q=qtype, out=out_f16: llama_quantize(
                f16_file, out, q, args.threads
            ),
        }
        best = {name: float("inf") for name in contenders}
        for _ in range(args.repeat):
            for name, fn in contenders.items():
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
        ggml_type = ggml_types.parse(qtype).ggml
        reference = None
        if ggml_types.parse(qtype).block_size == 32:  # gguf.quants reads K-quants but does not write them
            start = time.perf_counter()
            with np.errstate(all="ignore"):
                reference = quants.quantize(mats[0], ggml_type)
            best["gguf.quants numpy (1 matrix, 1 thread)"] = (time.perf_counter() - start) * args.matrices

        ours = [ggml.quantize(t, qtype).numpy() for t in tensors]
        ours16 = [ggml.quantize(t, qtype).numpy().reshape(-1) for t in tensors16]
        tool32, tool16 = read_tensors(out_f32), read_tensors(out_f16)
        identical = (
            (reference is None or np.array_equal(ours[0], reference))
            and all(np.array_equal(o, libggml(chunk, m, qtype, args.threads)) for o, m in zip(ours, mats, strict=True))
            and all(np.array_equal(o.reshape(-1), tool32[n]) for o, n in zip(ours, names, strict=True))
            and all(np.array_equal(o, tool16[n]) for o, n in zip(ours16, names, strict=True))
        )
        for name, seconds in best.items():
            per = seconds / args.matrices * 1e3
            ours_s = best[
                "weightops torch kernels (float16 input)"
                if "F16" in name
                else "weightops torch kernels (float32 input)"
            ]
            ratio = "" if name.startswith("weightops") else f"{seconds / ours_s:9.2f}x"
            print(f"{qtype:6} {name:44} {per:10.2f} {mb / seconds:8.0f} {ratio:>10}")
        same = "ours = gguf.quants where it writes the type = libggml = llama_model_quantize files"
        print(f"{qtype:6} bytes identical ({same}): {identical}")
        if not identical:
            raise SystemExit(f"{qtype}: our bytes differ from a reference")


if __name__ == "__main__":
    main()
