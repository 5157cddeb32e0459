"""ops.lora against PEFT itself: a small torch model with the layer kinds PEFT merges (Linear,
GPT-2's Conv1D with fan_in_fan_out, Embedding), adapters made by get_peft_model with random
factors, merged by `merge_and_unload` and by the stream operator from the same tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from weightops import dtypes
from weightops.arch.transforms import interleaved_rows, permute_interleaved_to_rotary
from weightops.ops.lora import LowRank, Shift, Step, merge_lora
from weightops.stream import TensorRef

peft = pytest.importorskip("peft")
Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.lin = nn.Linear(16, 24)
        self.conv = Conv1D(20, 24)  # weight [in, out]: fan_in_fan_out


def _model(seed: int) -> Tiny:
    torch.manual_seed(seed)
    return Tiny().to(torch.bfloat16)


def _peft_model(base: Tiny, seed: int, **config) -> nn.Module:
    model = peft.get_peft_model(base, peft.LoraConfig(**config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding" in name:
                p.normal_(0, 0.5)
            elif "magnitude" in name:
                p.mul_(1.25)
    return model


def _ref(name: str, t: torch.Tensor) -> TensorRef:
    t = t.detach().clone()
    return TensorRef(name, tuple(t.shape), dtypes.name_of(t.dtype), "test", loader=lambda: t)


def _steps(model: nn.Module, config: dict, label: str) -> dict[str, list[Step]]:
    """The op's steps read off PEFT's own layers (their factors, scaling and flags)."""
    steps: dict[str, list[Step]] = {}
    for path, module in model.base_model.model.named_modules():
        if not isinstance(module, peft.tuners.lora.LoraLayer):
            continue
        scaling = module.scaling["default"]
        if path == "emb":
            a, b = module.lora_embedding_A["default"], module.lora_embedding_B["default"]
            update = LowRank(_ref("a", a), _ref("b", b), scaling, transpose=True, embedding=True)
        else:
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            mag = module.lora_magnitude_vector["default"].weight if config.get("use_dora") else None
            update = LowRank(
                _ref("a", a),
                _ref("b", b),
                scaling,
                transpose=module.fan_in_fan_out,
                magnitude=_ref("m", mag) if mag is not None else None,
            )
        steps.setdefault(f"{path}.weight", []).append(Step(label, updates=(update,)))
        if config.get("lora_bias") and path != "emb":
            bias = module.lora_B["default"].bias
            steps.setdefault(f"{path}.bias", []).append(Step(label, updates=(Shift(_ref("bias", bias), scaling),)))
    return steps


def _merged(base: dict[str, torch.Tensor], steps, rounding: str) -> dict[str, torch.Tensor]:
    refs = [_ref(n, t) for n, t in base.items()]
    return {r.name: r.load() for r in merge_lora(refs, steps, rounding=rounding)}


CONFIGS = {
    "linear": dict(r=4, lora_alpha=8, target_modules=["lin"]),
    "rslora": dict(r=4, lora_alpha=8, target_modules=["lin", "conv"], use_rslora=True),
    "fan_in_fan_out": dict(r=3, lora_alpha=6, target_modules=["conv"], fan_in_fan_out=True),
    "embedding": dict(r=4, lora_alpha=8, target_modules=["emb"]),
    "dora": dict(r=4, lora_alpha=8, target_modules=["lin"], use_dora=True),
    "dora_fan_in_fan_out": dict(r=4, lora_alpha=8, target_modules=["conv"], use_dora=True, fan_in_fan_out=True),
    "lora_bias": dict(r=4, lora_alpha=16, target_modules=["lin", "conv"], lora_bias=True, fan_in_fan_out=True),
    "rank_pattern": dict(
        r=4, lora_alpha=8, target_modules=["lin", "conv"], rank_pattern={"conv": 2}, alpha_pattern={"lin": 3}
    ),
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("feature", CONFIGS)
def test_peft_rounding_is_merge_and_unload_bit_for_bit(feature: str) -> None:
    config = CONFIGS[feature]
    base = _model(0)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = _peft_model(base, 1, **config)
    steps = _steps(model, config, feature)
    expected = model.merge_and_unload().state_dict()
    got = _merged(original, steps, "peft")
    assert steps
    for name, t in expected.items():
        assert got[name].dtype == t.dtype
        assert torch.equal(got[name], t), f"{feature}: {name} differs from PEFT's merge_and_unload"


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("feature", ["linear", "fan_in_fan_out", "embedding", "rslora"])
def test_once_is_the_float32_formula_rounded_once(feature: str) -> None:
    """Chinese-LLaMA's rule: W += transpose(B.float() @ A.float()) * scaling, on a 16-bit W in place."""
    config = CONFIGS[feature]
    base = _model(0)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    steps = _steps(_peft_model(base, 1, **config), config, feature)
    got = _merged(original, steps, "once")
    for name, chain in steps.items():
        (u,) = chain[0].updates
        product = u.b.load().float() @ u.a.load().float()
        w = original[name].clone()
        w += (product.T if u.transpose else product) * u.scaling
        assert torch.equal(got[name], w), name
        exact = original[name].double() + ((product.T if u.transpose else product) * u.scaling).double()
        assert torch.equal(got[name], exact.float().to(torch.bfloat16)), name


