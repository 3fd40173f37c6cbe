"""Published figures beside ours: the ``paper:`` section of a sweep config and its report.

A config that reproduces a table of a paper lists the table's rows under ``paper:``
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
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from dlm_decode.evaluate import summarize

if TYPE_CHECKING:
    from dlm_decode.ablate.config import AblationConfig, RunSpec

__all__ = [
    "PaperRow",
    "PaperSpec",
    "format_paper_report",
    "match_run",
    "paper_report",
    "unmatched_paper_rows",
]


class PaperRow(BaseModel):
    """One published row.

    Attributes:
        table: where it is published (``Table 1``, ``Figure 2``).
        task: the task name (``gsm8k``, ``math``, ``humaneval``, ``mbpp``).
        shots: the task's shots (``None`` matches any).
        gen_length: tokens generated.
        cache: the cache name (``none``, ``prefix``, ``dual``).
        policy: the policy's bare name (``threshold``, ``factor``, ``frechet``).
        args: policy arguments the run must have (e.g. ``{factor: 1.0}``); empty matches
            the policy at any arguments.
        accuracy: accuracy in percent, as published.
        tokens_per_s: throughput, as published.
        total_nfe: total NFE over the task, as published.
        tokens_per_nfe: tokens per NFE, as published.
    """

    model_config = ConfigDict(extra="forbid")

    table: str
    task: str
    shots: int | None = None
    gen_length: int = Field(ge=1)
    cache: str
    policy: str
    args: dict[str, Any] = Field(default_factory=dict)
    accuracy: float | None = None
    tokens_per_s: float | None = None
    total_nfe: int | None = None
    tokens_per_nfe: float | None = None


class PaperSpec(BaseModel):
    """The ``paper:`` section of a sweep config.

    Attributes:
        source: the paper (and version) the figures come from.
        baseline: the policy the paper's ratios are relative to (``threshold``).
        rows: the published rows this config reproduces.
    """

    model_config = ConfigDict(extra="forbid")

    source: str
    baseline: str = "threshold"
    rows: list[PaperRow] = Field(min_length=1)


def _bare(policy_key: str) -> str:
    return policy_key.split(".v")[0]


def _args_match(want: dict[str, Any], have: dict[str, Any]) -> bool:
    return all(
        k in have
        and (have[k] == v or (_is_num(v) and _is_num(have[k]) and math.isclose(v, have[k])))
        for k, v in want.items()
    )


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _group(task: str, shots: int | None, gen: int, cache: str) -> tuple[Any, ...]:
    return (task, shots, gen, cache)


def match_run(
    cfg: AblationConfig,
    runs: Sequence[RunSpec],
    row: PaperRow,
    policy: str | None = None,
    args: dict[str, Any] | None = None,
) -> RunSpec | None:
    """The first run reproducing ``row``: same task, shots (when the row gives them),
    generation length, cache name and policy, with the row's policy arguments.

    Args:
        cfg: the config (tasks' shots).
        runs: the sweep's runs.
        row: the published row.
        policy: match this policy instead of the row's (its baseline).
        args: with these arguments instead of the row's.

    Returns:
        The run, or ``None``.
    """
    policy = row.policy if policy is None else policy
    args = row.args if args is None else args
    for run in runs:
        if (
            run.task == row.task
            and (row.shots is None or cfg.tasks[run.task_index].shots == row.shots)
            and run.gen_length == row.gen_length
            and run.cache_ref.name.split(".v")[0] == row.cache
            and _bare(run.policy_key) == policy
            and _args_match(args, run.policy_args)
        ):
            return run
    return None


def unmatched_paper_rows(cfg: AblationConfig, runs: Sequence[RunSpec]) -> list[str]:
    """Problems (``"paper.rows[i]: …"``) for published rows no run of the sweep
    reproduces, so a dry run catches a config that cannot fill its own report."""
    if cfg.paper is None:
        return []
    return [
        f"paper.rows[{i}]: no run matches task {row.task}, shots {row.shots}, gen_length "
        f"{row.gen_length}, cache {row.cache}, policy {row.policy} {row.args or ''}".rstrip()
        + "; add it to the sweep or drop the row"
        for i, row in enumerate(cfg.paper.rows)
        if match_run(cfg, runs, row) is None
    ]


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
