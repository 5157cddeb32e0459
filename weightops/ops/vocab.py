"""Vocabulary expansion and remapping as one streaming step.

`resize_vocab` is the stream operator: it rewrites the input embedding and an untied
lm_head to a new row count (rows of known tokens carried bit for bit, new rows
initialised) and passes every other tensor through untouched. `expand_vocab` is the whole
job: edit the tokenizer, plan the rows from token strings, stream, write atomically with
config.json `vocab_size` equal to the new row count, so the vocabulary triple agrees.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from ..errors import WeightopsError
from ..stream import Stream, TensorRef
from .tokens import decompose, token_map

INIT_RULES = ("subtoken-mean", "mean", "normal", "zeros")
NORMAL_EPSILON = 1e-9  # covariance scale of the `normal` rule, as transformers' mean_resizing
_CHUNK = 4096  # rows of the old matrix per step of a reduction (bounds float copies)
_BATCH = 1024  # new rows made per step (bounds the gathered piece rows of subtoken-mean)


@dataclass(frozen=True)
class RowPlan:
    """Where each row of the resized matrix comes from.

    `carried`: new row -> old row, copied bit for bit. Rows of new tokens are initialised by
    the chosen rule; `pieces` gives, for subtoken-mean, the old rows of each new token's
    pieces (empty: falls back to the mean). `padding` rows have no token and get the mean.
    """

    old_rows: int
    rows: int
    carried: dict[int, int]
    pieces: dict[int, list[int]]
    padding: tuple[int, ...]

    @property
    def new_tokens(self) -> list[int]:
        skip = set(self.carried) | set(self.padding)
        return [i for i in range(self.rows) if i not in skip]


def plan_rows(
    old_tok,
    new_tok,
    old_rows: int,
    new_size: int,
    *,
    pad_to_multiple: int | None = None,
    allow_shrink: bool = False,
    reinit_rows: bool = False,
    subtokens: bool = True,
    what: str = "the embedding",
) -> RowPlan:
    """Plan a matrix of `new_size` rows (rounded up to `pad_to_multiple`) for `new_tok`, carrying
    the old row of every token string `old_tok` also has. Shrinking needs `allow_shrink`; losing
    the trained row of a token the old tokenizer has (it is not in the new one, so its row would
    be re-initialised or given to another token) needs `reinit_rows`."""
    rows = -(-new_size // pad_to_multiple) * pad_to_multiple if pad_to_multiple else new_size
    if rows < old_rows and not allow_shrink:
        raise WeightopsError(
            f"the new tokenizer has {new_size} tokens but {what} has {old_rows} rows: resizing to {rows} would "
            f"drop rows {rows}..{old_rows - 1} (BLOOM pads its embedding beyond the tokenizer); pass "
            f"--pad-to-multiple N to keep the row count, or --allow-shrink to drop them"
        )
    carried = {new: old for new, old in token_map(old_tok, new_tok).items() if new < rows and old < old_rows}
    if not reinit_rows:
        _refuse_lost_rows(old_tok, set(carried.values()), old_rows, rows, what)
    id_to_token = {i: t for t, i in new_tok.get_vocab().items() if i < rows}
    new_ids = [i for i in sorted(id_to_token) if i not in carried]
    pieces: dict[int, list[int]] = {}
    if subtokens and new_ids:
        found = decompose(old_tok, new_tok, [id_to_token[i] for i in new_ids])
        pieces = {i: [p for p in found[id_to_token[i]] if p < old_rows] for i in new_ids}
    padding = tuple(i for i in range(rows) if i not in id_to_token)
    return RowPlan(old_rows, rows, carried, pieces, padding)


def _refuse_lost_rows(old_tok, carried: set[int], old_rows: int, rows: int, what: str) -> None:
    """Refuse a plan that re-initialises trained rows: the rows of old tokens the new tokenizer
    lacks, beyond those a shrink drops (shrinking has its own consent), would be taken by
    initialised rows. Padding rows (no old token) were never trained."""
    lost = sorted((i, t) for t, i in old_tok.get_vocab().items() if i < old_rows and i not in carried)
    dropped = max(0, old_rows - rows)
    if len(lost) > dropped:
        shown = ", ".join(f"{t!r} ({i})" for i, t in lost[:6]) + (", ..." if len(lost) > 6 else "")
        raise WeightopsError(
            f"{len(lost)} trained row(s) of {what} belong to tokens the new tokenizer lacks: {shown}; "
            + (f"{dropped} go with the shrink, the other {len(lost) - dropped} " if dropped else "their rows ")
            + "would be re-initialised. Pass --reinit-rows to allow it, or use a tokenizer that keeps these tokens"
        )


def row_mean(old: torch.Tensor) -> torch.Tensor:
    """Mean of all rows in float64, reduced in chunks (no full float copy of the matrix)."""
    total = torch.zeros(old.shape[1:], dtype=torch.float64)
    for start in range(0, old.shape[0], _CHUNK):
        total += old[start : start + _CHUNK].to(torch.float64).sum(0)
    return total / old.shape[0]


def row_covariance(old: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """(E - mu)^T (E - mu) / V in float32 (as transformers computes it), reduced in chunks."""
    cov = torch.zeros((old.shape[1], old.shape[1]), dtype=torch.float32)
    mean = mean.to(torch.float32)
    for start in range(0, old.shape[0], _CHUNK):
        centred = old[start : start + _CHUNK].to(torch.float32) - mean
        cov.addmm_(centred.T, centred)
    return cov / old.shape[0]


def normal_sampler(old: torch.Tensor, mean: torch.Tensor, seed: int) -> Callable[[int], torch.Tensor]:
    """Draws of rows from N(mu, 1e-9 * Sigma) (transformers' mean_resizing), or mu when that
    covariance is not positive definite, from one generator seeded with `seed`.

    Each call is one (count x d) @ (d x d) product, not torch.distributions' per-sample
    matrix-vector products: the same distribution, far faster when thousands of rows are new
    (benchmarks/README.md).
    """
    scale_tril, info = torch.linalg.cholesky_ex(NORMAL_EPSILON * row_covariance(old, mean).to(torch.float64))
    mean32 = mean.to(torch.float32)
    if info.item() != 0:
        return lambda count: mean32.expand(count, -1)
    scale_t = scale_tril.T.to(torch.float32)
    generator = torch.Generator().manual_seed(seed)
    return lambda count: mean32 + torch.randn((count, old.shape[1]), generator=generator) @ scale_t


def subtoken_rows(old: torch.Tensor, pieces: list[list[int]], mean: torch.Tensor) -> torch.Tensor:
    """Mean of the old rows of each token's pieces (float64 sums); the overall mean where
    there are none."""
    out = mean.expand(len(pieces), -1).clone()
    segment = torch.tensor([k for k, ids in enumerate(pieces) for _ in ids], dtype=torch.long)
    if len(segment):
        flat = torch.tensor([p for ids in pieces for p in ids], dtype=torch.long)
        sums = torch.zeros((len(pieces), old.shape[1]), dtype=torch.float64)
        sums.index_add_(0, segment, old[flat].to(torch.float64))
        counts = torch.bincount(segment, minlength=len(pieces))
        has = counts > 0
        out[has] = sums[has] / counts[has, None]
    return out


def resize_matrix(old: torch.Tensor, plan: RowPlan, init: str, seed: int) -> torch.Tensor:
    """The resized matrix: carried rows bit-identical, new-token rows by `init`, padding rows
    the mean. New rows are made `_BATCH` at a time in float32/float64 and rounded once to
    the matrix dtype, so temporaries stay small whatever the number of new tokens."""
    if old.dim() != 2 or old.shape[0] != plan.old_rows:
        raise WeightopsError(f"expected a matrix of {plan.old_rows} rows, got shape {tuple(old.shape)}")
    out = torch.empty((plan.rows, old.shape[1]), dtype=old.dtype)
    if plan.carried:
        out[torch.tensor(list(plan.carried))] = old[torch.tensor(list(plan.carried.values()))]
    new = plan.new_tokens
    # the old rows' mean: padding rows and new rows by every init but zeros start from it
    mean = row_mean(old) if (plan.padding or (new and init != "zeros")) else None
    if init == "normal" and new:
        assert mean is not None
        draw = normal_sampler(old, mean, seed)
    for start in range(0, len(new), _BATCH):
        ids = new[start : start + _BATCH]
        if init == "zeros":
            values = torch.zeros((len(ids), old.shape[1]))
        elif mean is None:  # unreachable: see above
            raise AssertionError(init)
        elif init == "mean":
            values = mean.expand(len(ids), -1)
        elif init == "normal":
            values = draw(len(ids))
        else:
            values = subtoken_rows(old, [plan.pieces.get(i, []) for i in ids], mean)
        out[torch.tensor(ids)] = values.to(old.dtype)
    if plan.padding:
        assert mean is not None
        out[torch.tensor(plan.padding)] = mean.to(old.dtype)
    return out


def resize_vocab(
    stream: Stream, names: Iterable[str], plan: RowPlan, init: str = "subtoken-mean", seed: int = 0
) -> Iterator[TensorRef]:
    """Stream operator: the tensors named in `names` (embedding, untied lm_head) are resized by
    `plan`; every other reference is yielded as it came (same object, bytes untouched).
    Each resized tensor draws `normal` rows from its own generator seeded with `seed`."""
    if init not in INIT_RULES:
        raise WeightopsError(f"unknown init rule {init!r}; choose one of {', '.join(INIT_RULES)}")
    names = set(names)
    for ref in stream:
        if ref.name not in names:
            yield ref
            continue
        if len(ref.shape) != 2 or ref.shape[0] != plan.old_rows:
            raise WeightopsError(
                f"{ref.source}: tensor {ref.name!r} has shape {ref.shape}; "
                f"expected {plan.old_rows} rows like the input embedding"
            )
        yield ref.derive(lambda t: resize_matrix(t, plan, init, seed), shape=(plan.rows, ref.shape[1]))
