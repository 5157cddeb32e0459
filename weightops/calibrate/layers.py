"""A transformers model run one decoder layer at a time, with only that layer's weights loaded.

The model is built by transformers on the meta device (its modules, no memory), so every piece
of its computation is transformers' own: the decoder-layer class of the architecture, and the
attention mask, rotary embedding or BLOOM alibi its forward passes to the layers. Those
arguments are captured by running the model's forward with each layer replaced by a stub that
records what it is given (the embedding is looked up here and passed as `inputs_embeds`).
A layer is made real by loading its tensors from the checkpoint's lazy references and freed
after use, so memory holds one layer, whatever the layer count."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..arch import ArchSpec, Role
from ..errors import WeightopsError, shown
from ..stream import TensorRef

Call = tuple[tuple, dict[str, Any]]  # positional (after the hidden states) and keyword arguments


class _Stop(Exception):
    """Raised by the last stub: nothing after the layers is computed."""


class _Stub(nn.Module):
    """Stands in for decoder layer `index`: records its inputs, computes nothing."""

    def __init__(self, index: int, last: bool, seen: dict[int, tuple[torch.Tensor, Call]]):
        super().__init__()
        self.index, self.last, self.seen = index, last, seen

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> tuple:
        self.seen[self.index] = (hidden, (args, kwargs))
        if self.last:
            raise _Stop
        return (hidden,)  # LLaMA-style loops pass it on, BLOOM's takes [0]; stubs ignore it


class LayeredModel:
    """`embed(ids)` -> (states entering layer 0, per-layer calls); `layer(i)` -> layer i, loaded."""

    def __init__(self, spec: ArchSpec, config: dict, refs: list[TensorRef], device: torch.device):
        from transformers import AutoConfig, AutoModel

        self.spec, self.device = spec, device
        fields = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
        cfg = AutoConfig.for_model(config["model_type"], **fields)
        with torch.device("meta"):
            self.base = AutoModel.from_config(cfg)
        self.hp = spec.config.hparams(config)
        self.refs = {spec.normalize_hf(r.name): r for r in refs}
        self.prefix = f"{self.base.base_model_prefix}."
        self.list_name, self._layers = self._layer_list()
        self._embedding = self._relative(spec.name_of(Role.EMBEDDING, "hf"))
        self._seen: dict[int, tuple[torch.Tensor, Call]] = {}
        stubs = nn.ModuleList([_Stub(i, i == len(self._layers) - 1, self._seen) for i in range(len(self._layers))])
        self.base.set_submodule(self.list_name, stubs)
        self._materialize_rest(cfg)

    @property
    def layers(self) -> int:
        return len(self._layers)

    def _layer_list(self) -> tuple[str, list[nn.Module | None]]:
        for name, module in self.base.named_children():
            if isinstance(module, nn.ModuleList) and len(module) == self.hp.layers:
                return name, list(module)
        raise WeightopsError(f"{type(self.base).__name__} has no list of {self.hp.layers} layers")

    def _relative(self, hf_name: str) -> str:
        return hf_name.removeprefix(self.prefix)

    def _materialize_rest(self, cfg: Any) -> None:
        """Load the tensors outside the layers (embedding norms, final norm) and rebuild the
        modules whose buffers transformers computes at construction (the rotary embedding)."""
        state = {}
        for name, p in self.base.named_parameters():
            if name.startswith(self.list_name + ".") or name == self._embedding:
                continue
            state[name] = self._load(self.prefix + name, p.shape)
        self.base.load_state_dict(state, strict=False, assign=True)
        for name, module in list(self.base.named_children()):
            if name != self.list_name and any(b.is_meta for b in module.buffers()):
                self.base.set_submodule(name, type(module)(config=cfg).to(self.device))

    def _load(self, hf_name: str, shape: torch.Size) -> torch.Tensor:
        ref = self.refs.get(hf_name)
        if ref is None:
            raise WeightopsError(f"the checkpoint has no tensor {hf_name!r}, which {type(self.base).__name__} needs")
        if tuple(ref.shape) != tuple(shape):
            raise WeightopsError(
                f"{shown(ref.source)}: tensor {ref.name!r} has shape {tuple(ref.shape)}, "
                f"the model expects {tuple(shape)}"
            )
        t = ref.load().to(device=self.device, dtype=torch.float32)
        ref.release()
        return t

    def embedding(self) -> TensorRef:
        name = self.prefix + self._embedding
        if name not in self.refs:
            raise WeightopsError(f"the checkpoint has no embedding {name!r}")
        return self.refs[name]

    def embed(self, vectors: torch.Tensor) -> tuple[torch.Tensor, list[Call]]:
        """States entering layer 0 for embedding `vectors` [batch, ctx, hidden], and the
        arguments transformers gives each layer for such a batch."""
        self._seen.clear()
        try:
            self.base(inputs_embeds=vectors, use_cache=False)
        except _Stop:
            pass
        calls = [self._seen[i][1] for i in range(self.layers)]
        return self._seen[0][0], calls

    def layer(self, i: int) -> nn.Module:
        """Decoder layer `i` with its weights loaded (float32, on the device)."""
        module = self._layers[i]
        if module is None:
            raise AssertionError(f"layer {i} was already used")
        expected = module.state_dict()
        prefix = f"{self.prefix}{self.list_name}.{i}."
        extra = sorted(n for n in self.refs if n.startswith(prefix) and n.removeprefix(prefix) not in expected)
        if extra:
            raise WeightopsError(
                f"{shown(self.refs[extra[0]].source)}: tensors {type(module).__name__} has no place for: "
                + ", ".join(extra)
            )
        state = {n: self._load(prefix + n, t.shape) for n, t in expected.items()}
        module.load_state_dict(state, strict=True, assign=True)
        if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
            raise WeightopsError(f"{type(module).__name__} {i}: some of its state is not in the checkpoint")
        return module.eval()

    def free(self, i: int) -> None:
        self._layers[i] = None

    def final_norm(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The norm applied to the last layer's output before the output matrix."""
        name = self.spec.name_of(Role.OUTPUT_NORM, "hf")
        return self.base.get_submodule(self._relative(name).removesuffix(".weight"))

    def output_name(self) -> str | None:
        """GGUF name of the output matrix, when the checkpoint has one of its own (a tied one is
        the embedding, which llama-imatrix does not collect)."""
        t = self.spec.tensor(Role.OUTPUT)
        return t.gguf if t is not None and t.gguf and self.spec.normalize_hf(t.hf) in self.refs else None

    def linears(self, i: int, module: nn.Module) -> dict[str, nn.Linear]:
        """GGUF tensor name -> the linear of layer `i` whose weight it is (the matrices
        llama-imatrix hooks; q, k and v are separate linears of the same input)."""
        out = {}
        for name, m in module.named_modules():
            if not isinstance(m, nn.Linear):
                continue
            hf = f"{self.prefix}{self.list_name}.{i}.{name}.weight"
            hit = self.spec.lookup(hf, "hf")
            if hit is None or hit[0].gguf is None:
                raise WeightopsError(
                    f"{type(module).__name__} {i}: the {self.spec.name} table has no GGUF name for {hf!r}"
                )
            out[hit[0].gguf.format(n=i)] = m
        return out