@pytest.mark.filterwarnings("ignore")
def test_two_adapters_in_order_as_two_merges() -> None:
    """Adapter 2 applies to the result of adapter 1: PEFT merging the first, then loading and
    merging the second into that model (DoRA's norm sees the first merge)."""
    first, second = CONFIGS["linear"], CONFIGS["dora"]
    base = _model(0)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    m1 = _peft_model(base, 1, **first)
    steps = _steps(m1, first, "one")
    after_one = m1.merge_and_unload()
    m2 = _peft_model(after_one, 2, **second)
    for name, chain in _steps(m2, second, "two").items():
        steps.setdefault(name, []).extend(chain)
    expected = m2.merge_and_unload().state_dict()
    got = _merged(original, steps, "peft")
    assert all(torch.equal(got[n], t) for n, t in expected.items())


def test_rows_view_lands_on_permuted_rows() -> None:
    """A delta in interleaved (TencentPretrain) row order added through `rows` equals the delta
    permuted to rotate-half order and added to the whole tensor, bit for bit."""
    torch.manual_seed(3)
    heads, w = 4, torch.randn(32, 16).to(torch.bfloat16)
    a, b = torch.randn(2, 16), torch.randn(32, 2)
    view = LowRank(_ref("a", a), _ref("b", b), 2.0, rows=lambda t: interleaved_rows(t, heads))
    (got,) = (r.load() for r in merge_lora([_ref("w", w)], {"w": [Step("tp", updates=(view,))]}))
    delta = permute_interleaved_to_rotary((b @ a) * 2.0, heads)
    assert torch.equal(got, (w.float() + delta).to(torch.bfloat16))


def test_replacement_then_update_and_dtype() -> None:
    """A whole tensor (modules_to_save, more rows) replaces the base's before the adapter's
    product is added; --dtype casts the result, and tensors without steps pass through."""
    torch.manual_seed(4)
    w, bigger, other = torch.randn(6, 4), torch.randn(9, 4), torch.randn(3)
    a, b = torch.randn(2, 9), torch.randn(4, 2)  # an embedding LoRA on the 9-row table
    step = Step("x", replace=_ref("emb", bigger), updates=(LowRank(_ref("a", a), _ref("b", b), 0.5, True, True),))
    out = {r.name: r for r in merge_lora([_ref("emb", w), _ref("n", other)], {"emb": [step]}, dtype=torch.float16)}
    assert out["emb"].shape == (9, 4) and out["emb"].dtype == torch.float16
    assert torch.equal(out["emb"].load(), (bigger + (b @ a).T * 0.5).to(torch.float16))
    assert torch.equal(out["n"].load(), other.to(torch.float16))


def test_non_finite_result_is_refused() -> None:
    w = torch.full((2, 2), 60000.0, dtype=torch.float16)
    step = Step("big", updates=(LowRank(_ref("a", torch.ones(1, 2)), _ref("b", torch.ones(2, 1)), 1e4),))
    (ref,) = merge_lora([_ref("w", w)], {"w": [step]})
    with pytest.raises(Exception, match="NaN or infinite"):
        ref.load()
