"""The job's Hugging Face model card: `README.md` in the job's output directory.

The release report is the runner's record (timings, absolute paths, every number); the card is
what a user reads on the Hub: YAML front matter the Hub indexes (`base_model`,
`base_model_relation`, `library_name`, `license`, `tags`), one table row per weight file (type,
size, bits per weight, the verify step's KLD / top-1 / perplexity ratio, sha256) and how the
files were made. Its numbers are the report's own (sizes and hashes from the manifests, metrics
from the verify results), so the two cannot disagree. It holds no timestamp, no wall time, no
node name and no absolute path: the same job gives the same bytes wherever it runs on the same
kind of device (each step's `cpu` or `cuda` is listed), and `--resume` rewrites it. Where each
step ran, its wall time and peak memory are in the report, which the card points to.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import WeightopsError
from ..io import outputs
from ..io.gguf import LLAMA_CPP_PIN, is_gguf, open_reader
from ..progress import human_size

if TYPE_CHECKING:
    from . import Job, Step

CARD = "README.md"
_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<n>\d{5})-of-(?P<total>\d{5})\.gguf$")  # llama.cpp's split names
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")  # owner/name
_LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "LICENCE.txt")
# Phrases that identify a licence text, in the order tried, and the Hub's identifier for it.
_LICENSE_TEXTS = (
    (("LLAMA 2 COMMUNITY LICENSE",), "llama2"),
    (("LLAMA 3.3 COMMUNITY LICENSE",), "llama3.3"),
    (("LLAMA 3.2 COMMUNITY LICENSE",), "llama3.2"),
    (("LLAMA 3.1 COMMUNITY LICENSE",), "llama3.1"),
    (("LLAMA 3 COMMUNITY LICENSE",), "llama3"),
    (("GEMMA TERMS OF USE",), "gemma"),
    (("BIGSCIENCE RAIL LICENSE V1.0",), "bigscience-bloom-rail-1.0"),
    (("APACHE LICENSE", "VERSION 2.0"), "apache-2.0"),
    (("MIT LICENSE",), "mit"),
    (("PERMISSION IS HEREBY GRANTED, FREE OF CHARGE",), "mit"),
    (("GNU GENERAL PUBLIC LICENSE", "VERSION 3"), "gpl-3.0"),
    (("ATTRIBUTION-NONCOMMERCIAL 4.0 INTERNATIONAL",), "cc-by-nc-4.0"),
    (("ATTRIBUTION 4.0 INTERNATIONAL",), "cc-by-4.0"),
)
_FLOAT_TYPES = {"F32", "F16", "BF16"}


@dataclass
class Group:
    """Files that make one model: a GGUF file (or split set), or a checkpoint directory."""

    step: str
    files: list[tuple[str, dict]]  # (path relative to the job output, {"sha256", "size"} from the report)
    paths: list[Path]  # the same files, absolute
    kind: str  # the table's type column
    bits_per_weight: float | None = None
    quantized: bool = False
    library: str | None = None  # "gguf" or "transformers": what loads it
    check: dict | None = None  # the verify result that checked it


@dataclass
class Source:
    """What the job's inputs say about the model the artefacts derive from."""

    base_model: list[str]
    base_model_note: str
    license: dict[str, str]  # license (+ license_name, license_link) for the front matter
    license_note: str


# ---------------------------------------------------------------------------------------------- artefacts


