"""The tokenizer.* keys of our GGUF against llama.cpp's own converter at the pinned commit
(convert_hf_to_gguf.py, run on the same tiny model directory with --outtype f32), for a
SentencePiece LLaMA, a LLaMA-3 style BPE whose tokenizer.json adds BOS with a
TemplateProcessing post-processor, a byte-level BPE BLOOM (ByteLevel post-processor) and a
49152-row LLaMA (the size for which the converter forces add_bos_token = false: SmolLM2's
case). And the GGUF path never imports transformers, while its BPE pre-tokenizer hash equals
the one transformers' AutoTokenizer gives.

`tokenizer.ggml.pre` is the one key compared differently: the converter only knows the hashes
of published tokenizers and stops on any other, so the tiny BPE tokenizers cannot be
recognised. The converter is run with its hash table left as it is but with "not recognised"
turned into the value `unrecognised-<its chkhsh>`; the test then checks that our hash of the
check text is the converter's own chkhsh, and that our fallback is the documented one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from hashlib import sha256
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader

from weightops import tiny
from weightops.io.gguf_tokenizer import CHECK_TEXT, check_hash, load_fast_tokenizer

REPO = Path(__file__).resolve().parents[2]
LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)

# convert_hf_to_gguf.py as it is, except that an unrecognised BPE pre-tokenizer hash gives
# "unrecognised-<chkhsh>" (captured from the converter's own sha256 call) instead of stopping.
CONVERTER = """
import runpy, sys
root = sys.argv.pop(1)
sys.path[:0] = [root]
import conversion.base as base
seen = []
def sha256(data, _real=base.sha256):
    digest = _real(data)
    seen.append(digest.hexdigest())
    return digest
base.sha256 = sha256
known = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return "unrecognised-" + seen[-1]
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv[0] = root + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _bpe_tokenizer(directory: Path, pre_tokenizer, post_processor, specials: list[str], **special_kw) -> Path:
    """A byte-level BPE trained on tiny.corpus(), saved as transformers saves it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(tiny.corpus(), trainer)
    tok.post_processor = post_processor(tok)
    PreTrainedTokenizerFast(tokenizer_object=tok, **special_kw).save_pretrained(directory)
    return Path(directory)


def llama3_style_tokenizer(directory: Path) -> Path:
    """LLaMA-3 layout: split regex + ByteLevel, BOS added by a TemplateProcessing, a chat template."""
    from tokenizers import Regex, pre_tokenizers, processors

    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bos = "<|begin_of_text|>"

    def template(tok):
        return processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, tok.token_to_id(bos))]
        )

    return _bpe_tokenizer(
        directory,
        pre,
        template,
        [bos, "<|end_of_text|>", "<|eot_id|>"],
        bos_token=bos,
        eos_token="<|end_of_text|>",
        chat_template="{% for m in messages %}{{ m['content'] }}<|eot_id|>{% endfor %}",
    )


def bytelevel_tokenizer(directory: Path) -> Path:
    """GPT-2/BLOOM layout: ByteLevel pre-tokenizer and post-processor (adds no special token)."""
    from tokenizers import pre_tokenizers, processors

    return _bpe_tokenizer(
        directory,
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        lambda tok: processors.ByteLevel(trim_offsets=False),
        ["<unk>", "<s>", "</s>", "<pad>"],
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def llama_49152(directory: Path, tokenizer_dir: Path) -> Path:
    """A LLaMA with 49152 embedding rows (tied, 1 layer) and a 400-token tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    for f in tokenizer_dir.iterdir():
        shutil.copyfile(f, Path(directory) / f.name)
    return Path(directory)


