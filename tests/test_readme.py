"""What README.md and docs/*.md show runs as written: every Python snippet, every shown output, every relative link.

Conventions for the pages:
- Every ```python block runs, in a fresh namespace, in a temporary working directory. A block that needs a GPU,
  ImageNet or a download is marked by a ``<!-- no-test -->`` line just before its fence, and only then skipped.
- A ```text block right after a snippet, marked ``<!-- prints -->``, is what the snippet prints, line for line.
- A ```console block shows ``$ python ...`` and the command's output; a ``...`` line stands for any lines.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NO_TEST, PRINTS = "<!-- no-test -->", "<!-- prints -->"
MIN_SNIPPETS = 10  # the pages hold at least this many snippets that run: a parser that finds none must fail


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    marker: str  # the HTML comment on the line before the fence, or ""
    prints: str | None = None  # for a python block: the <!-- prints --> block after it

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def fenced_blocks(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = re.fullmatch(r"```(\w*)\s*", lines[i])
        if not opening:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
        before = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        marker = before if before.startswith("<!--") else ""
        blocks.append(Block(page, i + 1, opening.group(1), "\n".join(lines[i + 1 : end]) + "\n", marker))
        i = end + 1
    for block, after in zip(blocks, blocks[1:]):
        if block.lang == "python" and after.marker == PRINTS:
            block.prints = after.text
    return blocks


BLOCKS = [block for page in PAGES for block in fenced_blocks(page)]
SNIPPETS = [b for b in BLOCKS if b.lang == "python"]
CONSOLES = [b for b in BLOCKS if b.lang == "console"]


def assert_shows(shown: str, out: str) -> None:
    """``out`` is ``shown`` line for line (trailing spaces aside), where a ``...`` line stands for any lines."""
    want = [line.rstrip() for line in shown.strip("\n").splitlines()]
    got = "".join(line.rstrip() + "\n" for line in out.strip("\n").splitlines())
    pattern = "".join(r"(?:.*\n)*?" if line == "..." else re.escape(line) + r"\n" for line in want)
    assert re.fullmatch(pattern, got), f"the page shows:\n{shown}\nbut it printed:\n{out}"


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.id for s in SNIPPETS])
def test_snippet_runs_and_prints_what_the_page_shows(snippet, tmp_path, monkeypatch, capsys):
    if snippet.marker == NO_TEST:
        pytest.skip("marked <!-- no-test -->: needs a GPU, ImageNet or a download")
    monkeypatch.chdir(tmp_path)  # snippets that write run folders write them here
    try:
        exec(compile(snippet.text, snippet.id, "exec"), {"__name__": "__main__"})
    finally:
        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close("all")
    if snippet.prints is not None:
        assert_shows(snippet.prints, capsys.readouterr().out)


@pytest.mark.parametrize("block", CONSOLES, ids=[b.id for b in CONSOLES])
def test_shown_command_output_is_current(block):
    commands = re.split(r"^\$ ", block.text, flags=re.M)[1:]
    assert commands, f"{block.id}: a console block shows at least one `$ python ...` command"
    for command in commands:
        line, _, shown = command.partition("\n")
        argv = shlex.split(line)
        assert argv[0] == "python", f"{block.id}: only python commands are checked, not {line!r}"
        out = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0, f"{line} failed:\n{out.stderr}"
        assert_shows(shown, out.stdout)


def test_the_pages_hold_snippets_that_run():
    runnable = [s.id for s in SNIPPETS if s.marker != NO_TEST]
    assert len(runnable) >= MIN_SNIPPETS, runnable
    assert {p.name for p in PAGES} >= {"README.md", "surgery.md", "training.md", "analysis.md", "results.md",
                                       "benchmarks.md", "zoo.md", "design.md"}
    orphans = [b.id for b in BLOCKS if b.marker == PRINTS and not any(s.prints is b.text for s in SNIPPETS)]
    assert not orphans, f"a <!-- prints --> block must follow a python snippet: {orphans}"


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    headings = re.findall(r"^#+\s+(.*)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_points_at_a_file_that_exists(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)  # links in code are not links
    broken = []
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def test_the_zoo_summary_on_its_page_is_what_zoo_py_writes_from_the_csv(monkeypatch):
    spec = importlib.util.spec_from_file_location("zoo", ROOT / "benchmarks" / "zoo.py")
    zoo = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "zoo", zoo)  # its dataclass looks its module up
    spec.loader.exec_module(zoo)
    text = zoo.SUMMARY_PAGE.read_text()
    assert zoo.BEGIN in text and zoo.END in text, f"{zoo.SUMMARY_PAGE} lost the zoo summary's markers"
    block = text.split(zoo.BEGIN, 1)[1].split(zoo.END, 1)[0].strip("\n")
    rows = {key: row for key, row in zoo.read_rows().items() if row.model not in zoo.TOO_LARGE}
    assert block == zoo.summary_markdown(rows)