def _groups(job: Job, step: Step, files: dict[str, dict]) -> list[Group]:
    """The report's files of one artefact, grouped into models, with type and bits per weight."""
    assert step.output is not None
    root = step.output if step.output.is_dir() else step.output.parent
    rel = {name: (root / name).relative_to(job.output).as_posix() for name in files}
    ggufs = [n for n in sorted(files) if n.endswith(".gguf") and is_gguf(root / n)]
    if ggufs:
        sets: dict[str, list[str]] = {}
        for n in ggufs:
            m = _SPLIT.match(Path(n).name)
            sets.setdefault(str(Path(n).parent / f"{m['stem']}-of-{m['total']}") if m else n, []).append(n)
        return [
            _gguf_group(step.name, [(rel[n], files[n]) for n in names], [root / n for n in names])
            for names in sets.values()
        ]
    from ..io.checkpoint import open_checkpoint

    try:
        ckpt = open_checkpoint(step.output)
    except WeightopsError:  # not a model (e.g. a tokenizer): every file, no type
        return [Group(step.name, [(rel[n], files[n]) for n in sorted(files)], [root / n for n in sorted(files)], "-")]
    weights = [p.relative_to(root).as_posix() for p in ckpt.weight_files]
    listed = [n for n in weights if n in files]
    group = Group(step.name, [(rel[n], files[n]) for n in listed], [root / n for n in listed], "-")
    nbytes = sum(r.nbytes for r in ckpt.tensors)
    quant = (ckpt.config or {}).get("quantization_config") or {}
    if quant.get("quant_method") == "bitsandbytes":
        four = bool(quant.get("load_in_4bit"))
        group.kind = f"bitsandbytes {quant.get('bnb_4bit_quant_type', 'nf4') if four else 'int8'}"
        group.quantized = True
        params = _parameters(step.inputs[0]) if step.inputs else None  # packed tensors hide the count
        group.bits_per_weight = 8 * nbytes / params if params else None
    else:
        by_type = Counter[str]()
        for r in ckpt.tensors:
            by_type[r.stored_type] += r.numel
        group.kind = f"{ckpt.format} {by_type.most_common(1)[0][0]}"
        if step.op == "make-delta":
            group.kind = "delta, " + group.kind
        group.bits_per_weight = 8 * nbytes / max(1, sum(by_type.values()))
    group.library = "transformers" if ckpt.format.is_hf else None
    return [group]


def _gguf_group(step: str, files: list[tuple[str, dict]], paths: list[Path]) -> Group:
    """Type from the file's own `general.file_type`; bits per weight as llama.cpp counts them
    (all tensor bytes over all elements); quantized when any tensor is stored in a block type."""
    from gguf import LlamaFileType

    group = Group(step, files, paths, "GGUF", library="gguf")
    nbytes = numel = 0
    for i, path in enumerate(paths):
        header = open_reader(path)  # its map stays open while its lazy metadata arrays live
        if i == 0 and header.metadata.get("general.type") == "imatrix":
            return Group(step, files, paths, "importance matrix (GGUF)")
        ftype = header.metadata.get("general.file_type")
        if i == 0 and isinstance(ftype, int) and ftype in LlamaFileType._value2member_map_:
            group.kind = LlamaFileType(ftype).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        for t in header.tensors:
            nbytes += t.nbytes
            numel += math.prod(t.shape)
            group.quantized |= t.ggml_type.name not in _FLOAT_TYPES
    group.bits_per_weight = 8 * nbytes / numel if numel else None
    return group


def _parameters(path: Path) -> int | None:
    from ..io.checkpoint import open_checkpoint

    try:
        return sum(r.numel for r in open_checkpoint(path).tensors)
    except WeightopsError:
        return None


def _attach_checks(groups: list[Group], job: Job, verifications: list[dict]) -> None:
    """Each group gets the first logit comparison in job order whose candidate is it (the
    artefact, or one of its files)."""
    outputs_by_step = {s.name: s.output for s in job.steps}
    for group in groups:
        own = {outputs_by_step[group.step], *group.paths}
        for v in verifications:
            cand = (v.get("candidate") or {}).get("path")
            if cand and Path(cand).resolve() in own and v.get("top1_agreement") is not None:
                group.check = v
                break


# ---------------------------------------------------------------------------------------------- sources


