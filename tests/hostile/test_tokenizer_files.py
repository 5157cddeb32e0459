"""Tokenizer files that disagree (issue 14, item 17).

The directory every test starts from is what transformers 5 writes for
`LlamaTokenizer(vocab_file=...).save_pretrained(model)`: a tokenizer.json with 3 tokens beside
the model's 400-piece tokenizer.model and 400-row embedding. Every command that reads a
vocabulary must see the two files disagree, name both with both sizes, and (except inspect,
which reports) refuse before writing anything. Trained rows are never re-initialised without
--reinit-rows.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from weightops import tiny
from weightops.io.tokenizer_files import read_tokenizer_files

BOTH = ("tokenizer.json", "tokenizer.model", "3 tokens", "400")


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def split_model(tmp_path_factory) -> Path:
    """A 400-row LLaMA whose tokenizer.json was rewritten by LlamaTokenizer(vocab_file=...).save_pretrained."""
    from transformers import LlamaTokenizer

    root = tmp_path_factory.mktemp("split")
    model = tiny.tiny_llama(root / "model", tiny.spm_tokenizer_dir(root / "tok"))
    LlamaTokenizer(vocab_file=str(model / "tokenizer.model")).save_pretrained(model)
    assert len(json.loads((model / "tokenizer.json").read_text())["model"]["vocab"]) == 3
    return model


@pytest.fixture
def untouched(split_model):
    """Asserts, after the test, that no file of the model directory changed or appeared."""
    before = _digest(split_model)
    yield
    assert _digest(split_model) == before


def _names_both(message: str) -> None:
    assert all(part in message for part in BOTH), message


def test_inspect_reports_both_files_and_sizes(split_model, cli, untouched):
    r = cli("inspect", split_model, "--json")
    assert r.exit_code == 0, r.output
    vocab = json.loads(r.stdout)["vocab"]
    assert vocab["agree"] is False
    assert vocab["tokenizer_files"] == {"tokenizer.model": 400, "tokenizer.json": 3}
    assert len(vocab["conflicts"]) == 1
    _names_both(vocab["conflicts"][0])
    text = cli("inspect", split_model)
    assert text.exit_code == 0 and "DISAGREE" in text.stdout
    _names_both(text.stdout)


def test_expand_vocab_refuses_before_any_work(split_model, cli, tmp_path, untouched):
    out = tmp_path / "out"
    r = cli("expand-vocab", split_model, out, "--special-token", "<|End|>", "--pad-to-multiple", "400")
    assert r.exit_code == 1
    _names_both(r.stderr)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_gguf_refuses_instead_of_picking_a_file(split_model, cli, tmp_path, untouched):
    out = tmp_path / "m.gguf"
    r = cli("gguf", split_model, out)
    assert r.exit_code == 1
    _names_both(r.stderr)
    assert list(tmp_path.iterdir()) == []


def test_convert_refuses_such_a_tokenizer(split_model, tiny_llama, cli, tmp_path, untouched):
    r = cli("convert", tiny_llama, tmp_path / "tp", "--to", "tencentpretrain", "--tokenizer", split_model)
    assert r.exit_code == 1
    _names_both(r.stderr)
    assert list(tmp_path.iterdir()) == []


def test_verify_refuses_to_tokenize_with_it(split_model, tiny_llama, cli, tmp_path, untouched):
    report = tmp_path / "report.json"
    r = cli("verify", tiny_llama, tiny_llama, "--tokenizer", split_model, "--json", report)
    assert r.exit_code == 1
    _names_both(r.stderr)
    assert not report.exists()


def test_added_tokens_that_differ_between_files(spm_tokenizer, tmp_path, cli):
    """tokenizer.json says id 400 is '<|a|>', added_tokens.json that it is '<|b|>'."""
    d = tmp_path / "tok"
    shutil.copytree(spm_tokenizer, d)
    data = json.loads((d / "tokenizer.json").read_text())
    data["added_tokens"].append(
        {
            "id": 400,
            "content": "<|a|>",
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
    )
    (d / "tokenizer.json").write_text(json.dumps(data))
    (d / "added_tokens.json").write_text(json.dumps({"<|b|>": 400}))
    files = read_tokenizer_files(d)
    assert files.conflicts == (f"{d}: token id 400 is '<|b|>' in added_tokens.json but '<|a|>' in tokenizer.json",)
    (d / "added_tokens.json").write_text(json.dumps({"<|a|>": 400, "<|c|>": 401}))
    assert read_tokenizer_files(d).conflicts == (
        f"{d}: added_tokens.json defines token '<|c|>' (id 401) that tokenizer.json (401 tokens) lacks",
    )
    (d / "added_tokens.json").write_text(json.dumps({"<|a|>": 400}))
    assert read_tokenizer_files(d).conflicts == () and read_tokenizer_files(d).size == 401


def test_vocab_and_merges_files_against_tokenizer_json(bpe_tokenizer, tmp_path):
    d = tmp_path / "tok"
    shutil.copytree(bpe_tokenizer, d)
    model = json.loads((d / "tokenizer.json").read_text())["model"]
    (d / "vocab.json").write_text(json.dumps(model["vocab"]))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in model["merges"]) + "\n")
    assert read_tokenizer_files(d).conflicts == ()
    short = dict(list(model["vocab"].items())[:300])
    (d / "vocab.json").write_text(json.dumps(short))
    (d / "merges.txt").write_text("\n".join(" ".join(m) for m in model["merges"][:10]) + "\n")
    conflicts = read_tokenizer_files(d).conflicts
    assert conflicts == (
        f"{d}: vocab.json's vocabulary has 300 tokens but tokenizer.json's 400",
        f"{d}: merges.txt's list has 10 merges but tokenizer.json's {len(model['merges'])}",
    )


def test_unreadable_tokenizer_files_are_named(spm_tokenizer, tmp_path, cli, tiny_llama):
    d = tmp_path / "tok"
    shutil.copytree(spm_tokenizer, d)
    (d / "tokenizer.json").write_text('{"model": {"vocab": {"a": "zero"}}}')
    r = cli("gguf", tiny_llama, tmp_path / "m.gguf", "--tokenizer", d)
    assert r.exit_code == 1 and str(d / "tokenizer.json") in r.stderr and "ValueError" in r.stderr
    (d / "tokenizer.json").unlink()
    (d / "tokenizer.model").write_bytes(b"\x00not a model")
    r = cli("gguf", tiny_llama, tmp_path / "m.gguf", "--tokenizer", d)
    assert r.exit_code == 1 and f"{d / 'tokenizer.model'}: not a SentencePiece model" in r.stderr
    assert not (tmp_path / "m.gguf").exists()


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory) -> Path:
    """400 pieces trained on other text: many of the model's tokens are missing from it."""
    lines = [line[::-1] for line in tiny.corpus(seed=5)]
    return tiny.spm_tokenizer_dir(tmp_path_factory.mktemp("other"), lines=lines)


def test_remap_never_reinitialises_trained_rows_without_the_flag(tiny_llama, other_tokenizer, cli, tmp_path, load_all):
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    r = cli("expand-vocab", tiny_llama, out, "--new-tokenizer", other_tokenizer, "--init", "mean")
    assert r.exit_code == 1 and "--reinit-rows" in r.stderr and "would be re-initialised" in r.stderr
    old, new = AutoTokenizer.from_pretrained(tiny_llama).get_vocab(), AutoTokenizer.from_pretrained(other_tokenizer)
    lost = sorted((i, t) for t, i in old.items() if t not in new.get_vocab())
    assert lost and f"{len(lost)} trained row(s)" in r.stderr and repr(lost[0][1]) in r.stderr
    assert not out.exists()
    r = cli("expand-vocab", tiny_llama, out, "--new-tokenizer", other_tokenizer, "--init", "mean", "--reinit-rows")
    assert r.exit_code == 0, r.output
    before, after = load_all(tiny_llama), load_all(out)
    emb = "model.embed_tokens.weight"
    for token, i in new.get_vocab().items():  # every shared token keeps its trained row, wherever it moved
        if token in old:
            assert after[emb][i].equal(before[emb][old[token]])
