"""expand-vocab: SentencePiece merge, added (special) tokens, remapping, init rules,
streaming pass-through, and the model still computing the same logits for old tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2 as pb
from transformers import AutoModelForCausalLM, AutoTokenizer

from weightops import tiny
from weightops.errors import WeightopsError
from weightops.io.checkpoint import open_checkpoint
from weightops.io.tokenizer_edit import merge_spm
from weightops.ops.vocab import RowPlan, resize_matrix, resize_vocab
from weightops.pipelines.expand_vocab import expand_vocab, vocab_tensor_names
from weightops.stream import TensorRef

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _proto(path: Path) -> pb.ModelProto:
    m = pb.ModelProto()
    m.ParseFromString(Path(path).read_bytes())
    return m


def _reference_merge(base: Path, other: Path) -> list[str]:
    """Chinese-LLaMA's merge_tokenizers.py loop, re-typed from its description: every piece
    of the other model the base lacks, in order, appended with score 0."""
    llama, chinese = _proto(base), _proto(other)
    have = set(p.piece for p in llama.pieces)
    for p in chinese.pieces:
        if p.piece not in have:
            new = pb.ModelProto().SentencePiece()
            new.piece = p.piece
            new.score = 0
            llama.pieces.append(new)
    return [p.piece for p in llama.pieces]


# --- SentencePiece merge ---------------------------------------------------------------


def test_merge_keeps_base_ids_and_appends_in_order(spm_tokenizer, other_spm):
    base_path = spm_tokenizer / "tokenizer.model"
    merged_bytes, added = merge_spm(base_path.read_bytes(), other_spm.read_bytes())
    base, other, merged = _proto(base_path), _proto(other_spm), pb.ModelProto()
    merged.ParseFromString(merged_bytes)
    n = len(base.pieces)
    assert len(added) > 50 and len(merged.pieces) == n + len(added)
    for old, new in zip(base.pieces, merged.pieces[:n], strict=True):  # old ids unchanged, bit for bit
        assert old.SerializeToString() == new.SerializeToString()
    base_pieces = {p.piece for p in base.pieces}
    assert added == [p.piece for p in other.pieces if p.piece not in base_pieces]  # in the other model's order
    assert all(p.score == 0 and p.type == pb.ModelProto.SentencePiece.NORMAL for p in merged.pieces[n:])
    assert merged.trainer_spec.SerializeToString() == base.trainer_spec.SerializeToString()
    assert [p.piece for p in merged.pieces] == _reference_merge(base_path, other_spm)


def test_merged_model_round_trips_and_uses_new_pieces(merged_llama, spm_tokenizer, other_lines):
    merged = spm.SentencePieceProcessor(model_file=str(merged_llama / "tokenizer.model"))
    base = spm.SentencePieceProcessor(model_file=str(spm_tokenizer / "tokenizer.model"))
    texts = other_lines(40, seed=11) + tiny.corpus(20, seed=12) + ["mixed 春天 and 我们 ☃ 😀 text"]
    for text in texts:
        assert merged.decode(merged.encode(text)) == text
    chinese = [t for t in other_lines(40, seed=11) if t.endswith("。")]
    assert sum(len(merged.encode(t)) for t in chinese) < 0.8 * sum(len(base.encode(t)) for t in chinese)


def test_merged_hf_tokenizer_matches_sentencepiece(merged_llama, other_lines):
    sp = spm.SentencePieceProcessor(model_file=str(merged_llama / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(merged_llama)
    vocab = tok.get_vocab()
    assert all(vocab[sp.id_to_piece(i)] == i for i in range(sp.get_piece_size()))
    texts = other_lines(50, seed=13) + tiny.corpus(25, seed=14)
    same = sum(tok(t, add_special_tokens=False)["input_ids"] == sp.encode(t) for t in texts)
    # Equal scores (the appended pieces all score 0) may break ties differently; the rest agrees.
    assert same >= 0.95 * len(texts)
    for text in texts:
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_merged_hf_tokenizer_adds_bos_as_the_base_does(merged_llama, tiny_llama):
    """The regenerated tokenizer.json keeps the base's BOS/EOS rule (a conversion from
    tokenizer.model alone would drop BOS, and the model would run without its <s>)."""
    base, merged = AutoTokenizer.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(merged_llama)
    for text in ("hello world", "the cat"):
        ours, theirs = merged(text)["input_ids"], base(text)["input_ids"]
        assert ours[0] == theirs[0] == base.bos_token_id and ours[-1] != base.eos_token_id


def test_merge_refused_when_tokens_follow_the_sentencepiece_pieces(merged_llama, other_spm, tmp_path):
    with pytest.raises(WeightopsError, match="would move their ids") as e:
        expand_vocab(merged_llama, tmp_path / "out", merge_spm=other_spm)
    assert str(merged_llama) in str(e.value)


def test_merge_needs_a_sentencepiece_model(tiny_bloom, other_spm, cli, tmp_path):
    r = cli("expand-vocab", tiny_bloom, tmp_path / "out", "--merge-spm", other_spm)
    assert r.exit_code == 1 and "tokenizer.model" in r.stderr and str(tiny_bloom) in r.stderr
    assert not (tmp_path / "out").exists()


# --- added and special tokens ------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_bloom"])
def test_special_tokens_are_single_ids_never_split(fixture, request, cli, tmp_path):
    model = request.getfixturevalue(fixture)
    specials = ["<|System|>", "<|Human|>", "<|YaYi|>", "<|End|>"]
    (tmp_path / "tokens.txt").write_text("weightops\nstreamline\n")
    out = tmp_path / "out"
    args = [a for s in specials for a in ("--special-token", s)]
    r = cli("expand-vocab", model, out, "--add-tokens", tmp_path / "tokens.txt", *args)
    assert r.exit_code == 0, r.output
    old = AutoTokenizer.from_pretrained(model)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == len(old) + 6
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    assert sorted(ids.values()) == list(range(len(old) + 2, len(old) + 6))
    text = "hello<|Human|>the quick<|End|><|End|>fox weightops<|YaYi|>"
    enc = tok(text, add_special_tokens=False)["input_ids"]
    assert enc.count(ids["<|Human|>"]) == 1 and enc.count(ids["<|End|>"]) == 2 and enc.count(ids["<|YaYi|>"]) == 1
    assert tok.convert_tokens_to_ids("weightops") in enc
    assert tok.decode(enc) == text
    assert "<|End|>" not in tok.decode(enc, skip_special_tokens=True)
    # the old tokenizer splits them into several pieces: the new ids are what keeps them whole
    assert len(old(text, add_special_tokens=False)["input_ids"]) > len(enc) + 10
    # where the GGUF exporter and older loaders find them
    added = {t["content"]: t for t in json.loads((out / "tokenizer.json").read_text())["added_tokens"]}
    assert all(added[s]["special"] and added[s]["id"] == ids[s] for s in specials)
    assert not added["weightops"]["special"]
    smap = json.loads((out / "special_tokens_map.json").read_text())
    assert set(specials) <= set(smap["additional_special_tokens"])
    if (out / "tokenizer.model").is_file():  # SentencePiece: also where llama.cpp's converter looks
        assert json.loads((out / "added_tokens.json").read_text())["<|End|>"] == ids["<|End|>"]
        decoder = json.loads((out / "tokenizer_config.json").read_text())["added_tokens_decoder"]
        assert all(decoder[str(ids[s])]["special"] and decoder[str(ids[s])]["content"] == s for s in specials)
        assert not decoder[str(tok.convert_tokens_to_ids("weightops"))]["special"]
    assert open_checkpoint(out).tensor(vocab_tensor_names(open_checkpoint(out))[0]).shape[0] == len(tok)


# --- remapping to another tokenizer --------------------------------------------------------


def test_new_tokenizer_carries_rows_bit_identical(tiny_llama, other_tokenizer, tmp_path, load_all):
    out = tmp_path / "out"
    # the other tokenizer lacks some old tokens: their trained rows go only with --reinit-rows
    with pytest.raises(WeightopsError, match="--reinit-rows"):
        expand_vocab(tiny_llama, out, new_tokenizer=other_tokenizer)
    assert not out.exists()
    report = expand_vocab(tiny_llama, out, new_tokenizer=other_tokenizer, reinit_rows=True)
    old_vocab = AutoTokenizer.from_pretrained(tiny_llama).get_vocab()
    new_vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    assert new_vocab == AutoTokenizer.from_pretrained(other_tokenizer).get_vocab()
    before, after = load_all(tiny_llama), load_all(out)
    shared = {t: (old_vocab[t], i) for t, i in new_vocab.items() if t in old_vocab}
    moved = [t for t, (o, n) in shared.items() if o != n]
    assert len(moved) > 10 and report.carried == len(shared)
    for name in (EMB, HEAD):
        assert after[name].shape[0] == max(new_vocab.values()) + 1
        for o, n in shared.values():
            assert torch.equal(after[name][n].view(torch.int16), before[name][o].view(torch.int16))
    assert report.added and all(t not in old_vocab for t in report.added)


def test_shrink_refused_unless_allowed(tiny_llama, small_tokenizer, cli, tmp_path):
    for extra in ((), ("--force",)):  # --force only replaces outputs; it allows no shrinking
        r = cli("expand-vocab", tiny_llama, tmp_path / "out", "--new-tokenizer", small_tokenizer, *extra)
        assert r.exit_code == 1 and "400 rows" in r.stderr and "--allow-shrink" in r.stderr
        assert not (tmp_path / "out").exists()
    r = cli("expand-vocab", tiny_llama, tmp_path / "out", "--new-tokenizer", small_tokenizer, "--allow-shrink")
    assert r.exit_code == 0, r.output
    assert open_checkpoint(tmp_path / "out").tensor(EMB).shape[0] == 360


# --- initialisation rules ------------------------------------------------------------------


def _expand(model: Path, out: Path, **kw) -> tuple[dict, dict, list[int]]:
    """Expand with two added tokens and padding to 64; returns (old, new) embeddings+heads
    and the new token ids."""
    report = expand_vocab(model, out, add_tokens=["weightops", "春天来了"], pad_to_multiple=64, **kw)
    old = {r.name: r.load().clone() for r in open_checkpoint(model).tensors if r.name in (EMB, HEAD)}
    new = {r.name: r.load().clone() for r in open_checkpoint(out).tensors if r.name in (EMB, HEAD)}
    assert report.rows == 448 and report.padding == 46 and report.new_tokens == 402
    return old, new, [400, 401]


def test_init_zeros_and_padding_mean(llama_f32, tmp_path):
    old, new, ids = _expand(llama_f32, tmp_path / "out", init="zeros")
    for name in (EMB, HEAD):
        assert torch.equal(new[name][:400], old[name])
        assert torch.count_nonzero(new[name][ids]) == 0
        mean = old[name].double().mean(0).float()
        assert torch.allclose(new[name][402:], mean.expand(46, -1), rtol=0, atol=1e-7)


def test_init_mean(llama_f32, tmp_path):
    old, new, ids = _expand(llama_f32, tmp_path / "out", init="mean")
    for name in (EMB, HEAD):
        mean = old[name].double().mean(0).float()
        assert torch.allclose(new[name][ids], mean.expand(2, -1), rtol=0, atol=1e-7)
        assert not torch.allclose(mean, old[name][0], atol=1e-3)  # the check can fail


def test_init_subtoken_mean_by_hand(llama_f32, spm_tokenizer, tmp_path):
    old, new, ids = _expand(llama_f32, tmp_path / "out")  # subtoken-mean is the default
    sp = spm.SentencePieceProcessor(model_file=str(spm_tokenizer / "tokenizer.model"))
    for token, i in zip(["weightops", "春天来了"], ids, strict=True):
        pieces = sp.encode(token)  # the old tokenizer's pieces, no BOS (dummy prefix as in HF)
        assert len(pieces) >= 2 and 1 not in pieces
        for name in (EMB, HEAD):
            by_hand = torch.stack([old[name][p].double() for p in pieces]).mean(0).float()
            assert torch.allclose(new[name][i], by_hand, rtol=0, atol=1e-7)
    assert not torch.allclose(new[EMB][400], new[EMB][401], atol=1e-3)


def test_init_subtoken_mean_of_merged_pieces(merged_llama, tiny_llama, spm_tokenizer):
    vocab = AutoTokenizer.from_pretrained(merged_llama).get_vocab()
    sp = spm.SentencePieceProcessor(model_file=str(spm_tokenizer / "tokenizer.model"))
    no_prefix = _proto(spm_tokenizer / "tokenizer.model")
    no_prefix.normalizer_spec.add_dummy_prefix = False  # splits a piece exactly as written
    sp_raw = spm.SentencePieceProcessor(model_proto=no_prefix.SerializeToString())
    old = open_checkpoint(tiny_llama).tensor(EMB).load()
    new = open_checkpoint(merged_llama).tensor(EMB).load()
    n_pieces = spm.SentencePieceProcessor(model_file=str(merged_llama / "tokenizer.model")).get_piece_size()
    merged = [p for p, i in sorted(vocab.items(), key=lambda kv: kv[1]) if 400 <= i < n_pieces and len(p) > 2]
    word = next(p for p in merged if p.startswith("▁"))
    inner = next(p for p in merged if "▁" not in p)
    # "▁xy" is the word "xy" with SentencePiece's dummy prefix; "xy" inside a word has no "▁"
    for piece, pieces in ((word, sp.encode(word[1:])), (inner, sp_raw.encode(inner))):
        assert len(pieces) >= 2
        by_hand = torch.stack([old[p].double() for p in pieces]).mean(0).to(torch.bfloat16)
        assert torch.equal(new[vocab[piece]], by_hand), piece
    assert sp.encode(inner) != sp_raw.encode(inner)  # re-encoding as a word would add "▁"


def test_init_normal_is_seeded_and_follows_mean_resizing(llama_f32, tmp_path):
    old, a, ids = _expand(llama_f32, tmp_path / "a", init="normal", seed=1)
    _, b, _ = _expand(llama_f32, tmp_path / "b", init="normal", seed=1)
    _, c, _ = _expand(llama_f32, tmp_path / "c", init="normal", seed=2)
    assert torch.equal(a[EMB], b[EMB]) and torch.equal(a[HEAD], b[HEAD])
    assert not torch.equal(a[EMB][ids], c[EMB][ids])
    # N(mu, 1e-9 Sigma): many draws' squared distance to mu averages 1e-9 * trace(Sigma).
    e = old[EMB].double()
    mu = e.mean(0)
    sigma = (e - mu).T @ (e - mu) / e.shape[0]
    big = RowPlan(400, 2400, {i: i for i in range(400)}, {}, ())
    drawn = resize_matrix(old[EMB], big, "normal", seed=5)[400:].double()
    ratio = ((drawn - mu) ** 2).sum(1).mean() / (1e-9 * torch.trace(sigma))
    assert 0.9 < ratio < 1.1
    assert torch.allclose(drawn.mean(0), mu, rtol=0, atol=1e-5)


def test_subtoken_fallback_and_carry_in_resize_matrix():
    old = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    plan = RowPlan(4, 6, {0: 3, 1: 1, 2: 2, 3: 0}, {4: [0, 2], 5: []}, ())
    out = resize_matrix(old, plan, "subtoken-mean", seed=0)
    assert torch.equal(out[:4], old[[3, 1, 2, 0]])
    assert torch.equal(out[4], (old[0] + old[2]) / 2)
    assert torch.equal(out[5], old.mean(0))  # no pieces: falls back to the mean


# --- streaming and the model afterwards ----------------------------------------------------


def test_only_embedding_and_head_are_loaded_others_pass_through(tiny_llama):
    loaded: list[str] = []
    ckpt = open_checkpoint(tiny_llama)

    def spy(ref: TensorRef) -> TensorRef:
        return TensorRef(
            ref.name, ref.shape, ref.dtype_name, ref.source, lambda r=ref: loaded.append(r.name) or r.load()
        )

    refs = [spy(r) for r in ckpt.tensors]
    plan = RowPlan(400, 410, {i: i for i in range(400)}, {}, ())
    out = list(resize_vocab(refs, vocab_tensor_names(ckpt), plan, "mean"))
    assert loaded == []
    for before, after in zip(refs, out, strict=True):
        if before.name in (EMB, HEAD):
            assert after.shape == (410, 64) and after.load().shape == (410, 64)
        else:
            assert after is before
    assert sorted(loaded) == [HEAD, EMB]


def test_logits_of_old_tokens_unchanged(tiny_llama, merged_llama, load_all):
    before, after = load_all(tiny_llama), load_all(merged_llama)
    assert set(before) == set(after)
    for name in before:
        if name not in (EMB, HEAD):
            assert torch.equal(before[name].view(torch.int16), after[name].view(torch.int16)), name
    ids = torch.tensor([AutoTokenizer.from_pretrained(tiny_llama)(" ".join(tiny.corpus(3, seed=9)))["input_ids"]])
    assert ids.max() < 400
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)(ids).logits
        new = AutoModelForCausalLM.from_pretrained(merged_llama, dtype=torch.float32)(ids).logits
    assert new.shape[-1] > 400 and torch.equal(new[..., :400], ref)


def test_bloom_tied_embedding_and_config(tiny_bloom, tmp_path, load_all):
    out = tmp_path / "out"
    expand_vocab(tiny_bloom, out, special_tokens=["<|End|>"], init="mean")
    ckpt = open_checkpoint(out)
    assert vocab_tensor_names(ckpt) == vocab_tensor_names(open_checkpoint(tiny_bloom))
    assert len(vocab_tensor_names(ckpt)) == 1  # tied: no separate head
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 401
    ids = torch.tensor([[5, 17, 250, 399, 42]])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tiny_bloom, dtype=torch.float32)(ids).logits
        new = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
    assert new.shape[-1] == 401 and torch.equal(new[..., :400], ref)


def test_cli_summary_and_inspect_triple_agree(tiny_llama, cli, tmp_path):
    out = tmp_path / "out"
    r = cli("expand-vocab", tiny_llama, out, "--special-token", "<|End|>", "--init", "zeros")
    assert r.exit_code == 0, r.output
    assert "400 -> 401" in r.stdout and "'<|End|>'" in r.stdout and "vocab_size = 401" in r.stdout
    r = cli("inspect", out, "--json")
    vocab = json.loads(r.stdout)["vocab"]
    assert vocab == {
        "config": 401,
        "tokenizer": 401,
        "embedding_rows": 401,
        "padding_rows": 0,
        "agree": True,
        "tokenizer_files": {
            "tokenizer.model": 400,
            "tokenizer.json": 401,
            "added_tokens.json": 401,
            "tokenizer_config.json": 401,
        },
        "conflicts": [],
    }


def test_existing_output_refused_before_any_work(tiny_llama, cli, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    for extra in ((), ("--force",)):
        r = cli("expand-vocab", tiny_llama, out, "--special-token", "<|End|>", *extra)
        assert r.exit_code == 1 and "did not write" in r.stderr and "keep.txt" in r.stderr
        assert (out / "keep.txt").read_text() == "x"
    shutil.rmtree(out)


def test_output_is_deterministic(tiny_llama, other_spm, tmp_path):
    for out in ("a", "b"):
        expand_vocab(tiny_llama, tmp_path / out, merge_spm=other_spm, special_tokens=["<|End|>"], init="normal")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir()) and "model.safetensors" in files
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
