"""The manual stays whole: a short README, links that resolve, a page for every command that
names every one of its options."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from weightops.cli import all_commands, main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 400

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_ROW = re.compile(r"^\|\s*`weightops ([a-z-]+)[^|]*\|.*?\]\((docs/[^)#]+\.md)\)", re.M)


def _prose(path: Path) -> str:
    return _FENCE.sub("", path.read_text(encoding="utf-8"))


def _anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces -> hyphens."""
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", _prose(path), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def _links(path: Path) -> list[str]:
    return [t for t in _LINK.findall(_prose(path)) if not re.match(r"[a-z]+:", t)]


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/ (limit {README_MAX_LINES})"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in _links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {', '.join(broken)}"


def _command_pages() -> dict[str, Path]:
    """command name -> the docs page the README's command table links it to."""
    return {cmd: ROOT / page for cmd, page in _ROW.findall(README.read_text(encoding="utf-8"))}


def test_every_command_has_a_page() -> None:
    commands = main.list_commands(click.Context(main))
    pages = _command_pages()
    missing = [c for c in commands if c not in pages]
    assert not missing, f"commands without a row and docs link in the README's command table: {missing}"
    for cmd in commands:
        assert pages[cmd].is_file(), f"{cmd}: {pages[cmd]} does not exist"
        assert f"weightops {cmd}" in pages[cmd].read_text(encoding="utf-8"), f"{pages[cmd].name} never names {cmd}"


def _options(command: click.Command) -> list[str]:
    # hidden options are what one weightops process passes another (the job runner's), not the user's
    found = [
        o for p in command.params if isinstance(p, click.Option) and not p.hidden for o in p.opts if o.startswith("--")
    ]
    for sub in getattr(command, "commands", {}).values():
        found += _options(sub)
    return [o for o in found if o != "--help"]


def test_every_option_is_documented() -> None:
    pages = _command_pages()
    undocumented = []
    for name, command in all_commands().items():
        text = pages[name].read_text(encoding="utf-8")
        undocumented += [
            f"{name} {o} ({pages[name].name})"
            for o in _options(command)
            if not re.search(re.escape(o) + r"(?![\w-])", text)
        ]
    assert not undocumented, f"options missing from their docs page: {', '.join(undocumented)}"
