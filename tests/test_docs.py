"""The documentation's code runs and the site builds.

A ```` ```python ```` block in ``docs/**/*.md`` preceded by the line ``<!-- runnable -->``
is executed here, each in a fresh namespace; the marker is an HTML comment, so it does not
show on the site.
"""

from __future__ import annotations

import doctest
import html
import importlib
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


ALL_BLOCKS = [
    b for md in [*sorted(DOCS.rglob("*.md")), ROOT / "README.md"] for b in runnable_blocks(md)
]


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


HAVE_MKDOCS = all(
    importlib.util.find_spec(m) is not None for m in ("mkdocs", "material", "mkdocstrings")
)
#: A pymdownx snippet marker, also as a formatter may have spaced it out (``--8 < --``).
RAW_MARKER = re.compile(r"-\s*-\s*8\s*<\s*-\s*-")
#: ``--8<-- "file"`` (inline form) or the block form's file lines.
INLINE_SNIPPET = re.compile(r'^--8<--\s+"([^"]+)"\s*$')


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``mkdocs build --strict`` once: broken links, unresolved API references, missing
    snippet files and docstrings that do not parse are all errors."""
    if not HAVE_MKDOCS:
        pytest.skip("needs mkdocs-material and mkdocstrings[python]")
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def page_text(path: Path) -> str:
    """A built page's text: tags stripped, entities decoded (highlighted code included)."""
    raw = path.read_text(encoding="utf-8")
    raw = re.sub(r"<(script|style)\b.*?</\1>", "", raw, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", "", raw))


def snippet_includes(md: Path, code_only: bool = True) -> list[str]:
    """The files a Markdown page includes with pymdownx.snippets (relative to its base);
    with ``code_only``, only those included inside a code fence (shown as code)."""
    lines = md.read_text(encoding="utf-8").splitlines()
    out, in_block, in_fence = [], False, False
    for line in lines:
        s = line.strip()
        if s.startswith("```"):
            in_fence = not in_fence
            continue
        m = INLINE_SNIPPET.match(s)
        if m:
            name = m.group(1)
        elif s == "--8<--":
            in_block = not in_block
            continue
        elif in_block and s:
            name = s
        else:
            continue
        if in_fence or not code_only:
            out.append(name)
    return out


def test_mkdocs_build_strict_passes(site: Path) -> None:
    assert (site / "index.html").is_file()


def test_no_built_page_shows_a_raw_snippet_marker(site: Path) -> None:
    bad = [
        str(p.relative_to(site))
        for p in sorted(site.rglob("*.html"))
        if RAW_MARKER.search(page_text(p))
    ]
    assert not bad, f"raw snippet markers on: {bad}"


def test_included_files_appear_whole_in_the_built_pages(site: Path) -> None:
    pages = 0
    for md in sorted(DOCS.rglob("*.md")):
        includes = snippet_includes(md)
        if not includes:
            continue
        rel = md.relative_to(DOCS).with_suffix("")
        built = (
            site / rel / "index.html" if rel.name != "index" else site / rel.parent / "index.html"
        )
        text = page_text(built)
        for inc in includes:
            source = (DOCS / "examples" / inc).read_text(encoding="utf-8")  # code: examples/
            missing = [ln for ln in source.splitlines() if ln.strip() and ln not in text]
            assert not missing, f"{md.relative_to(ROOT)}: {inc} lines missing: {missing[:3]}"
        pages += 1
    assert pages >= 1  # the plugin guide includes the example package


def test_snippet_include_parser_reads_both_forms(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text(
        '```python\n--8<-- "a.py"\n```\n```\n--8<--\nb.py\nc.toml\n--8<--\n```\n'
        "--8<--\ntable.md\n--8<--\n"
    )
    assert snippet_includes(page) == ["a.py", "b.py", "c.toml"]
    assert snippet_includes(page, code_only=False) == ["a.py", "b.py", "c.toml", "table.md"]


# --------------------------------------------------------------------------------------
# Docstrings
# --------------------------------------------------------------------------------------

PACKAGE_FILES = [
    p for d in ("dlm_decode", "policies", "caches") for p in sorted((ROOT / d).rglob("*.py"))
]
SPHINX_ROLE = re.compile(r":(class|meth|func|data|attr|mod|exc|obj|param|type|rtype):")


def test_docstrings_use_mkdocstrings_cross_references_not_sphinx_roles() -> None:
    bad = [
        f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
        for p in PACKAGE_FILES
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if SPHINX_ROLE.search(line) and "SPHINX_ROLE" not in line
    ]
    assert not bad, "Sphinx roles render as raw text on the site:\n" + "\n".join(bad[:20])


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("policies", "caches"):
        parts.insert(0, "dlm_decode")
    return ".".join(p for p in parts if p != "__init__")


DOCTEST_MODULES = sorted(
    _module_name(p)
    for p in PACKAGE_FILES
    if ">>>" in p.read_text(encoding="utf-8") and p.name != "__main__.py"
)


def test_some_docstrings_have_examples() -> None:
    assert {"dlm_decode.api", "dlm_decode.decoder", "dlm_decode.settings"} <= set(DOCTEST_MODULES)


@pytest.mark.parametrize("module", DOCTEST_MODULES)
def test_docstring_examples_run(module: str) -> None:
    mod = importlib.import_module(module)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(mod) if t.examples]
    assert tests
    for t in tests:
        assert "+SKIP" not in t.docstring, f"{t.name}: skipped examples never run"
        runner.run(t)
    res = runner.summarize(verbose=False)
    assert res.failed == 0, f"{module}: {res.failed} of {res.attempted} examples failed"


# --------------------------------------------------------------------------------------
# References to files
# --------------------------------------------------------------------------------------

#: A path inside this repository as docs and docstrings write it.
REPO_PATH = re.compile(
    r"(?<![\w./-])((?:dlm_decode|policies|caches|experiments|tests|docs)/[\w./-]*\w"
    r"\.(?:py|md|yaml|yml|json|toml|sh|txt|csv|png))"
)
TEXT_FILES = [
    *PACKAGE_FILES,
    *sorted(DOCS.rglob("*.md")),
    ROOT / "README.md",
    *sorted((ROOT / "experiments").rglob("*.md")),
]


def test_no_reference_to_a_file_that_is_not_in_the_repository() -> None:
    missing = []
    for path in TEXT_FILES:
        text = path.read_text(encoding="utf-8")
        for m in REPO_PATH.finditer(text):
            ref = m.group(1)
            if "*" in ref or "{" in ref or "<" in ref:
                continue
            if re.search(r"/[A-Z_]+\.", ref):  # a placeholder such as configs/NAME.yaml
                continue
            examples = [p for p in (DOCS / "examples").iterdir() if (p / ref).exists()]
            if not (ROOT / ref).exists() and not examples:
                missing.append(f"{path.relative_to(ROOT)}: {ref}")
        for name in ("DESIGN.md", "STYLE.md"):  # the steering documents live outside
            if name in text:
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, "references to missing files:\n" + "\n".join(missing)