@pytest.fixture(scope="module")
def models(tmp_path_factory, spm_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizer_kv")
    l3 = llama3_style_tokenizer(root / "l3-tok")
    return {
        "spm": tiny.tiny_llama(root / "spm", spm_tokenizer),
        "bpe-template": tiny.tiny_llama(root / "bpe-template", l3),
        "bpe-bytelevel": tiny.tiny_bloom(root / "bpe-bytelevel", bytelevel_tokenizer(root / "bl-tok")),
        "bpe-49152": llama_49152(root / "bpe-49152", l3),
    }


def tokenizer_keys(path: Path) -> dict[str, object]:
    return {k: f.contents() for k, f in GGUFReader(path).fields.items() if k.startswith("tokenizer.")}


def reference_gguf(llama_cpp_source: Path, model: Path, out: Path) -> Path:
    env = {**os.environ, "PYTHONPATH": str(llama_cpp_source / "gguf-py")}
    got = subprocess.run(
        [sys.executable, "-c", CONVERTER, str(llama_cpp_source), str(model), "--outtype", "f32", "--outfile", str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert got.returncode == 0, got.stderr[-3000:]
    return out


@pytest.mark.parametrize(
    "case, pre",
    [("spm", "default"), ("bpe-template", "llama-bpe"), ("bpe-bytelevel", "gpt-2"), ("bpe-49152", "llama-bpe")],
)
def test_tokenizer_keys_as_convert_hf_to_gguf(case, pre, models, llama_cpp_source, cli, tmp_path):
    model = models[case]
    ref = tokenizer_keys(reference_gguf(llama_cpp_source, model, tmp_path / "ref.gguf"))
    r = cli("gguf", model, tmp_path / "ours.gguf", "--type", "f32")
    assert r.exit_code == 0, r.output
    ours = tokenizer_keys(tmp_path / "ours.gguf")

    ref_pre = ref.pop("tokenizer.ggml.pre")
    if ref_pre.startswith("unrecognised-"):  # see the module docstring
        assert ref_pre == "unrecognised-" + check_hash(load_fast_tokenizer(model))
        assert ours.pop("tokenizer.ggml.pre") == pre
    else:
        assert ours.pop("tokenizer.ggml.pre") == ref_pre == pre
    assert sorted(ours) == sorted(ref), (
        f"keys only in ours: {sorted(set(ours) - set(ref))}; only in the converter's: {sorted(set(ref) - set(ours))}"
    )
    different = [k for k in ref if ours[k] != ref[k]]
    assert not different, "; ".join(f"{k}: ours {str(ours[k])[:80]} vs converter {str(ref[k])[:80]}" for k in different)
    # the cases exercise what they are meant to
    flags = {k.removeprefix("tokenizer.ggml."): v for k, v in ref.items() if k.startswith("tokenizer.ggml.add_")}
    expected = {
        "spm": {"add_bos_token": True, "add_sep_token": False},
        "bpe-template": {"add_bos_token": True, "add_sep_token": False},
        "bpe-bytelevel": {"add_bos_token": False, "add_eos_token": False},
        "bpe-49152": {"add_bos_token": False, "add_sep_token": False},
    }[case]
    assert flags == expected
    if case == "bpe-template":
        assert "<|eot_id|>" in ref["tokenizer.chat_template"]


@pytest.mark.parametrize("case", ["bpe-template", "bpe-bytelevel"])
def test_gguf_never_imports_transformers(case, models, tmp_path):
    out = tmp_path / "m.gguf"
    code = (
        "import sys\n"
        "from weightops.cli import main\n"
        f"main(['gguf', {str(models[case])!r}, {str(out)!r}, '--type', 'q8_0'], standalone_mode=False)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert got.returncode == 0, got.stderr[-3000:]
    assert got.stdout.strip().splitlines()[-1] == "[]"
    assert out.is_file() and "gpt2" in got.stdout + got.stderr


@pytest.mark.parametrize("case", ["bpe-template", "bpe-bytelevel", "spm"])
def test_pre_tokenizer_hash_equals_transformers(case, models):
    """The converter hashes the ids transformers' AutoTokenizer gives (special tokens added);
    the tokenizers library alone gives the same ids, hence the same hash."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models[case])
    expected = sha256(str(tok.encode(CHECK_TEXT)).encode()).hexdigest()
    assert check_hash(load_fast_tokenizer(models[case])) == expected
    if case == "bpe-template":  # BOS comes from the post-processor, in both
        assert tok.encode(CHECK_TEXT)[0] == tok.convert_tokens_to_ids("<|begin_of_text|>")
