"""Checks shared by every architecture: a config against its tensors, and the sizes read
from a TencentPretrain checkpoint against its model config."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..errors import WeightopsError
from .spec import ArchSpec

if TYPE_CHECKING:
    from ..stream import TensorRef

_LISTED = 12  # problems listed before "... and N more"


def check_config_shapes(spec: ArchSpec, config: dict, refs: Iterable[TensorRef], config_file: str) -> None:
    """Refuse a config that contradicts the tensors it describes (HF names and a config dict
    with the architecture's defaults filled in): head counts x head size vs q/k/v rows,
    hidden and intermediate sizes vs every matrix, the layer count vs the layers present.
    Every command that takes sizes from the config (gguf, convert, bnb) calls this before
    writing: llama.cpp or transformers would otherwise fail to load — or silently misread —
    the output."""
    refs = list(refs)
    try:
        layers, shapes, problems = spec.config.hf_shapes(config)
    except KeyError as e:
        raise WeightopsError(
            f"{config_file}: has no {e.args[0]}, which the tensor shapes are checked against"
        ) from None
    present = spec.layer_count((r.name for r in refs), "hf")
    if present != layers:
        problems.append(
            f"{config_file} gives {layers} layers, but the tensors have {present} (layer indices 0..{present - 1})"
        )
    for ref in refs:
        hit = spec.lookup(ref.name, "hf")
        if hit is None or hit[0].hf not in shapes:
            continue  # unknown tensors are each command's own business (some pass them through)
        want, why = shapes[hit[0].hf]
        if len(want) != len(ref.shape) or any(w is not None and w != s for w, s in zip(want, ref.shape, strict=True)):
            shown = "(" + ", ".join("any" if w is None else str(w) for w in want) + ")"
            problems.append(
                f"tensor {ref.name!r} ({ref.source}) has shape {ref.shape}; {config_file} gives {shown} from {why}"
            )
    if problems:
        more = len(problems) - _LISTED
        raise WeightopsError(
            f"{config_file} contradicts the tensors:\n  "
            + "\n  ".join(problems[:_LISTED])
            + (f"\n  ... and {more} more" if more > 0 else "")
        )


def tp_shape(shapes: dict[str, tuple[int, ...]], name: str) -> tuple[int, ...]:
    """The shape of a tensor that sizes are read from (a clear error when it is missing)."""
    if name not in shapes:
        raise WeightopsError(f"tensor {name!r} is missing: the model's sizes cannot be read without it")
    return shapes[name]


def tp_size(tp: dict, key: str, found: int, tensor: str) -> int:
    """A size read from `tensor`'s shape, checked against TencentPretrain model config `tp`."""
    if key in tp and tp[key] != found:
        raise WeightopsError(
            f"the TencentPretrain config says {key}={tp[key]}, but tensor {tensor!r} "
            f"gives {found}: wrong --tp-config for this checkpoint?"
        )
    return found


def tp_heads(tp: dict) -> int:
    """The attention head count, which no tensor shape tells."""
    if "heads_num" not in tp:
        raise WeightopsError(
            "the number of attention heads cannot be read from tensor shapes: pass --tp-config "
            "FILE, the TencentPretrain model config json (heads_num, and local_kv_heads_num for "
            "grouped-query attention), e.g. models/llama/7b_config.json"
        )
    return int(tp["heads_num"])
