"""Pass/fail thresholds for a verification, with defaults that depend on what the candidate is.

The gate is on the mean KL divergence (llama-perplexity's headline number) and on top-1
agreement. Defaults leave a few times the headroom over what llama.cpp's own scoreboard
measured for LLaMA 2 7B / LLaMA 3 8B on Wikitext-2 (tools/perplexity/README.md), so that an
ordinary quantization passes and a broken conversion (mean KLD of 0.5 and more, top-1 far
below) does not:

| kind  | candidate                                        | measured there (KLD, top-1)       | default gate |
|-------|--------------------------------------------------|-----------------------------------|--------------|
| exact | HF/TencentPretrain, same dtypes as the reference | 0, 100 % (same arithmetic)        | 1e-6, 0.999  |
| float | another float dtype; GGUF F32/F16/BF16           | BF16 vs FP16: 2.5e-5, 99.7 %      | 1e-3, 0.98   |
| q8    | GGUF Q8_0; bitsandbytes int8                     | 0.00037 / 0.00136, 98.8 / 97.7 %  | 5e-3, 0.95   |
| q6    | GGUF Q6_K                                        | 0.0021 / 0.0055, 97.5 / 96.0 %    | 0.02, 0.92   |
| q5    | GGUF Q5_0/Q5_1/Q5_K                              | Q5_1 0.018, Q5_0 0.022 (L3 8B)    | 0.06, 0.88   |
| q4    | GGUF Q4_0/Q4_1/Q4_K/IQ4; bitsandbytes nf4/fp4    | Q4_0 0.072 (L3 8B), Q4_K_M 91.9 % | 0.2, 0.80    |
| low   | GGUF Q3/Q2/IQ3 and below                         | 0.1 - 0.45, 71 - 86 %             | 0.6, 0.65    |
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..quant import ggml_types

KINDS: dict[str, tuple[float, float]] = {
    "exact": (1e-6, 0.999),
    "float": (1e-3, 0.98),
    "q8": (5e-3, 0.95),
    "q6": (0.02, 0.92),
    "q5": (0.06, 0.88),
    "q4": (0.2, 0.80),
    "low": (0.6, 0.65),
}
_ORDER = list(KINDS)
BNB_KINDS = {"bnb-int8": "q8", "bnb-nf4": "q4", "bnb-fp4": "q4"}


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
