"""Per-position traces and their views: the HTML trace viewer, the terminal canvases of
``generate --trace``, the live view of ``generate --live`` and the ``--html`` option."""

from __future__ import annotations

import html.parser
import os
import pty
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dlm_decode
from dlm_decode import cli
from dlm_decode.decoder import Decoder, TraceStep
from dlm_decode.trace_view import (
    COUNTERFACTUAL_RULES,
    LiveView,
    TokenText,
    Trace,
    check_writable,
    format_step,
)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["reverse: abcdefghij\n", "sort: 5143132214512231\n"]
ACTIONS = {"commit", "edit", "remask", "fill", "none"}


@pytest.fixture(scope="module")
def model():
    return dlm_decode.load_model("tiny", device="cpu")


def _ids(model, prompts=PROMPTS):
    return [model.tokenizer(p)["input_ids"] for p in prompts]


def _run(model, policy, trace, **kw):
    kw.setdefault("gen_length", 32)
    kw.setdefault("block_length", 16)
    return dlm_decode.generate(model, _ids(model), policy=policy, trace=trace, **kw)


CASES = [
    ("factor", {}),
    ("threshold", {}),
    ("frechet", {"early_stop": True}),
    ("fixed.v2:score=random", {"steps": 32, "temperature": 0.8, "seed": 3}),
    ("margin", {}),
    ("fixed.v2:score=entropy", {"steps": 16}),
]


@pytest.mark.parametrize(("policy", "kw"), CASES, ids=[c[0] for c in CASES])
def test_traced_decode_is_the_untraced_decode(model, policy, kw) -> None:
    plain = _run(model, policy, False, **kw)
    traced = _run(model, policy, True, **kw)
    seen: list[TraceStep] = []
    hooked = Decoder(model, policy=policy, gen_length=32, block_length=16, **kw).generate(
        _ids(model), on_step=seen.append
    )
    assert plain.trace is None and hooked.trace is None
    for other in (traced, hooked):
        assert torch.equal(other.sequences, plain.sequences)
        assert other.nfe == plain.nfe
        assert torch.equal(other.commit_counts, plain.commit_counts)
    assert len(traced.trace) == len(seen) == traced.nfe
    assert [s.actions for s in seen] == [s.actions for s in traced.trace]


@pytest.mark.parametrize(("policy", "kw"), CASES, ids=[c[0] for c in CASES])
def test_per_position_records_are_consistent(model, policy, kw) -> None:
    out = _run(model, policy, True, **kw)
    trace = out.trace
    assert isinstance(trace, Trace) and isinstance(trace, list)
    mask = model.mask_token_id
    for k, st in enumerate(trace):
        assert st.block_start == out.prompt_length + st.block * 16
        for r in range(len(PROMPTS)):
            assert len(st.before[r]) == len(st.after[r]) == len(st.actions[r]) == 16
            assert set(st.actions[r]) <= ACTIONS
            rows = zip(st.before[r], st.after[r], st.actions[r], strict=True)
            for i, (b, a, act) in enumerate(rows):
                if act == "commit":
                    assert b is None and a is not None and st.written[r][i] is not None
                elif act == "remask":
                    assert b is not None and a is None
                elif act == "none":
                    assert a == b
                assert st.proposals[r][i] != mask
            # The legacy summaries come from the per-position data.
            masked = [st.confidences[r][i] for i, b in enumerate(st.before[r]) if b is None]
            assert st.profiles[r] == sorted(masked, reverse=True)
            assert st.committed[r] == st.actions[r].count("commit") == len(st.tokens[r])
            assert st.positions[r] == [
                st.block_start + i for i, a in enumerate(st.actions[r]) if a == "commit"
            ]
        nxt = trace[k + 1] if k + 1 < len(trace) else None
        if nxt is not None and nxt.block == st.block:
            assert nxt.before == st.after  # the next step starts where this one ended
    # The final state of each block is the decoded sequence.
    last = {st.block: st for st in trace}
    for st in last.values():
        seq = out.sequences[:, st.block_start : st.block_start + 16].tolist()
        assert [[mask if v is None else v for v in row] for row in st.after] == seq


def test_declared_signals_are_those_the_policy_saw(model) -> None:
    """``fixed.v2:score=random`` commits the masked position with the highest uniform
    noise: the recorded noise (a replay of the decode's generator) must say so."""
    out = _run(model, "fixed.v2:score=random", True, steps=32, temperature=0.8, seed=3)
    for st in out.trace:
        assert set(st.signals) == {"uniform"}
        for r in range(len(PROMPTS)):
            masked = [i for i, b in enumerate(st.before[r]) if b is None]
            if not masked:
                continue
            best = max(masked, key=lambda i: st.signals["uniform"][r][i])
            assert [i for i, a in enumerate(st.actions[r]) if a == "commit"] == [best]
    top = _run(model, "margin", True).trace[0]
    assert set(top.signals) == {"topk"} and len(top.signals["topk"][0][0]) == 2
    ids, probs = zip(*top.signals["topk"][0][0], strict=True)
    assert probs[0] >= probs[1] and ids[0] == top.proposals[0][0]
    assert _run(model, "frechet", True).trace[0].signals == {}


