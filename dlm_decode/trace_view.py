"""Views of a traced decode: one self-contained HTML file, and terminal canvases.

A decode run with ``trace=True`` keeps a [`Trace`][dlm_decode.trace_view.Trace] in
``GenerationResult.trace``: a list of [`TraceStep`][dlm_decode.decoder.TraceStep] records
(what every position of the active block was before the step, its proposal, confidence,
declared signals and what the step did there) that also renders itself:

* [`Trace.to_html`][dlm_decode.trace_view.Trace.to_html]: one HTML file (inline CSS and
  JavaScript, nothing fetched) with a step slider, the block's canvas coloured by state and
  by the step each token was committed at, the sorted confidence profile with the active
  rule's own bound (what its [`ProfileCriterion`][dlm_decode.interfaces.ProfileCriterion]
  declares), and how many positions each built-in count rule would have committed from the
  same profile; ``_repr_html_`` shows it in Jupyter;
* [`format_step`][dlm_decode.trace_view.format_step]: a step as text lines (``dlm-decode
  generate --trace``);
* [`LiveView`][dlm_decode.trace_view.LiveView]: a per-step hook for
  [`Decoder.generate`][dlm_decode.decoder.Decoder.generate] that redraws the response in a
  terminal as it is decoded (``--live``).

This module reads traces only; it imports nothing of the decoder.
"""

from __future__ import annotations

import colorsys
import html
import os
import tempfile
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import IO, Any

import torch

from dlm_decode.interfaces import StepState
from dlm_decode.settings import resolve_plugin

#: A [`TraceStep`][dlm_decode.decoder.TraceStep] (this module does not import the decoder,
#: which imports it).
TraceStep = Any

__all__ = [
    "COUNTERFACTUAL_RULES",
    "LiveView",
    "TokenText",
    "Trace",
    "ansi_enabled",
    "check_writable",
    "format_step",
]

COUNTERFACTUAL_RULES: tuple[str, ...] = ("threshold", "factor", "frechet")
"""The count rules whose counterfactual commit counts the HTML view shows, each at its own
defaults (resolved through the registry, so the values are the rules' own)."""

#: The mask, as a canvas shows it.
MASK = "_"
#: Action → the marker under a position in plain text.
_MARKS = {"commit": "^", "edit": "e", "remask": "r", "fill": "f", "none": " "}
#: Action → ANSI colour (SGR) in a terminal.
_SGR = {"commit": "1;30;42", "edit": "1;30;43", "remask": "1;37;41", "fill": "2"}


