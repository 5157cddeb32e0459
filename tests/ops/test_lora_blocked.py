"""ops.lora's row-blocked merge (a Linear's product computed block of output rows by block)
against PEFT's `merge_and_unload` and the Chinese-LLaMA formula, which compute the whole
product at once: on real model widths with several blocks (and a short remainder of rows), the
same bits. This checks, on this machine's BLAS, the property the blocking rests on: the rows of
a block's product are the rows of the whole product."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from weightops import dtypes
from weightops.ops import lora
from weightops.ops.lora import LowRank, Step, merge_lora
from weightops.stream import TensorRef

peft = pytest.importorskip("peft")


class One(nn.Module):
    def __init__(self, inp: int, out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(inp, out, bias=False)


def _ref(name: str, t: torch.Tensor) -> TensorRef:
    t = t.detach().clone()
    return TensorRef(name, tuple(t.shape), dtypes.name_of(t.dtype), "test", loader=lambda: t)


def _adapter(model: nn.Module, seed: int, rank: int) -> tuple[nn.Module, Step]:
    """A rank-`rank` PEFT adapter on `lin` with random factors, and the op's step read off it."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["lin"]))
    layer = model.base_model.model.lin
    with torch.no_grad():
        layer.lora_A["default"].weight.normal_(0, 0.02)
        layer.lora_B["default"].weight.normal_(0, 0.02)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return model, Step(f"adapter {seed}", updates=(LowRank(_ref("a", a), _ref("b", b), layer.scaling["default"]),))


@pytest.fixture
def blocked(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the tensors the row-blocked merge computed (so a test knows it was not bypassed)."""
    calls: list[int] = []
    inner = lora._blocked

    def counting(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    monkeypatch.setattr(lora, "_blocked", counting)
    return calls


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("rank", "out", "inp"),
    [(8, 2048, 2048), (64, 5632, 2048), (128, 4096, 11008), (16, 11008, 4096), (64, 1025, 4096)],
)
def test_blocked_is_the_whole_product_bit_for_bit(
    blocked: list[int], rank: int, out: int, inp: int, dtype: torch.dtype
) -> None:
    """Both roundings on LLaMA widths: `peft` is merge_and_unload's weight, `once` the
    Chinese-LLaMA scripts' `W += (B.float() @ A.float()) * scaling` on the weight. A float32
    weight shows the product's last bits, which rounding to bfloat16 mostly hides (blocks of a
    few rows, such as a short last block of 1025 rows, differ there)."""
    assert out > lora._ROWS
    torch.manual_seed(0)
    base = One(inp, out).to(torch.bfloat16).to(dtype)
    w = base.lin.weight.detach().clone()
    model, step = _adapter(base, 1, rank)
    (u,) = step.updates
    assert isinstance(u, LowRank)
    formula = w.clone()
    formula += (u.b.load().float() @ u.a.load().float()) * u.scaling
    expected = model.merge_and_unload().lin.weight
    for rounding, want in (("peft", expected), ("once", formula)):
        (merged,) = merge_lora([_ref("lin.weight", w)], {"lin.weight": [step]}, rounding=rounding)
        got = merged.load()
        assert got.dtype == want.dtype
        assert torch.equal(got, want), f"{rounding}: rank {rank}, {out}x{inp}"
    assert len(blocked) == 2


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_small_blocks_two_adapters(monkeypatch: pytest.MonkeyPatch, blocked: list[int], dtype: torch.dtype) -> None:
    """Blocks of 8 rows on a 28-row Linear (the last block overlaps the one before), two
    adapters in order: PEFT merging one, then loading and merging the other; `once`: both
    products added to the float32 weight, rounded once."""
    monkeypatch.setattr(lora, "_ROWS", 8)
    torch.manual_seed(0)
    base = One(16, 28).to(dtype)
    w = base.lin.weight.detach().clone()
    m1, s1 = _adapter(base, 1, 4)
    m2, s2 = _adapter(m1.merge_and_unload(), 2, 3)
    expected = m2.merge_and_unload().lin.weight
    steps = {"lin.weight": [s1, s2]}
    (peft_merged,) = merge_lora([_ref("lin.weight", w)], steps, rounding="peft")
    assert torch.equal(peft_merged.load(), expected)
    deltas = [(u.b.load() @ u.a.load()) * u.scaling for s in (s1, s2) for u in s.updates if isinstance(u, LowRank)]
    once = (w.float() + deltas[0] + deltas[1]).to(w.dtype)
    (once_merged,) = merge_lora([_ref("lin.weight", w)], steps, rounding="once")
    assert torch.equal(once_merged.load(), once)
    assert len(blocked) == 2
