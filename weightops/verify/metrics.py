"""Per-token comparison of two models' next-token distributions, and its aggregates.

The definitions are those of llama.cpp's `llama-perplexity --kl-divergence` (tools/perplexity):

- KL divergence per position: KL(ref || cand) = sum_i p_ref(i) * (log p_ref(i) - log p_cand(i)),
  each side's log-probabilities being the log-softmax of its own logits;
- top-1 agreement ("Same top p"): the two argmax ids are equal;
- Δp: p_cand(t) - p_ref(t) for the prompt's actual next token t; reported as its RMS;
- perplexity of each side: exp(mean negative log-likelihood of the next tokens); their ratio;
- percentiles interpolate linearly between sorted values (index = fraction * (n - 1)).

Unlike llama-perplexity, the reference log-probabilities are kept exactly (no 16-bit
compression, no cut-off below log p = -16) and everything is summed in float64, so identical
models give exactly 0. We also report the largest absolute logit difference, which catches a
constant logit shift that the softmax hides.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_CHUNK_VALUES = 1 << 23  # float64 values per working block (64 MiB), whatever the vocabulary size


@dataclass
class TokenMetrics:
    """Per-position values of one prompt (positions that have a next token)."""

    kld: np.ndarray  # float64
    top1_same: np.ndarray  # bool
    p_diff: np.ndarray  # float64: p_cand(next) - p_ref(next)
    nll_ref: np.ndarray  # float64
    nll_cand: np.ndarray  # float64
    max_abs_diff: np.ndarray  # float64: max_i |logit_ref(i) - logit_cand(i)|

    @staticmethod
    def concat(parts: list[TokenMetrics]) -> TokenMetrics:
        return TokenMetrics(
            *(
                np.concatenate([getattr(p, f) for p in parts]) if parts else np.zeros(0)
                for f in TokenMetrics.__dataclass_fields__
            )
        )

    def __len__(self) -> int:
        return len(self.kld)


def token_metrics(
    ref_logits: np.ndarray | torch.Tensor, cand_logits: np.ndarray | torch.Tensor, next_ids: np.ndarray | list[int]
) -> TokenMetrics:
    """Compare logits row by row: row j is the distribution after token j, `next_ids[j]` the
    token that follows it. Rows without a next token must be left out by the caller.

    When the vocabularies differ in size, each side's distribution is still normalised over
    its own full vocabulary and the KL sum runs over the ids both have (the reference's mass
    on ids the candidate lacks cannot be compared; the caller refuses prompts that use them).
    """
    ref = torch.as_tensor(np.asarray(ref_logits))
    cand = torch.as_tensor(np.asarray(cand_logits))
    nxt = torch.as_tensor(np.asarray(next_ids, dtype=np.int64))
    if ref.ndim != 2 or cand.ndim != 2 or ref.shape[0] != cand.shape[0] or ref.shape[0] != nxt.shape[0]:
        raise ValueError(
            f"logits {tuple(ref.shape)} and {tuple(cand.shape)} with {tuple(nxt.shape)} next ids do not line up"
        )
    vocab = min(ref.shape[1], cand.shape[1])
    step = max(1, _CHUNK_VALUES // max(ref.shape[1], cand.shape[1]))
    parts = []
    for s in range(0, ref.shape[0], step):
        parts.append(_block(ref[s : s + step], cand[s : s + step], nxt[s : s + step], vocab))
    return TokenMetrics.concat(parts)


def _block(ref: torch.Tensor, cand: torch.Tensor, nxt: torch.Tensor, vocab: int) -> TokenMetrics:
    r = ref.to(torch.float64)
    c = cand.to(torch.float64)
    lp_ref = torch.log_softmax(r, dim=-1)
    lp_cand = torch.log_softmax(c, dim=-1)
    p_ref = lp_ref[:, :vocab].exp()
    # 0 * (-inf) is nan: a zero-probability reference token contributes nothing, as in the definition.
    terms = torch.where(p_ref > 0, p_ref * (lp_ref[:, :vocab] - lp_cand[:, :vocab]), torch.zeros_like(p_ref))
    kld = terms.sum(dim=-1)
    idx = nxt.unsqueeze(1)
    nll_ref = -lp_ref.gather(1, idx).squeeze(1)
    nll_cand = -lp_cand.gather(1, idx).squeeze(1)
    p_diff = torch.exp(-nll_cand) - torch.exp(-nll_ref)
    top1 = r.argmax(dim=-1) == c.argmax(dim=-1)
    diff = (r[:, :vocab] - c[:, :vocab]).abs().amax(dim=-1)
    return TokenMetrics(kld.numpy(), top1.numpy(), p_diff.numpy(), nll_ref.numpy(), nll_cand.numpy(), diff.numpy())


def percentile(values: np.ndarray, fraction: float) -> float:
    """llama-perplexity's percentile: linear interpolation at index fraction * (n - 1)."""
    return float(np.percentile(values, 100.0 * fraction, method="linear"))


def summarize(m: TokenMetrics) -> dict[str, float | int | None]:
    """The aggregate numbers (JSON keys of `weightops verify --json`)."""
    n = len(m)
    if n == 0:
        keys = (
            "kld_mean",
            "kld_median",
            "kld_p99",
            "kld_max",
            "top1_agreement",
            "rms_dp",
            "ppl_reference",
            "ppl_candidate",
            "ppl_ratio",
            "max_abs_logit_diff",
        )
        return {"tokens": 0, **dict.fromkeys(keys)}
    mean_ref, mean_cand = float(m.nll_ref.mean()), float(m.nll_cand.mean())
    return {
        "tokens": n,
        "kld_mean": float(m.kld.mean()),
        "kld_median": float(np.median(m.kld)),
        "kld_p99": percentile(m.kld, 0.99),
        "kld_max": float(m.kld.max()),
        "top1_agreement": float(m.top1_same.mean()),
        "rms_dp": float(np.sqrt(np.mean(m.p_diff**2))),
        "ppl_reference": float(np.exp(mean_ref)),
        "ppl_candidate": float(np.exp(mean_cand)),
        "ppl_ratio": float(np.exp(mean_cand - mean_ref)),
        "max_abs_logit_diff": float(m.max_abs_diff.max()),
    }
