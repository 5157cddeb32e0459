"""The importance matrix of a model over token chunks, collected layer by layer.

For every linear llama-imatrix hooks (each decoder layer's matrices; the output matrix when
asked), the input rows are squared and summed per column in float32, and the rows counted
(`collect_imatrix` in tools/imatrix/imatrix.cpp). All chunks go through layer 0, then all
through layer 1, and so on; between layers their hidden states wait in a `HiddenStates`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import progress
from ..errors import WeightopsError, shown
from .layers import Call, LayeredModel
from .store import HiddenStates

TOKENS_PER_BATCH = 2048  # tokens a forward computes at once (llama-imatrix's default batch)


@dataclass
class Sums:
    """Per-column sums of squared inputs (float32, on the compute device) and rows seen."""

    sums: torch.Tensor
    rows: int = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sums += (x * x).sum(0)
        self.rows += x.shape[0]


def collect(
    model: LayeredModel,
    chunks: torch.Tensor,
    *,
    budget: int,
    spill_dir: Path | None = None,
    process_output: bool = False,
    on_spill: Callable[[int], None] | None = None,
) -> dict[str, Sums]:
    """GGUF tensor name -> sums over all `chunks` (int64 [n, ctx])."""
    n, ctx = chunks.shape
    per = max(1, TOKENS_PER_BATCH // ctx)
    batches = [(s, min(s + per, n)) for s in range(0, n, per)]
    emb = model.embedding()
    calls: dict[int, list[Call]] = {}
    found: dict[str, Sums] = {}
    with (
        torch.inference_mode(),
        HiddenStates(n, ctx, emb.shape[1], budget, spill_dir) as states,
        progress.bar((model.layers + 1) * n, "imatrix: embedding", unit="chunk") as bar,
    ):
        if states.spilled and on_spill:
            on_spill(n * ctx * emb.shape[1] * 4)
        table = emb.load()
        if int(chunks.max()) >= table.shape[0]:
            raise WeightopsError(
                f"{shown(emb.source)}: the tokenizer gives token id {int(chunks.max())} but the embedding "
                f"{emb.name!r} has {table.shape[0]} rows: the tokenizer does not belong to this model"
            )
        for s, e in batches:
            hidden, calls[e - s] = model.embed(table[chunks[s:e]].to(device=model.device, dtype=torch.float32))
            states.put(s, hidden)
            bar.update(e - s)
        del table
        emb.release()
        for i in range(model.layers):
            bar.set_description(f"imatrix: layer {i + 1}/{model.layers}")
            layer = model.layer(i)
            sums = _hook(model.linears(i, layer), model.device)
            for s, e in batches:
                args, kwargs = calls[e - s][i]
                out = layer(states.get(s, e).to(model.device), *args, **kwargs)
                states.put(s, out[0] if isinstance(out, tuple) else out)
                bar.update(e - s)
            for handle in sums.values():
                handle[1].remove()
            del layer  # before the next one loads: one layer in memory
            model.free(i)
            found.update(_checked({k: v for k, (v, _) in sums.items()}, f"layer {i}"))
        output = model.output_name() if process_output else None
        if output is not None:
            norm = model.final_norm()
            out = Sums(torch.zeros(emb.shape[1], device=model.device))
            for s, e in batches:
                out.add(norm(states.get(s, e).to(model.device)))
            found.update(_checked({output: out}, "the output norm"))
    return found


def _hook(
    linears: dict[str, nn.Linear], device: torch.device
) -> dict[str, tuple[Sums, torch.utils.hooks.RemovableHandle]]:
    out = {}
    for name, linear in linears.items():
        acc = Sums(torch.zeros(linear.in_features, device=device))
        out[name] = (acc, linear.register_forward_pre_hook(lambda m, args, acc=acc: acc.add(args[0])))
    return out


def _checked(sums: dict[str, Sums], where: str) -> dict[str, Sums]:
    for name, acc in sums.items():
        if not bool(torch.isfinite(acc.sums).all()):
            raise WeightopsError(
                f"non-finite activations reach {name!r} (after {where}): the model overflows on this text "
                "in float32, or its weights hold NaN/inf; nothing was written"
            )
    return sums


def entries_of(found: dict[str, Sums]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (sums float32 [1, ne0], counts float32 [1]), as the imatrix files hold them."""
    return {
        name: (acc.sums.float().cpu().numpy().reshape(1, -1), np.array([acc.rows], dtype=np.float32))
        for name, acc in found.items()
    }