class TokenText:
    """Token ids as short visible text (cached per id).

    Whitespace is made visible (``␣``, ``⏎``, ``⇥``); special tokens (the tokenizer's
    ``all_special_ids``) are one glyph in a canvas, ``∎`` for an end-of-sequence id and
    ``¤`` for the others, and their full name in [`full`][dlm_decode.trace_view.TokenText.full].

    Args:
        tokenizer: a tokenizer with ``decode`` (or ``convert_ids_to_tokens``); ``None``
            shows the ids themselves.
        eos_token_ids: ids shown as ``∎`` (default: the tokenizer's ``eos_token_id``).
    """

    def __init__(self, tokenizer: Any = None, eos_token_ids: Iterable[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.eos = set(eos_token_ids)
        eos = getattr(tokenizer, "eos_token_id", None)
        if isinstance(eos, int):
            self.eos.add(eos)
        special = getattr(tokenizer, "all_special_ids", None) or ()
        self.special = {int(i) for i in special} | self.eos
        self._cache: dict[int, str] = {}
        self._full: dict[int, str] = {}

    def __call__(self, token: int | None) -> str:
        """The short text of one id (``_`` for ``None``, the mask)."""
        if token is None:
            return MASK
        if token not in self._cache:
            if self.tokenizer is not None and token in self.special:
                self._cache[token] = "∎" if token in self.eos else "¤"
            else:
                self._cache[token] = self.full(token)
        return self._cache[token]

    def full(self, token: int | None) -> str:
        """The whole text of one id (special tokens by name), whitespace made visible."""
        if token is None:
            return "masked"
        if token not in self._full:
            self._full[token] = self._text(token)
        return self._full[token]

    def _text(self, token: int) -> str:
        tok = self.tokenizer
        if tok is None:
            return str(token)
        text = ""
        try:
            text = tok.decode([token])
        except Exception:  # any tokenizer failure: fall back to the vocabulary entry
            text = ""
        if not text and hasattr(tok, "convert_ids_to_tokens"):
            text = str(tok.convert_ids_to_tokens(token) or "")
        if not text:
            return f"#{token}"
        return text.replace("\n", "⏎").replace("\t", "⇥").replace("\r", "␍").replace(" ", "␣")


# --------------------------------------------------------------------------------------
# The trace
# --------------------------------------------------------------------------------------


@cache
def _rule(name: str) -> tuple[str, Any]:
    ref, policy = resolve_plugin(name, "policy")
    return ref.label, policy


class Trace(list):
    """The steps of a traced decode: a list of
    [`TraceStep`][dlm_decode.decoder.TraceStep] that renders itself.

    Args:
        steps: the records.
        policy: the label of the policy that drove the decode.
        block_length: the decode's block length.
        tokenizer: the tokenizer ``_repr_html_`` maps tokens with (``None``: ids).

    Examples:
        >>> import dlm_decode
        >>> model = dlm_decode.load_model("tiny")
        >>> ids = model.tokenizer("sort: 5143132214512231\\n")["input_ids"]
        >>> out = dlm_decode.generate(model, [ids], policy="frechet", gen_length=16,
        ...                           block_length=16, trace=True)
        >>> page = out.trace.to_html(model.tokenizer)
        >>> page.startswith("<!DOCTYPE html>"), page.count('<section class="step"') == out.nfe
        (True, True)
    """

    def __init__(
        self,
        steps: Iterable[TraceStep] = (),
        *,
        policy: str = "",
        block_length: int = 0,
        tokenizer: Any = None,
    ) -> None:
        super().__init__(steps)
        self.policy = policy
        self.block_length = block_length
        self.tokenizer = tokenizer

    # -- derived views ------------------------------------------------------------------
    def commit_steps(self) -> list[list[list[int | None]]]:
        """Per step, row and block position: the step (within the block) at which the token
        there after the step was written; ``-1`` for a position filled before the block
        started (or by early stop), ``None`` where masked."""
        out: list[list[list[int | None]]] = []
        at: list[list[int | None]] = []
        for k, st in enumerate(self):
            if k == 0 or st.block != self[k - 1].block or st.step == 0:
                at = [[None if b is None else -1 for b in row] for row in st.before]
            at = [list(row) for row in at]
            for r, row in enumerate(st.actions):
                for i, a in enumerate(row):
                    if a in ("commit", "edit"):
                        at[r][i] = st.step
                    elif a == "remask":
                        at[r][i] = None
                    elif a == "fill":
                        at[r][i] = -1
            out.append(at)
        return out

    def block_steps(self) -> dict[int, int]:
        """Block index → how many steps the trace holds for it."""
        n: dict[int, int] = {}
        for st in self:
            n[st.block] = n.get(st.block, 0) + 1
        return n

    def counterfactual(self, index: int, row: int = 0) -> list[tuple[str, int]]:
        """How many positions each of the
        [`COUNTERFACTUAL_RULES`][dlm_decode.trace_view.COUNTERFACTUAL_RULES] would have
        committed at one step, from that step's profile.

        Args:
            index: the step's index in the trace.
            row: the batch row.

        Returns:
            ``(rule label, count)`` pairs, in rule order.
        """
        st = self[index]
        prof = st.profiles[row]
        m = len(prof)
        out = []
        for name in COUNTERFACTUAL_RULES:
            label, policy = _rule(name)
            if m == 0:
                out.append((label, 0))
                continue
            conf = torch.tensor([prof], dtype=torch.float32)  # (1, m)
            state = StepState(
                step=st.step,
                block_index=st.block,
                num_blocks=st.block + 1,
                steps_per_block=None,
                block_masked_at_start=torch.tensor([m]),
            )
            n = policy.counts(conf, torch.ones_like(conf, dtype=torch.bool), state)
            out.append((label, int(n[0])))
        return out

    # -- rendering ----------------------------------------------------------------------
    def to_html(
        self, tokenizer: Any = None, *, title: str | None = None, rows: Iterable[int] | None = None
    ) -> str:
        """The trace as one self-contained HTML page (inline CSS, SVG and JavaScript; no
        network access, no external file).

        Args:
            tokenizer: maps token ids to text (default: the trace's own, else the ids).
            title: the page title.
            rows: the batch rows to show (default: all).

        Returns:
            The HTML document.
        """
        return _Page(self, TokenText(tokenizer or self.tokenizer), title, rows).render()

    def save_html(self, path: str | os.PathLike[str], tokenizer: Any = None) -> Path:
        """Write [`to_html`][dlm_decode.trace_view.Trace.to_html] to ``path``; returns it."""
        out = Path(path)
        out.write_text(self.to_html(tokenizer), encoding="utf-8")
        return out

    def _repr_html_(self) -> str:
        """Jupyter's rich display: the page in an isolated frame (its styles and script
        stay inside)."""
        page = html.escape(self.to_html(), quote=True)
        return (
            f'<iframe srcdoc="{page}" style="width:100%;height:720px;border:1px solid #ddd" '
            f'sandbox="allow-scripts"></iframe>'
        )


# --------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;
color:#1f2328;background:#fff}
header{padding:12px 20px;border-bottom:1px solid #d0d7de;background:#f6f8fa}
h1{font-size:18px;margin:0 0 4px}h2{font-size:15px;margin:0 0 8px}
.meta{color:#57606a;margin:0}
.controls{display:flex;gap:8px;align-items:center;padding:8px 20px;
border-bottom:1px solid #d0d7de;position:sticky;top:0;background:#fff;z-index:2}
.controls input{flex:1}
.layout{display:flex}
nav.steps{width:170px;flex:none;max-height:calc(100vh - 140px);overflow:auto;
border-right:1px solid #d0d7de;font-size:12px}
nav.steps ol{list-style:none;margin:0;padding:4px}
nav.steps a{display:block;padding:2px 6px;color:#1f2328;text-decoration:none;border-radius:4px}
nav.steps a.current{background:#0969da;color:#fff}
main{flex:1;padding:12px 20px;min-width:0}
section.step{margin-bottom:24px}
.row{display:flex;flex-wrap:wrap;gap:16px;margin-bottom:12px}
.rowlabel{font-size:12px;color:#57606a;width:100%}
.canvas{display:flex;flex-wrap:wrap;gap:3px;max-width:640px;align-content:flex-start}
.pos{display:inline-flex;flex-direction:column;align-items:center;justify-content:center;
min-width:26px;height:38px;padding:0 3px;border-radius:4px;font:13px ui-monospace,
SFMono-Regular,Menlo,Consolas,monospace;box-sizing:border-box;cursor:default}
.pos small{font-size:9px;color:#57606a}
.s-masked{background:#eaeef2;color:#8c959f}
.s-prior{background:#fff;border:1px solid #afb8c1}
.a-commit{box-shadow:inset 0 0 0 2px #1f2328;font-weight:700}
.a-edit{box-shadow:inset 0 0 0 2px #bf8700}
.a-remask{box-shadow:inset 0 0 0 2px #cf222e;border:1px dashed #cf222e}
.a-fill{background:repeating-linear-gradient(45deg,#ddf4ff,#ddf4ff 4px,#fff 4px,#fff 8px)}
.side{display:flex;gap:12px;flex-wrap:wrap;align-items:flex-start}
table.cf{border-collapse:collapse;font-size:12px}
table.cf td,table.cf th{border:1px solid #d0d7de;padding:2px 6px;text-align:left}
table.cf tr.actual{font-weight:700;background:#f6f8fa}
.legend{display:flex;flex-wrap:wrap;gap:10px;align-items:center;font-size:12px;
padding:8px 20px;border-top:1px solid #d0d7de}
.legend .pos{height:22px;min-width:22px}
.response{font:13px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre-wrap;
word-break:break-all;margin:6px 0 0}
svg text{font:10px system-ui,sans-serif;fill:#57606a}
"""

_JS = r"""
(function(){
var secs=Array.prototype.slice.call(document.querySelectorAll('section.step'));
var links=Array.prototype.slice.call(document.querySelectorAll('nav.steps a'));
var slider=document.getElementById('slider');var label=document.getElementById('label');
var cur=0;
function show(i){if(!secs.length){return;}i=Math.max(0,Math.min(secs.length-1,i));cur=i;
secs.forEach(function(s,k){s.hidden=k!==i;});
links.forEach(function(a,k){a.className=k===i?'current':'';});
slider.value=i;label.textContent=secs[i].getAttribute('data-label');
if(links[i]&&links[i].scrollIntoView){links[i].scrollIntoView({block:'nearest'});}}
slider.addEventListener('input',function(){show(+slider.value);});
links.forEach(function(a,k){a.addEventListener('click',function(e){e.preventDefault();
show(k);});});
document.getElementById('prev').addEventListener('click',function(){show(cur-1);});
document.getElementById('next').addEventListener('click',function(){show(cur+1);});
document.addEventListener('keydown',function(e){if(e.key==='ArrowLeft'){show(cur-1);}
else if(e.key==='ArrowRight'){show(cur+1);}});
var h=/^#step-(\d+)$/.exec(location.hash);document.body.setAttribute('data-ready','1');
show(h?+h[1]:0);
})();
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _hue(step: int, steps: int) -> str:
    """The colour of a token committed at ``step`` of a block decoded in ``steps`` steps:
    blue (first step) through green to orange (last)."""
    frac = 0.0 if steps <= 1 else min(1.0, step / (steps - 1))
    r, g, b = colorsys.hls_to_rgb((210 - 180 * frac) / 360, 0.82, 0.7)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def _fmt(v: float) -> str:
    return f"{v:.3f}"


class _Page:
    """Builds the HTML of a [`Trace`][dlm_decode.trace_view.Trace]."""

    def __init__(
        self, trace: Trace, text: TokenText, title: str | None, rows: Iterable[int] | None
    ) -> None:
        self.trace = trace
        self.text = text
        self.title = title or f"dlm_decode trace · {trace.policy or 'decode'}"
        n_rows = len(trace[0].before) if trace else 0
        self.rows = list(range(n_rows)) if rows is None else list(rows)
        self.at = trace.commit_steps()
        self.per_block = trace.block_steps()

    def render(self) -> str:
        t = self.trace
        steps = len(t)
        sections = "\n".join(self._section(i) for i in range(steps))
        nav = "".join(
            f'<li><a href="#step-{i}" data-index="{i}">b{st.block} · s{st.step} · '
            f"+{sum(st.committed[r] for r in self.rows)}</a></li>"
            for i, st in enumerate(t)
        )
        blocks = len(self.per_block)
        meta = (
            f"policy {_e(t.policy or '?')} · {steps} steps (NFE) · {blocks} block"
            f"{'s' if blocks != 1 else ''} of {t.block_length or '?'} positions"
        )
        return (
            "<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(self.title)}</title><style>{_CSS}</style></head>\n<body>\n"
            f'<header><h1>{_e(self.title)}</h1><p class="meta">{meta}</p>'
            f"{self._responses()}</header>\n"
            '<div class="controls"><button id="prev" type="button">◀</button>'
            f'<input id="slider" type="range" min="0" max="{max(steps - 1, 0)}" value="0" '
            'aria-label="step"><button id="next" type="button">▶</button>'
            '<span id="label"></span></div>\n'
            f'<div class="layout"><nav class="steps"><ol>{nav}</ol></nav>\n'
            f"<main>\n{sections}\n</main></div>\n"
            f"{self._legend()}\n<script>{_JS}</script>\n</body></html>\n"
        )

    def _responses(self) -> str:
        """The decoded text so far, per row: each block's state after its last step."""
        last: dict[int, Any] = {}
        for st in self.trace:
            last[st.block] = st
        out = []
        for r in self.rows:
            toks = [v for b in sorted(last) for v in last[b].after[r]]
            text = "".join(self.text(v) for v in toks)
            lab = f"row {r}: " if len(self.rows) > 1 else "response: "
            out.append(f'<p class="response">{_e(lab + text)}</p>')
        return "".join(out)

    def _section(self, i: int) -> str:
        st = self.trace[i]
        c = sum(st.committed[r] for r in self.rows)
        e = sum(len(st.edited[r]) for r in self.rows)
        m = sum(len(st.remasked[r]) for r in self.rows)
        label = f"block {st.block}, step {st.step}: {c} committed"
        if e or m:
            label += f", {e} edited, {m} remasked"
        parts = [
            f'<section class="step" id="step-{i}" data-index="{i}" data-block="{st.block}" '
            f'data-step="{st.step}" data-label="{_e(label)}">',
            f"<h2>{_e(label)}</h2>",
        ]
        for r in self.rows:
            parts.append(self._row(i, r))
        parts.append("</section>")
        return "\n".join(parts)

    def _row(self, i: int, r: int) -> str:
        st = self.trace[i]
        active = st.active[r] if r < len(st.active) else True
        head = f"row {r}" + ("" if active else " (finished: not in this step)")
        cells = "".join(self._cell(i, r, k) for k in range(len(st.before[r])))
        return (
            f'<div class="row" data-row="{r}"><div class="rowlabel">{_e(head)}</div>'
            f'<div class="canvas">{cells}</div>'
            f'<div class="side">{self._profile_svg(st, r)}{self._cf_table(i, r)}</div></div>'
        )

    def _cell(self, i: int, r: int, k: int) -> str:
        st = self.trace[i]
        before, after = st.before[r][k], st.after[r][k]
        action = st.actions[r][k]
        at = self.at[i][r][k]
        prop, conf = st.proposals[r][k], st.confidences[r][k]
        classes = ["pos", f"a-{action}"]
        style = ""
        if after is None:
            classes.append("s-masked")
        elif at is None or at < 0:
            classes.append("s-prior")
        else:
            style = f' style="background:{_hue(at, self.per_block.get(st.block, 1))}"'
        lines = [
            f"position {st.block_start + k} (block offset {k})",
            f"before: {'masked' if before is None else repr(self.text.full(before))}",
            f"proposal: {self.text.full(prop)!r} (id {prop}), confidence {_fmt(conf)}",
            f"action: {action}",
        ]
        if after is not None:
            lines.append(f"now: {self.text.full(after)!r} (id {after})")
            if at is not None and at >= 0:
                lines.append(f"committed at step {at} of block {st.block}")
        for name, values in st.signals.items():
            v = values[r][k]
            if name == "topk":
                v = ", ".join(f"{self.text.full(int(t))!r} {_fmt(p)}" for t, p in v)
            else:
                v = _fmt(v)
            lines.append(f"{name}: {v}")
        shown = self.text(after) if after is not None else MASK
        small = f"{conf:.2f}".lstrip("0") if conf < 0.995 else "1.0"
        if after is not None and action not in ("commit", "edit"):
            small = "&nbsp;"
        return (
            f'<span class="{" ".join(classes)}"{style} data-pos="{st.block_start + k}" '
            f'data-offset="{k}" data-before="{"" if before is None else before}" '
            f'data-after="{"" if after is None else after}" data-action="{action}" '
            f'data-committed-at="{"" if at is None else at}" '
            f'title="{_e(chr(10).join(lines))}">{_e(shown)}<small>{small}</small></span>'
        )

    def _profile_svg(self, st: TraceStep, r: int) -> str:
        """The sorted profile (bars; dark where committed) and the rule's own criterion
        against its bound."""
        prof = st.profiles[r]
        if not prof:
            return '<p class="rowlabel">no masked position: nothing to sort</p>'
        # Which sorted entries were committed (sorted like the profile: by confidence).
        masked = [k for k, b in enumerate(st.before[r]) if b is None]
        masked.sort(key=lambda k: -st.confidences[r][k])
        done = [st.actions[r][k] == "commit" for k in masked]
        crit = st.criteria[r] if r < len(st.criteria) else None
        same = crit is not None and _close(crit["values"], prof)
        charts = [self._chart(prof, done, "sorted profile c(n)", 0.0, 1.0, crit if same else None)]
        if crit is not None and not same:
            charts.append(self._criterion_chart(crit, done))
        return "".join(charts)

    def _chart(
        self,
        prof: list[float],
        done: list[bool],
        name: str,
        lo: float,
        hi: float,
        crit: dict[str, Any] | None,
    ) -> str:
        w, h, pad = 300, 150, 28
        m = len(prof)
        bw = (w - pad - 6) / m
        y = _scale(lo, hi, h - 18, 18)
        bars = "".join(
            f'<rect x="{pad + j * bw + 0.5:.1f}" y="{y(c):.1f}" width="{max(bw - 1, 0.5):.1f}" '
            f'height="{y(lo) - y(c):.1f}" fill="{"#0969da" if d else "#afb8c1"}">'
            f"<title>n={j + 1}: c={_fmt(c)}{' (committed)' if d else ''}</title></rect>"
            for j, (c, d) in enumerate(zip(prof, done, strict=True))
        )
        extra = self._bound(crit, y, pad, w) if crit is not None else ""
        return (
            f'<svg class="profile" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
            f'role="img" aria-label="{_e(name)}">'
            f'<text x="{pad}" y="10">{_e(name)} · {sum(done)} of {m} committed</text>'
            f"{_axes(pad, w, h, y, lo, hi)}{bars}{extra}</svg>"
        )

    def _criterion_chart(self, crit: dict[str, Any], done: list[bool]) -> str:
        values = crit["values"]
        w, h, pad = 300, 150, 28
        m = len(values)
        lo = min(0.0, crit["bound"], *values)
        hi = max(crit["bound"], *values)
        hi = hi + 0.08 * (hi - lo or 1.0)
        y = _scale(lo, hi, h - 18, 18)
        step = (w - pad - 6) / m
        pts = [(pad + (j + 0.5) * step, y(v)) for j, v in enumerate(values)]
        line = " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)
        dots = "".join(
            f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" '
            f'fill="{"#1a7f37" if _passes(v, crit) else "#cf222e"}" '
            f'stroke="{"#1f2328" if d else "none"}"><title>n={j + 1}: {_fmt(v)} '
            f"({'passes' if _passes(v, crit) else 'fails'}){' · committed' if d else ''}"
            f"</title></circle>"
            for j, ((a, b), v, d) in enumerate(zip(pts, values, done, strict=True))
        )
        name = f"{crit['name']} vs {crit['bound_name']}"
        return (
            f'<svg class="criterion" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
            f'role="img" aria-label="{_e(name)}">'
            f'<text x="{pad}" y="10">{_e(name)} (passes {_e(crit["passes"])})</text>'
            f"{_axes(pad, w, h, y, lo, hi)}"
            f'<polyline points="{line}" fill="none" stroke="#57606a" stroke-width="1"/>'
            f"{self._bound(crit, y, pad, w)}{dots}</svg>"
        )

    @staticmethod
    def _bound(crit: dict[str, Any], y: Callable[[float], float], pad: int, w: int) -> str:
        yb = y(crit["bound"])
        return (
            f'<line class="bound" x1="{pad}" x2="{w - 4}" y1="{yb:.1f}" y2="{yb:.1f}" '
            f'stroke="#cf222e" stroke-dasharray="4 3" stroke-width="1.5"/>'
            f'<text x="{w - 4}" y="{yb - 3:.1f}" text-anchor="end" style="fill:#cf222e">'
            f"{_e(crit['bound_name'])} = {crit['bound']:g}</text>"
        )

    def _cf_table(self, i: int, r: int) -> str:
        st = self.trace[i]
        rows = "".join(
            f"<tr><td>{_e(label)}</td><td>{n}</td></tr>"
            for label, n in self.trace.counterfactual(i, r)
        )
        actual = (
            f'<tr class="actual"><td>{_e(self.trace.policy or "this decode")} (actual)</td>'
            f"<td>{st.committed[r]}</td></tr>"
        )
        return (
            '<table class="cf"><thead><tr><th>rule, at its defaults</th><th>would commit'
            f"</th></tr></thead><tbody>{actual}{rows}</tbody></table>"
        )

    def _legend(self) -> str:
        ramp = "".join(
            f'<span class="pos" style="background:{_hue(k, 5)}">{k}</span>' for k in range(5)
        )
        return (
            '<footer class="legend">'
            '<span class="pos s-masked">_</span> masked'
            f"{ramp} committed at step 0 … last step of the block (blue → orange)"
            '<span class="pos a-commit s-prior">x</span> committed by this step'
            '<span class="pos a-edit s-prior">x</span> edited'
            '<span class="pos a-remask s-masked">_</span> remasked'
            '<span class="pos a-fill">x</span> filled by early stop'
            '<span class="pos s-prior">x</span> filled before the block'
            " · hover a position for its proposal, confidence and signals; ← → step"
            "</footer>"
        )


def _scale(lo: float, hi: float, bottom: float, top: float) -> Callable[[float], float]:
    span = (hi - lo) or 1.0
    return lambda v: bottom - (v - lo) / span * (bottom - top)


def _axes(pad: int, w: int, h: int, y: Callable[[float], float], lo: float, hi: float) -> str:
    return (
        f'<line x1="{pad}" x2="{pad}" y1="{y(hi):.1f}" y2="{y(lo):.1f}" stroke="#8c959f"/>'
        f'<line x1="{pad}" x2="{w - 4}" y1="{y(lo):.1f}" y2="{y(lo):.1f}" stroke="#8c959f"/>'
        f'<text x="{pad - 3}" y="{y(hi) + 4:.1f}" text-anchor="end">{hi:.2g}</text>'
        f'<text x="{pad - 3}" y="{y(lo):.1f}" text-anchor="end">{lo:.2g}</text>'
        f'<text x="{(pad + w) / 2:.0f}" y="{h - 3}" text-anchor="middle">n (prefix size)</text>'
    )


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= 1e-6 for x, y in zip(a, b, strict=True))


def _passes(v: float, crit: dict[str, Any]) -> bool:
    bound, how = crit["bound"], crit["passes"]
    return v > bound if how == "above" else v >= bound if how == "at_least" else v < bound


# --------------------------------------------------------------------------------------
# Terminal
# --------------------------------------------------------------------------------------


def ansi_enabled(stream: IO[str]) -> bool:
    """Whether ``stream`` takes ANSI cursor movement and colours: a TTY, ``TERM`` set and
    not ``dumb``."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        return False
    return bool(tty) and os.environ.get("TERM", "dumb") not in ("", "dumb")


def _cells(
    tokens: list[int | None],
    actions: list[str] | None,
    text: TokenText,
    *,
    color: bool,
    width: int = 96,
) -> list[str]:
    """Canvas lines: each position's token (or ``_``), padded to a common width, with a
    marker line under each (plain text) or colours (ANSI) for the step's actions."""
    shown = [text(t) for t in tokens]
    cw = max([1, *(len(s) for s in shown)])
    per_line = max(1, width // (cw + 1))
    lines = []
    for start in range(0, len(shown), per_line):
        chunk = range(start, min(start + per_line, len(shown)))
        if color:
            cells = []
            for k in chunk:
                cell = shown[k].ljust(cw)
                sgr = _SGR.get(actions[k]) if actions else None
                if sgr is None and tokens[k] is None:
                    sgr = "2"
                cells.append(f"\x1b[{sgr}m{cell}\x1b[0m" if sgr else cell)
            lines.append(" ".join(cells))
        else:
            lines.append(" ".join(shown[k].ljust(cw) for k in chunk).rstrip())
            if actions and any(actions[k] != "none" for k in chunk):
                marks = " ".join(_MARKS[actions[k]].ljust(cw) for k in chunk)
                lines.append(marks.rstrip())
    return lines


def format_step(
    st: TraceStep, text: TokenText | None = None, *, row: int = 0, color: bool = False
) -> list[str]:
    """One traced step as text: a header, the block's canvas after the step (each
    position's token, ``_`` where masked) with the step's commits marked (``^``; ``e``
    edit, ``r`` remask, ``f`` early-stop fill) or coloured, and the confidence of each
    commit.

    Args:
        st: the step.
        text: maps ids to text (default: the ids).
        row: the batch row.
        color: ANSI colours instead of marker lines.

    Returns:
        The lines (no trailing newline).
    """
    text = text or TokenText()
    acts = st.actions[row]
    masked = sum(b is None for b in st.before[row])
    head = (
        f"block {st.block} step {st.step}: commit {st.committed[row]} of {masked} masked"
        + (f", edit {len(st.edited[row])}" if st.edited[row] else "")
        + (f", remask {len(st.remasked[row])}" if st.remasked[row] else "")
    )
    lines = [head, *("  " + s for s in _cells(st.after[row], acts, text, color=color))]
    done = [
        f"{text(st.written[row][k])}@{st.block_start + k} {st.confidences[row][k]:.2f}"
        for k, a in enumerate(acts)
        if a in ("commit", "edit")
    ]
    if done:
        lines.append("  conf: " + "  ".join(done))
    return lines


class LiveView:
    """A per-step hook that redraws the response as it is decoded (``on_step`` of
    [`Decoder.generate`][dlm_decode.decoder.Decoder.generate]).

    With ANSI (a TTY whose ``TERM`` is not ``dumb``, see
    [`ansi_enabled`][dlm_decode.trace_view.ansi_enabled]) the frame is redrawn in place
    (cursor up, clear) with colours; otherwise each step prints one plain line.

    Args:
        stream: where to draw (a text stream).
        gen_length: the decode's ``gen_length``.
        block_length: the decode's ``block_length``.
        text: maps ids to text.
        row: the batch row shown.
        ansi: force ANSI on or off (default: detect).
    """

    def __init__(
        self,
        stream: IO[str],
        gen_length: int,
        block_length: int,
        text: TokenText | None = None,
        *,
        row: int = 0,
        ansi: bool | None = None,
    ) -> None:
        self.stream = stream
        self.gen_length = gen_length
        self.block_length = block_length
        self.text = text or TokenText()
        self.row = row
        self.ansi = ansi_enabled(stream) if ansi is None else ansi
        self.canvas: list[int | None] = [None] * gen_length
        self.steps = 0
        self._drawn = 0  # lines of the last frame (ANSI)

    def __call__(self, st: TraceStep) -> None:
        """Take one step's record and redraw."""
        self.steps += 1
        start = st.block * self.block_length  # the block's offset in the response
        acts = ["none"] * self.gen_length
        for k, tok in enumerate(st.after[self.row]):
            if start + k < self.gen_length:
                self.canvas[start + k] = tok
                acts[start + k] = st.actions[self.row][k]
        done = sum(t is not None for t in self.canvas)
        head = (
            f"block {st.block} step {st.step} · NFE {self.steps} · {done}/{self.gen_length} decided"
        )
        if self.ansi:
            body = _cells(self.canvas, acts, self.text, color=True)
            frame = [head, *body]
            out = f"\x1b[{self._drawn}F\x1b[J" if self._drawn else "\x1b[?25l"
            self.stream.write(out + "\n".join(frame) + "\n")
            self._drawn = len(frame)
        else:
            cells = "".join(self.text(t) if t is not None else MASK for t in self.canvas)
            self.stream.write(f"{head} | {cells}\n")
        self.stream.flush()

    def close(self) -> None:
        """End the live view (shows the cursor again)."""
        if self.ansi and self._drawn:
            self.stream.write("\x1b[?25h")
            self.stream.flush()


def check_writable(path: str | os.PathLike[str], what: str = "--html") -> Path:
    """Check that a file can be written at ``path`` before any work (a real write test in
    the nearest existing folder; permission bits do not tell).

    Args:
        path: the file to write.
        what: the option, for the message.

    Returns:
        The path.

    Raises:
        ValueError: one line: a folder, or a location that cannot be written.
    """
    out = Path(path)
    if out.is_dir() or str(path).endswith(("/", "\\")):
        raise ValueError(f"{what} {str(path)!r} is a folder; give a file such as trace.html")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        if not parent.is_dir():
            raise NotADirectoryError(f"{parent} is not a folder")
        with tempfile.TemporaryFile(dir=parent):
            pass
        if out.exists() and not os.access(out, os.W_OK):
            raise PermissionError("the file is read-only")
    except OSError as exc:
        raise ValueError(
            f"{what} {str(path)!r} cannot be written ({exc.strerror or exc}); pick another path"
        ) from None
    return out