def test_criterion_and_counterfactuals_are_the_rules_own(model) -> None:
    out = _run(model, "factor", True)
    labels = [label for label, _ in out.trace.counterfactual(0)]
    assert [lab.split("(")[0] for lab in labels] == list(COUNTERFACTUAL_RULES)
    for k, st in enumerate(out.trace):
        crit = st.criteria[0]
        if st.profiles[0]:
            assert crit["bound_name"] == "f" and crit["passes"] == "below"
            assert len(crit["values"]) == len(st.profiles[0])
        # Driven by factor at its defaults: factor's counterfactual is what it committed.
        counts = dict(out.trace.counterfactual(k))
        assert counts["factor(factor=0.75)"] == st.committed[0]
    fr = _run(model, "frechet", True)
    assert fr.trace[0].criteria[0]["name"].startswith("G_n")
    for k, st in enumerate(fr.trace):
        assert dict(fr.trace.counterfactual(k, row=1))["frechet(margin=0.25)"] == st.committed[1]


# -- HTML ------------------------------------------------------------------------------


class _Collect(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sections: list[dict[str, str]] = []
        self.cells: list[tuple[int, int, dict[str, str]]] = []  # (section, row, attrs)
        self.row = -1
        self.tags: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        self.tags.append((tag, a))
        if tag == "section" and "step" in a.get("class", "").split():
            self.sections.append(a)
        if tag == "div" and a.get("class") == "row":
            self.row = int(a["data-row"])
        if tag == "span" and "pos" in a.get("class", "").split() and "data-pos" in a:
            self.cells.append((len(self.sections) - 1, self.row, a))


def test_html_has_a_section_per_step_with_the_traced_states(model) -> None:
    out = _run(model, "factor", True)
    page = out.trace.to_html(model.tokenizer)
    p = _Collect()
    p.feed(page)
    p.close()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert len(p.sections) == len(out.trace) == out.nfe
    assert [int(s["data-index"]) for s in p.sections] == list(range(out.nfe))
    assert len(p.cells) == out.nfe * len(PROMPTS) * 16
    text = TokenText(model.tokenizer)
    for sec, row, a in p.cells:
        st = out.trace[sec]
        i = int(a["data-offset"])
        assert int(a["data-pos"]) == st.block_start + i
        assert a["data-action"] == st.actions[row][i]
        assert a["data-before"] == ("" if st.before[row][i] is None else str(st.before[row][i]))
        assert a["data-after"] == ("" if st.after[row][i] is None else str(st.after[row][i]))
        assert ("s-masked" in a["class"].split()) == (st.after[row][i] is None)
        assert f"{st.confidences[row][i]:.3f}" in a["title"]
        assert repr(text.full(st.proposals[row][i])) in a["title"]
    sec0 = p.sections[0]
    assert int(sec0["data-block"]) == out.trace[0].block
    # the rule's own bound is drawn, and the counterfactual table is there
    assert page.count('class="bound"') >= 1 and "f = 0.75" in page
    assert all(label in page for label, _ in out.trace.counterfactual(0))


def test_html_is_self_contained(model) -> None:
    page = _run(model, "frechet", True).trace.to_html(model.tokenizer)
    p = _Collect()
    p.feed(page)
    low = page.lower()
    for bad in ("http://", "https://", "src=", "<link", "@import", "url("):
        assert bad not in low, bad
    assert all(tag not in ("img", "iframe", "link", "object", "embed") for tag, _ in p.tags)
    scripts = [a for tag, a in p.tags if tag == "script"]
    assert scripts == [{}]  # one inline script, no src
    assert 'id="slider"' in page and "<svg" in page


def test_ids_without_tokenizer_and_notebook_repr(model) -> None:
    out = _run(model, "threshold", True)
    page = out.trace.to_html()
    first = next(v for v in out.trace[0].after[0] if v is not None)
    assert f">{first}<small>" in page  # ids, not text
    frame = out.trace._repr_html_()
    assert frame.startswith("<iframe srcdoc=") and "&lt;section class=&quot;step&quot;" in frame


def test_a_list_trace_still_renders_and_empty_trace(model) -> None:
    steps = list(_run(model, "threshold", True).trace)
    again = Trace(steps, policy="threshold").to_html()
    assert again.count('<section class="step"') == len(steps)
    assert Trace().to_html().count('<section class="step"') == 0


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_html_renders_in_a_headless_browser(model, tmp_path: Path) -> None:
    out = _run(model, "factor", True)
    path = out.trace.save_html(tmp_path / "trace.html", model.tokenizer)
    cmd = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--dump-dom",
        f"{path.as_uri()}#step-2",
    ]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    assert 'data-ready="1"' in dom  # the script ran
    p = _Collect()
    p.feed(dom)
    shown = [s for s in p.sections if "hidden" not in s]
    assert len(p.sections) == out.nfe and [s["data-index"] for s in shown] == ["2"]


# -- terminal --------------------------------------------------------------------------


