"""The documentation's code runs and the site builds.

A ```` ```python ```` block in ``docs/**/*.md`` preceded by the line ``<!-- runnable -->``
is executed here, each in a fresh namespace; the marker is an HTML comment, so it does not
show on the site.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MARKER = "<!-- runnable -->"
FENCE_OPEN = re.compile(r"^```(?:python|py)\b")


@dataclass(frozen=True)
class CodeBlock:
    """A runnable code block: its file, first line (1-based) and source."""

    path: Path
    line: int
    source: str

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def runnable_blocks(path: Path) -> list[CodeBlock]:
    """The code blocks marked runnable in one Markdown file.

    Raises:
        AssertionError: a marker not followed by a Python fence, or an unclosed fence.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        assert j < len(lines) and FENCE_OPEN.match(lines[j]), (
            f"{path}:{i + 1}: {MARKER} must be followed by a ```python block"
        )
        end = j + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        assert end < len(lines), f"{path}:{j + 1}: unclosed code block"
        blocks.append(CodeBlock(path, j + 2, "\n".join(lines[j + 1 : end]) + "\n"))
    return blocks


ALL_BLOCKS = [b for md in sorted(DOCS.rglob("*.md")) for b in runnable_blocks(md)]


def test_concepts_worked_example_is_a_runnable_block() -> None:
    rules = [b for b in ALL_BLOCKS if b.path == DOCS / "concepts" / "rules.md"]
    assert any("frechet_scores" in b.source and "== 4" in b.source for b in rules)


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=str)
def test_runnable_docs_block_executes(block: CodeBlock) -> None:
    code = compile(block.source, str(block), "exec")
    namespace = {"__name__": f"docs_block_{block.line}"}
    exec(code, namespace)


def test_marker_without_python_fence_is_reported(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(f"{MARKER}\n\n```bash\necho hi\n```\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="must be followed"):
        runnable_blocks(page)


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("mkdocs", "material", "mkdocstrings")),
    reason="needs mkdocs-material and mkdocstrings[python]",
)
def test_mkdocs_build_strict_passes(tmp_path: Path) -> None:
    """``mkdocs build --strict``: broken links, unresolved API references, missing snippet
    files and docstrings that do not parse are all errors."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