def _ancestors(job: Job, steps: Iterable[str]) -> list[str]:
    """The [inputs] names the given steps' outputs derive from, in [inputs] order."""
    by_output = {s.output: s for s in job.steps if s.output is not None}
    by_name = {s.name: s for s in job.steps}
    names = {p: k for k, p in job.inputs.items()}
    found: set[str] = set()
    todo = [p for name in steps for p in by_name[name].inputs]
    seen: set[Path] = set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        if p in names:
            found.add(names[p])
        if p in by_output:
            todo += by_output[p].inputs
    return [k for k in job.inputs if k in found]


def _front_matter(directory: Path) -> dict:
    from huggingface_hub.repocard import metadata_load

    if not (directory / CARD).is_file():
        return {}
    try:
        return metadata_load(directory / CARD) or {}
    except Exception:  # a card with broken YAML says nothing we can use
        return {}


def _config(directory: Path) -> dict:
    try:
        doc = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _license_of(directory: Path) -> tuple[dict[str, str], str] | None:
    """({license, license_name, license_link}, where it was read), or None when the source is
    silent. Its own card's front matter first, then config.json, then a LICENSE file whose text
    is one the Hub names."""
    meta = _front_matter(directory)
    if isinstance(meta.get("license"), str):
        keys = ("license", "license_name", "license_link")
        return {k: str(meta[k]) for k in keys if isinstance(meta.get(k), str)}, f"{directory.name}/{CARD}"
    if isinstance(_config(directory).get("license"), str):
        return {"license": _config(directory)["license"]}, f"{directory.name}/config.json"
    for name in _LICENSE_FILES:
        if (directory / name).is_file():
            text = " ".join((directory / name).read_text(errors="replace").upper().split())
            for phrases, ident in _LICENSE_TEXTS:
                if all(p in text for p in phrases):
                    return {"license": ident}, f"{directory.name}/{name}"
            return {}, f"{directory.name}/{name}"  # a licence, but not one we can name
    return None


def _source(job: Job, artefact_steps: list[str]) -> Source:
    dirs = [(k, job.inputs[k]) for k in _ancestors(job, artefact_steps) if job.inputs[k].is_dir()]
    if job.base_model:
        base, base_note = list(job.base_model), "set by the job file ([job] base_model)"
    else:
        ids = list(dict.fromkeys(n for _, d in dirs if _HUB_ID.match(str(n := _config(d).get("_name_or_path", "")))))
        base = ids if len(ids) == 1 else []
        base_note = (
            f"from the source's config.json (_name_or_path): {ids[0]}"
            if len(ids) == 1
            else f"not stated: the inputs name several ({', '.join(ids)}); set [job] base_model"
            if ids
            else "not stated: no input names a Hub model; set [job] base_model"
        )
    found = [said for _, d in dirs if (said := _license_of(d)) is not None]
    if not found:
        return Source(base, base_note, {}, "not stated by the source")
    if len({json.dumps(lic, sort_keys=True) for lic, _ in found}) > 1:
        each = "; ".join(f"{where}: {lic.get('license', 'a licence weightops cannot name')}" for lic, where in found)
        return Source(base, base_note, {}, f"the sources disagree ({each}): not stated here")
    lic, where = found[0]
    if not lic:
        return Source(base, base_note, {}, f"{where} is a licence weightops cannot name: ship it with these files")
    return Source(base, base_note, lic, f"{lic['license']}, from {where}")


