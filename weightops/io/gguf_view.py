"""A GGUF checkpoint read as a Hugging Face model: HF-named lazy refs with HF's values (the
architecture's transforms undone: q/k rows back to rotate-half order, a fused QKV back to
per-head order) and the HF config transformers derives from the file's metadata. For commands
that run the model's layers in transformers (imatrix); tensors dequantize to float32 on load."""

from __future__ import annotations

from functools import partial

from .. import arch
from ..arch.transforms import from_gguf
from ..errors import WeightopsError, describe
from ..stream import TensorRef
from .checkpoint import Checkpoint, Format


def gguf_hf_view(ckpt: Checkpoint) -> tuple[list[TensorRef], dict]:
    """(HF-named refs, HF config dict) of a GGUF checkpoint of a registered architecture."""
    if ckpt.format is not Format.GGUF:
        raise WeightopsError(f"{ckpt.path}: is {ckpt.format}, not a GGUF file")
    config = _config(ckpt)
    spec = arch.get(config["model_type"])
    hp = spec.config.hparams(config)
    refs, unknown = [], []
    for ref in ckpt.tensors:
        hit = spec.lookup(ref.name, "gguf")
        if hit is None:
            unknown.append(ref.name)
            continue
        row, layer, _ = hit
        name = row.hf.format(n=layer)
        if row.to_gguf is arch.Transform.NONE:
            refs.append(ref.renamed(name))
        else:
            refs.append(ref.derive(partial(from_gguf, row.to_gguf, hp=hp), name=name))
    if unknown:
        raise WeightopsError(f"{ckpt.path}: tensors with no {spec.name} name: {', '.join(sorted(unknown)[:8])}")
    return refs, config


def _config(ckpt: Checkpoint) -> dict:
    """transformers' reading of the GGUF metadata (what its GGUF loader builds the model from)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(ckpt.path.parent), gguf_file=ckpt.path.name)
    except Exception as e:  # transformers raises many types for files it cannot map
        raise WeightopsError(
            f"{ckpt.path}: transformers cannot read its metadata as a model config ({describe(e)})"
        ) from None
    return config.to_dict()
