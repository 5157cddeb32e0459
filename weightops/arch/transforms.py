"""The value transforms between HF and the other layouts (see `spec.Transform`)."""

from __future__ import annotations

import torch

from .spec import Hparams, Transform


def permute_rotary_to_interleaved(w, heads: int):
    """HF rotate-half row order -> interleaved pairs (TencentPretrain, Meta, GGUF)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_interleaved_to_rotary(w, heads: int):
    """Inverse of `permute_rotary_to_interleaved`."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def split_qkv(w, heads: int):
    """HF fused [head][q|k|v][head_dim] -> (q, k, v), each [hidden, ...] (weights or biases)."""
    hd = w.shape[0] // heads // 3
    per = w.reshape(heads, 3, hd, *w.shape[1:])
    return tuple(per[:, i].reshape(heads * hd, *w.shape[1:]) for i in range(3))


def fuse_qkv(q, k, v, heads: int):
    """Inverse of `split_qkv`."""
    hd = q.shape[0] // heads
    parts = [t.reshape(heads, hd, *t.shape[1:]) for t in (q, k, v)]
    return torch.stack(parts, dim=1).reshape(3 * heads * hd, *q.shape[1:])


def rotary_heads(transform: Transform, hp: Hparams) -> int:
    """Heads a q (or k: key/value heads) permutation works per."""
    return hp.heads if transform is Transform.ROTARY_Q else hp.kv_heads


def to_gguf(transform: Transform, t: torch.Tensor, hp: Hparams) -> torch.Tensor:
    """HF values -> llama.cpp's: q/k rows interleaved; a fused QKV as [all q; all k; all v]."""
    if transform in (Transform.ROTARY_Q, Transform.ROTARY_K):
        return permute_rotary_to_interleaved(t, rotary_heads(transform, hp))
    if transform is Transform.QKV_SPLIT:
        return torch.cat(split_qkv(t, hp.heads))
    return t


def from_gguf(transform: Transform, t: torch.Tensor, hp: Hparams) -> torch.Tensor:
    """Inverse of `to_gguf`: llama.cpp's values -> HF's."""
    if transform in (Transform.ROTARY_Q, Transform.ROTARY_K):
        return permute_interleaved_to_rotary(t, rotary_heads(transform, hp))
    if transform is Transform.QKV_SPLIT:
        q, k, v = torch.chunk(t, 3)
        return fuse_qkv(q, k, v, hp.heads)
    return t


def interleaved_rows(w, heads: int):
    """A view of HF-ordered rows `w` in interleaved order (4-D: heads, pairs, 2, columns): a
    tensor of TencentPretrain rows reshaped to it lands on the right HF rows, in place."""
    rows = w.shape[0]
    return w.view(heads, 2, rows // heads // 2, -1).transpose(1, 2)


def qkv_rows(w, heads: int, index: int):
    """A view of the q (0), k (1) or v (2) rows of a fused per-head [q|k|v] tensor (3-D: heads,
    head rows, columns), in the order the split tensor has them."""
    return w.view(heads, 3, w.shape[0] // heads // 3, -1)[:, index]