def test_format_step_marks_commits_and_confidences(model) -> None:
    out = _run(model, "factor", True)
    text = TokenText(model.tokenizer, model.eos_token_ids)
    st = next(s for s in out.trace if 0 < s.committed[0] < 16)
    lines = format_step(st, text)
    assert lines[0].startswith(f"block {st.block} step {st.step}: commit {st.committed[0]}")
    canvas, marks = lines[1], lines[2]
    cells = canvas.split()
    assert len(cells) == 16 and cells.count("_") == sum(a is None for a in st.after[0])
    assert marks.count("^") == st.committed[0]
    assert lines[-1].startswith("  conf: ") and lines[-1].count("@") == st.committed[0]
    colored = format_step(st, text, color=True)
    assert "\x1b[" in colored[1] and "^" not in "".join(colored[1:-1])


def test_live_view_plain_and_ansi(model) -> None:
    import io

    plain = io.StringIO()
    view = LiveView(plain, 32, 16, TokenText(model.tokenizer), ansi=False)
    out = Decoder(model, policy="factor", gen_length=32, block_length=16).generate(
        _ids(model)[:1], on_step=view
    )
    lines = plain.getvalue().splitlines()
    assert len(lines) == out.nfe and "\x1b" not in plain.getvalue()
    assert lines[-1].endswith(TokenText(model.tokenizer)(out.responses[0, -1].item()))
    fancy = io.StringIO()
    view = LiveView(fancy, 32, 16, TokenText(model.tokenizer), ansi=True)
    Decoder(model, policy="factor", gen_length=32, block_length=16).generate(
        _ids(model)[:1], on_step=view
    )
    view.close()
    s = fancy.getvalue()
    assert s.count("\x1b[J") == out.nfe - 1 and s.endswith("\x1b[?25h")


def _pty_run(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT, close_fds=True
    )
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            proc.kill()
            break
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode("utf-8", "replace")


def test_live_view_redraws_under_a_pseudo_terminal() -> None:
    env = {**os.environ, "TERM": "xterm-256color", "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "dlm_decode", "generate", "--device", "cpu", "--live"]
    args += ["--policy", "factor", "--gen-length", "32", "--block-length", "16", PROMPTS[0]]
    rc, out = _pty_run(args, env)
    assert rc == 0, out
    assert "\x1b[?25l" in out and out.count("\x1b[J") >= 2  # redrawn in place
    assert "\x1b[" in out and "F\x1b[J" in out  # cursor back up to the frame's first line
    assert "\x1b[?25h" in out  # cursor shown again
    assert "block 1 step" in out
    final = [ln for ln in out.replace("\r", "").splitlines() if ln.startswith("-- ")]
    assert final and "NFE" in final[-1]
    text = out.replace("\r", "").split("\x1b[?25h", 1)[1].splitlines()
    assert any(ln.strip() and not ln.startswith("--") for ln in text)  # the final text
    dumb = {**env, "TERM": "dumb"}
    rc, plain = _pty_run(args, dumb)
    assert rc == 0 and "\x1b[" not in plain and "block 0 step 0 · NFE 1" in plain


def test_cli_trace_prints_canvases(model, capsys) -> None:
    rc = cli.main(
        [
            *("generate", "--device", "cpu", "--policy", "factor", "--gen-length", "32"),
            *("--block-length", "16", "--trace", PROMPTS[0]),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out.splitlines()
    heads = [ln for ln in out if ln.startswith("block ")]
    assert heads[0].startswith("block 0 step 0: commit ")
    assert any("_" in ln.split() for ln in out)  # masked positions in a canvas
    assert any(set(ln.strip()) == {"^", " "} or set(ln.strip()) == {"^"} for ln in out)
    assert any(ln.startswith("  conf: ") for ln in out)
    assert "profile [" not in "\n".join(out)


def test_cli_html_writes_the_viewer(tmp_path: Path, capsys) -> None:
    path = tmp_path / "sub" / "trace.html"
    rc = cli.main(
        [
            *("generate", "--device", "cpu", "--gen-length", "32", "--block-length", "16"),
            *("--policy", "threshold", "--html", str(path), PROMPTS[1]),
        ]
    )
    assert rc == 0 and path.is_file()
    assert '<section class="step"' in path.read_text()
    assert f"trace viewer: {path}" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["file", "folder", "proc"])
def test_cli_html_unwritable_is_a_one_line_error_before_decoding(
    where: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    (tmp_path / "plain.txt").write_text("x")
    path = {
        "file": str(tmp_path / "plain.txt" / "trace.html"),  # under a file
        "folder": str(tmp_path),
        "proc": "/proc/no-such-dir/trace.html",
    }[where]

    def no_model(args):
        raise AssertionError("the model loaded before --html was checked")

    monkeypatch.setattr(cli, "_load", no_model)
    monkeypatch.setattr(Decoder, "generate", no_model)
    rc = cli.main(["generate", "--device", "cpu", "--html", path, "x"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("dlm-decode: error: --html")


def test_check_writable_accepts_a_new_file(tmp_path: Path) -> None:
    assert check_writable(tmp_path / "a" / "b.html") == tmp_path / "a" / "b.html"
    with pytest.raises(ValueError, match="folder"):
        check_writable(tmp_path)
