"""Published figures beside ours: the ``paper:`` section of a sweep config and its report.

A config that reproduces a table of a paper lists the table's rows under ``paper:``
([`PaperSpec`][dlm_decode.ablate.config.PaperSpec])
(the figures as published, with their source). After the sweep,
[`paper_report`][dlm_decode.ablate.paper.paper_report] matches every published row to the
run with the same task, shots, generation length, cache and policy (and the row's policy
arguments, when it gives them), and puts the paper's accuracy, tokens/s, total NFE and
tokens per NFE beside ours, with the ratios the paper reports: speed-up (tokens/s over
the ``baseline`` policy's) and NFE reduction (``1 − NFE / baseline NFE``) in the same
task, shots, length and cache.

Our tokens/s and tokens per NFE are given two ways, labelled:

- **ours**: response tokens (before each row's first EOS) over the decode wall time;
- **reference**: the Fast-dLLM(++) evaluation's accounting — answer tokens cut at the
  task's stop strings (lm-eval's ``until``) and re-tokenized
  ([`reference_token_counts`][dlm_decode.evaluate.reference_token_counts]), over the same
  wall time; NFE summed per sample. The reference also decodes the full generation length
  without early stop: a config that reproduces it leaves ``early_stop`` false.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from dlm_decode.ablate.config import AblationConfig, RunSpec, match_run
from dlm_decode.evaluate import summarize

__all__ = ["format_paper_report", "paper_report"]


def _group(task: str, shots: int | None, gen: int, cache: str) -> tuple[Any, ...]:
    return (task, shots, gen, cache)


def paper_report(
    cfg: AblationConfig, runs: Sequence[RunSpec], rows: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Every published row of ``cfg.paper`` beside the matching run's figures.

    Args:
        cfg: the sweep config (its ``paper`` section and tasks' shots).
        runs: the sweep's runs.
        rows: the sweep's rows.

    Returns:
        One dict per published row: the row's keys, ``paper_*`` figures with the paper's
        ``paper_speedup`` / ``paper_nfe_reduction``, and ``ours_*`` (``None`` when no run
        matches or it has no rows yet): accuracy (percent), tokens/s and tokens per NFE
        both ways (``ours_tokens_per_s`` and ``ref_tokens_per_s``, ``ours_tokens_per_nfe``
        and ``ref_tokens_per_nfe``), total NFE, ``n``, speed-up (both accountings) and NFE
        reduction vs the baseline run, and the matched run's label.
    """
    spec = cfg.paper
    if spec is None:
        return []
    by_run: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_run.setdefault(str(r.get("run_id")), []).append(r)

    def ours(run: RunSpec | None) -> dict[str, Any] | None:
        if run is None or run.run_id not in by_run:
            return None
        return summarize(by_run[run.run_id])

    published = {(_group(r.task, r.shots, r.gen_length, r.cache), r.policy): r for r in spec.rows}
    out = []
    for row in spec.rows:
        group = _group(row.task, row.shots, row.gen_length, row.cache)
        base_row = published.get((group, spec.baseline))
        run = match_run(cfg, runs, row)
        base_run = match_run(cfg, runs, row, spec.baseline, base_row.args if base_row else {})
        s, b = ours(run), ours(base_run)
        entry: dict[str, Any] = {
            **row.model_dump(exclude={"args"}),
            "args": dict(row.args),
            "run": run.label if run is not None else None,
            "paper_speedup": _ratio(row.tokens_per_s, base_row.tokens_per_s if base_row else None),
            "paper_nfe_reduction": _reduction(
                row.total_nfe, base_row.total_nfe if base_row else None
            ),
        }
        if s is None:
            entry.update(n=0, ours_accuracy=None)
        else:
            entry.update(
                n=s["n"],
                ours_accuracy=100 * s["accuracy"],
                ours_tokens_per_s=s["tokens_per_s"],
                ref_tokens_per_s=s["tokens_per_s_reference"],
                ours_total_nfe=s["nfe_total"],
                ours_tokens_per_nfe=s["tokens_per_nfe"],
                ref_tokens_per_nfe=s["tokens_per_nfe_reference"],
                ours_speedup=_ratio(s["tokens_per_s"], b["tokens_per_s"] if b else None),
                ref_speedup=_ratio(
                    s["tokens_per_s_reference"], b["tokens_per_s_reference"] if b else None
                ),
                ours_nfe_reduction=_reduction(s["nfe_total"], b["nfe_total"] if b else None),
            )
        out.append(entry)
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def _reduction(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return 1 - a / b


def _f(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return format(v, fmt)


def format_paper_report(entries: Sequence[dict[str, Any]], source: str, baseline: str) -> str:
    """The report as Markdown: per published row, the paper's figures and ours.

    Args:
        entries: [`paper_report`][dlm_decode.ablate.paper.paper_report]'s rows.
        source: the paper, for the title.
        baseline: the ratios' baseline policy.

    Returns:
        A Markdown table (``—`` where a figure is not published or not measured).
    """
    lines = [
        f"Published figures from {source} beside ours. Speed-up is tokens/s over "
        f"`{baseline}` in the same task, shots, length and cache; NFE reduction is "
        f"1 − NFE / {baseline}'s NFE. 'ours' counts response tokens before EOS; 'ref' "
        f"counts as the reference evaluation does (answer cut at the task's stop strings, "
        f"re-tokenized).",
        "",
        "| source | task | shots | gen | cache | policy | n | acc paper | acc ours "
        "| tok/s paper | tok/s ours | tok/s ref | speed-up paper | speed-up ours | speed-up ref "
        "| NFE paper | NFE ours | NFE red. paper | NFE red. ours "
        "| tok/NFE paper | tok/NFE ours | tok/NFE ref |",
        "|" + "---|" * 22,
    ]
    for e in entries:
        policy = e["policy"] + (
            "(" + ", ".join(f"{k}={v}" for k, v in e["args"].items()) + ")" if e["args"] else ""
        )
        lines.append(
            "| "
            + " | ".join(
                [
                    e["table"],
                    e["task"],
                    _f(e["shots"], "d"),
                    str(e["gen_length"]),
                    e["cache"],
                    policy,
                    str(e["n"]),
                    _f(e["accuracy"], ".1f"),
                    _f(e.get("ours_accuracy"), ".1f"),
                    _f(e["tokens_per_s"], ".1f"),
                    _f(e.get("ours_tokens_per_s"), ".1f"),
                    _f(e.get("ref_tokens_per_s"), ".1f"),
                    _f(e["paper_speedup"], ".2f"),
                    _f(e.get("ours_speedup"), ".2f"),
                    _f(e.get("ref_speedup"), ".2f"),
                    _f(e["total_nfe"], ","),
                    _f(e.get("ours_total_nfe"), ","),
                    _f(e["paper_nfe_reduction"], ".1%"),
                    _f(e.get("ours_nfe_reduction"), ".1%"),
                    _f(e["tokens_per_nfe"], ".2f"),
                    _f(e.get("ours_tokens_per_nfe"), ".2f"),
                    _f(e.get("ref_tokens_per_nfe"), ".2f"),
                ]
            )
            + " |"
        )
    return "\n".join(lines)