# ---------------------------------------------------------------------------------------------- rendering


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{_cell(text).replace('`', '')}`"


def _g(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.2f}%"


def _label(job: Job, path: str | None) -> str:
    """A path as the card names it: relative to the job output, or the input's [inputs] name."""
    if not path:
        return "-"
    p = Path(path).resolve()
    for k, q in job.inputs.items():
        if p == q:
            return f"{_code(k)} (input)"
    if p.is_relative_to(job.output):
        return _code(p.relative_to(job.output).as_posix())
    return _code(p.name)


def _device(entry: dict) -> str:
    """What a step computed on, `cpu` or `cuda`: which GPU, and the node, change from run to
    run, and the card is the same bytes for the same job (the report has them)."""
    return _cell(str(entry.get("device") or "-").split(" (")[0])


def _option(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(_option(v) for v in value)
    return str(value)


def _option_path(job: Job, step: Step, key: str) -> tuple[Path | None, Step | None]:
    """Where a step's path option leads, and the earlier step that wrote it (if one did)."""
    given = str(step.options.get(key, ""))
    if given.startswith("@"):
        maker = next((s for s in job.steps if s.name == given[1:]), None)
        return (maker.output if maker else job.inputs.get(given[1:])), maker
    return step.paths.get(key), None


def _file(path: Path, hasher: Callable[[Path], str]) -> str:
    return f"{_code(path.name)} (sha256 `{hasher(path)}`)"


def _imatrix_lines(job: Job, hasher: Callable[[Path], str]) -> list[str]:
    """The importance matrix each GGUF step quantized with, and the text it was computed on:
    the `text` of the imatrix step that made it, else the datasets its GGUF header names."""
    lines = []
    for step in job.steps:
        path, maker = _option_path(job, step, "imatrix")
        if step.op != "gguf" or path is None or not path.is_file():
            continue
        line = f"- step {_code(step.name)} quantized with the importance matrix {_file(path, hasher)}"
        text = _option_path(job, maker, "text")[0] if maker is not None and maker.op == "imatrix" else None
        if text is not None and text.is_file():
            line += f", computed by step {_code(maker.name)} from {_file(text, hasher)}"  # type: ignore[union-attr]
        elif is_gguf(path):
            meta = open_reader(path).metadata
            if sets := [Path(str(d)).name for d in meta.get("imatrix.datasets") or []]:
                line += f", computed from {', '.join(map(_code, sets))}"
            if meta.get("imatrix.chunk_count"):
                line += f" ({meta['imatrix.chunk_count']} chunks of {meta.get('imatrix.chunk_size')} tokens)"
        lines.append(line)
    return lines


def _yaml(source: Source, groups: list[Group]) -> str:
    from huggingface_hub import ModelCardData

    quantized = any(g.quantized for g in groups)
    libraries = {g.library for g in groups}
    library = "gguf" if libraries == {"gguf"} else "transformers" if "transformers" in libraries else None
    tags = {"weightops"}
    if "gguf" in libraries:
        tags.add("gguf")
    if quantized:
        tags.add("quantized")
    for g in groups:
        if g.kind.startswith("bitsandbytes"):
            tags |= {"bitsandbytes", "8-bit" if g.kind.endswith("int8") else "4-bit"}
    base = source.base_model[0] if len(source.base_model) == 1 else source.base_model or None
    data = ModelCardData(
        base_model=base,
        base_model_relation="quantized" if base and quantized else None,
        library_name=library,
        tags=sorted(tags),
        license=source.license.get("license"),
        license_name=source.license.get("license_name"),
        license_link=source.license.get("license_link"),
    )
    return data.to_yaml()


def render(job: Job, report: dict, hasher: Callable[[Path], str]) -> str:
    """The card's text for a finished job and its report document."""
    from importlib import metadata

    steps = {s.name: s for s in job.steps}
    groups = [g for name, files in report["artefacts"].items() for g in _groups(job, steps[name], files)]
    _attach_checks(groups, job, report["verifications"])
    source = _source(job, list(report["artefacts"]))
    try:
        version = metadata.version("weightops")
    except metadata.PackageNotFoundError:
        version = "(not installed)"
    out = ["---", _yaml(source, groups), "---", "", f"# {_cell(job.name)}", ""]
    out += [
        f"Made by [weightops](https://pypi.org/project/weightops/) {version} from the job "
        f"{_code(job.path.name)}. Every number below is also in `release-report.json`.",
        "",
        "## Files",
        "",
        "| file | type | size | bits/weight | KLD | top-1 | PPL ratio | sha256 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in groups:
        c = g.check or {}
        for name, meta in g.files:
            out.append(
                f"| {_code(name)} | {_cell(g.kind)} | {human_size(int(meta['size']))} | "
                f"{_g(g.bits_per_weight, '.2f')} | {_g(c.get('kld_mean'), '.4g')} | "
                f"{_percent(c.get('top1_agreement'))} | {_g(c.get('ppl_ratio'), '.4f')} | "
                f"`{meta['sha256']}` |"
            )
    out += [
        "",
        "KLD: mean Kullback-Leibler divergence of the next-token distributions from the reference's; "
        "top-1: how often both pick the same next token; PPL ratio: perplexity over the reference's, "
        "on the prompts of the check below (`-`: not checked). Each artefact carries a "
        "`weightops-manifest.json` (beside a file, inside a directory) with the sha256 of every file: "
        "`weightops manifest check PATH` checks a download.",
    ]
    if report["verifications"]:
        out += [
            "",
            "## Checks",
            "",
            "| check | candidate | reference | runtime | tokens | KLD mean | KLD p99 | top-1 | PPL ratio | passed |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for v in report["verifications"]:
            out.append(
                f"| {_code(v['step'])} | {_label(job, (v.get('candidate') or {}).get('path'))} | "
                f"{_label(job, (v.get('reference') or {}).get('path'))} | "
                f"{_cell((v.get('candidate') or {}).get('runtime', v.get('mode', '-')))} | {v.get('tokens', '-')} | "
                f"{_g(v.get('kld_mean'), '.4g')} | {_g(v.get('kld_p99'), '.4g')} | "
                f"{_percent(v.get('top1_agreement'))} | "
                f"{_g(v.get('ppl_ratio'), '.4f')} | {'yes' if v.get('passed') else 'no'} |"
            )
    out += ["", "## How it was made", "", f"- weightops {version}"]
    if any(g.library == "gguf" for g in groups):
        out.append(f"- GGUF files follow {LLAMA_CPP_PIN}: its file layout, tensor type rules and kernels")
    out += _imatrix_lines(job, hasher)
    out += [f"- base model: {_cell(source.base_model_note)}", f"- license: {_cell(source.license_note)}"]
    if job.inputs:
        out.append("- inputs: " + ", ".join(f"{_code(k)} ({_code(p.name)})" for k, p in job.inputs.items()))
    out += [
        "",
        "Where each step ran (node), its wall time and peak memory: `release-report.md`.",
        "",
        "| # | step | op | options | device |",
        "|---|---|---|---|---|",
    ]
    devices = {e["name"]: _device(e) for e in report["steps"]}
    for i, s in enumerate(job.steps, 1):
        opts = " ".join(f"{k.replace('_', '-')}={_option(v)}" for k, v in s.options.items())
        out.append(f"| {i} | {_code(s.name)} | {s.op} | {_code(opts) if opts else '-'} | {devices.get(s.name, '-')} |")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------- writing


def path(job: Job) -> Path:
    return job.output / CARD


def check_writable(job: Job) -> None:
    """Refuse, before any step runs, a README.md in the output directory that weightops did not write."""
    why = outputs.refusal(path(job), "model card")
    if why:
        raise WeightopsError(
            f"{why}; the job writes its model card there and weightops only replaces what it wrote: "
            "move it away yourself, or choose another [job] output"
        )


def remove(job: Job) -> None:
    """A failed job leaves no card: the one there describes artefacts that may be gone."""
    outputs.remove(path(job), "the previous model card", announce=False)


def write(job: Job, report: dict, hasher: Callable[[Path], str]) -> Path:
    """Write (or rewrite) the card of a finished job."""
    text = render(job, report, hasher)
    remove(job)
    with outputs.Output(path(job), kind="file").writing() as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path(job)
