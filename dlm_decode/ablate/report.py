"""The sweep's outputs: the summary table (Markdown + CSV), the plots, the counterfactual
and audit reports, and the W&B upload. Everything here is recomputed from the JSONL rows,
so it is the same whether the sweep ran in one go or was killed and resumed."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlm_decode.ablate.config import (
    AblationConfig,
    RunSpec,
    Setting,
    baseline_matches,
    cache_matches,
    resolve_setting,
)
from dlm_decode.ablate.counterfactual import commit_audit, counterfactual_trace
from dlm_decode.ablate.paper import format_paper_report, paper_report
from dlm_decode.ablate.plots import draw_all
from dlm_decode.ablate.store import atomic_write_text, read_sweep_rows
from dlm_decode.ablate.tracking import log_sweep
from dlm_decode.evaluate import encode_prompts, summarize, task_uses_chat
from dlm_decode.models.loading import load_model

__all__ = [
    "TABLE_COLUMNS",
    "TIMING_COLUMNS",
    "SweepResult",
    "build_table",
    "finish_sweep",
    "format_markdown",
    "read_table_csv",
    "table_csv",
]


@dataclass
class SweepResult:
    """What ``run_sweep`` returns (complete on the merging rank; others get ``rows=None``).

    Attributes:
        out_dir: the sweep folder.
        runs: the runs of the grid.
        rows: every row of the current grid (rank 0 after the merge).
        table: one summary dict per run.
        files: the files written (table, plots, reports).
        decoded: samples this invocation decoded (this rank).
        merged: this process merged the rows and wrote the table (false on a rank that
            finished before others, or that another rank merged for).
        waiting_for: ranks still running when this rank finished (it then did not merge).
    """

    out_dir: Path
    runs: list[RunSpec]
    rows: list[dict[str, Any]] | None = None
    table: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    decoded: int = 0
    merged: bool = True
    waiting_for: list[int] = field(default_factory=list)


#: Columns of ``summary.csv`` (and the Markdown table, which shows a subset).
TABLE_COLUMNS = [
    "run_id",
    "task",
    "policy_family",
    "setting",
    "policy_key",
    "cache",
    "cache_key",
    "gen_length",
    "block_length",
    "seed",
    "n",
    "accuracy",
    "tokens_per_s",
    "nfe_per_sample",
    "tokens_per_nfe",
    "token_forwards_per_sample",
    "speedup",
    "nfe_reduction",
    "is_baseline",
    "baseline",
]
#: Columns that depend on wall-clock time (differ between otherwise identical sweeps).
TIMING_COLUMNS = ("tokens_per_s", "speedup", "wall_s")


def _find_baseline(cfg: AblationConfig, run: RunSpec, runs: Sequence[RunSpec]) -> RunSpec | None:
    sel = cfg.baseline
    if sel is None:
        return None
    for r in runs:
        same_cache = cache_matches(sel.cache, r.cache_ref) if sel.cache else r.cache == run.cache
        if (
            r.task_index == run.task_index
            and r.gen_length == run.gen_length
            and r.block_length == run.block_length
            and r.seed == run.seed
            and same_cache
            and baseline_matches(sel, r.policy_key, r.setting.policy.name, r.policy_args)
        ):
            return r
    return None


def build_table(
    cfg: AblationConfig, runs: Sequence[RunSpec], rows: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One summary dict per run with rows: accuracy, tokens/s, NFE per sample, tokens per
    NFE, and speed-up (tokens/s ratio) and NFE reduction (baseline NFE / run NFE) relative
    to the run's baseline.

    A run's ``wall_s`` is the sum of its rows' shares of their batches' decode time
    ([`row_latency_share`][dlm_decode.evaluate.row_latency_share]; rows written before
    ``latency_share_s`` existed give ``latency_s``), and tokens/s divides by it.

    Args:
        cfg: the config (baseline selector).
        runs: the runs, in table order.
        rows: the sweep's rows (only the runs' samples).

    Returns:
        The table rows (runs without any row are left out).
    """
    by_run: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_run.setdefault(str(r["run_id"]), []).append(r)
    summaries = {rid: summarize(rs) for rid, rs in by_run.items()}
    table = []
    for run in runs:
        if run.run_id not in summaries:
            continue
        s = summaries[run.run_id]
        base = _find_baseline(cfg, run, runs)
        b = summaries.get(base.run_id) if base is not None else None
        entry = {
            **{k: v for k, v in run.describe().items() if k in TABLE_COLUMNS},
            "n": s["n"],
            "accuracy": s["accuracy"],
            "tokens_per_s": s["tokens_per_s"],
            "nfe_per_sample": s["nfe_per_sample"],
            "tokens_per_nfe": s["tokens_per_nfe"],
            "token_forwards_per_sample": s["token_forwards_per_sample"],
            "wall_s": s["wall_s"],
            "speedup": s["tokens_per_s"] / b["tokens_per_s"] if b else float("nan"),
            "nfe_reduction": b["nfe_per_sample"] / s["nfe_per_sample"] if b else float("nan"),
            "is_baseline": base is not None and base.run_id == run.run_id,
            "baseline": base.label if base is not None else "",
        }
        entry.update({k: v for k, v in s.items() if k.startswith("accuracy_")})
        table.append(entry)
    return table


def _num(v: Any, digits: int = 3) -> str:
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def format_markdown(table: Sequence[dict[str, Any]], title: str = "") -> str:
    """The summary table as Markdown (baseline rows marked with ``*``)."""
    lines = [f"### {title}", ""] if title else []
    multi_seed = len({t["seed"] for t in table}) > 1
    head = ["task", "setting", "cache", "gen/block"]
    if multi_seed:
        head.append("seed")
    head += [
        "n",
        "accuracy",
        "tokens/s",
        "NFE/sample",
        "tokens/NFE",
        "token-fwd/sample",
        "speed-up",
        "NFE reduction",
    ]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" for _ in head) + "|")
    for t in table:
        cells = [
            t["task"],
            t["setting"] + (" *" if t["is_baseline"] else ""),
            t["cache"],
            f"{t['gen_length']}/{t['block_length']}",
        ]
        if multi_seed:
            cells.append(str(t["seed"]))
        cells += [
            str(t["n"]),
            _num(t["accuracy"]),
            _num(t["tokens_per_s"], 1),
            _num(t["nfe_per_sample"], 1),
            _num(t["tokens_per_nfe"], 2),
            _num(float(t.get("token_forwards_per_sample", float("nan"))), 0),
            "–" if math.isnan(t["speedup"]) else f"{t['speedup']:.2f}x",
            "–" if math.isnan(t["nfe_reduction"]) else f"{t['nfe_reduction']:.2f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "`*` baseline; speed-up = tokens/s ÷ baseline tokens/s; NFE reduction = "
        "baseline NFE/sample ÷ NFE/sample (same task, length, seed and cache)."
    )
    return "\n".join(lines)


def table_csv(table: Sequence[dict[str, Any]]) -> str:
    """The summary table as CSV text (all ``TABLE_COLUMNS`` plus ``accuracy_*``)."""
    extra = sorted({k for t in table for k in t if k.startswith("accuracy_")})
    cols = [*TABLE_COLUMNS, "wall_s", *extra]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for t in table:
        w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in t.items()})
    return buf.getvalue()


def read_table_csv(path: str | Path) -> list[dict[str, str]]:
    """Read ``summary.csv`` back (values as strings)."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------


class _LazyModel:
    def __init__(self, cfg: AblationConfig, device: str) -> None:
        self.cfg, self.device, self._m = cfg, device, None

    def __call__(self) -> Any:
        if self._m is None:
            self._m = load_model(
                self.cfg.model.name, device=self.device, dtype=self.cfg.model.dtype
            )
        return self._m


def _prompts(model: Any, task: Any, samples: Sequence[Any]) -> list[list[int]]:
    return encode_prompts(model, [s.prompt for s in samples], chat=task_uses_chat(task, model))


def _unique_settings(runs: Sequence[RunSpec]) -> list[Setting]:
    """The grid's distinct policy settings, resolved (every argument, steps as decoded)."""
    seen, out = set(), []
    for r in runs:
        key = (r.policy_key, json.dumps(r.policy_args, sort_keys=True), r.steps)
        if key not in seen:
            seen.add(key)
            out.append(Setting(policy=r.policy_ref, steps=r.steps))
    return out


def _counterfactual_report(
    cfg: AblationConfig,
    runs: Sequence[RunSpec],
    tasks: Sequence[Any],
    samples: Sequence[Sequence[Any]],
    model_fn: Callable[[], Any],
    out: Path,
) -> tuple[str, dict[str, Any]]:
    spec = cfg.counterfactual
    length = cfg.lengths[0]
    pols = spec.policies if spec.policies is not None else _unique_settings(runs)
    model = model_fn()
    lines = ["## Counterfactual trace", ""]
    data: dict[str, Any] = {}
    for ti, task in enumerate(tasks):
        sub = list(samples[ti][: spec.samples])
        if not sub:
            continue
        driver = resolve_setting(
            spec.driver,
            cache=cfg.caches[0],
            gen_length=length.gen_length,
            block_length=length.block_length,
            seed=cfg.seeds[0],
        )
        dcfg = driver.config
        tr = counterfactual_trace(model, _prompts(model, task, sub), dcfg, pols)
        path = out / f"counterfactual.{cfg.tasks[ti].name}.csv"
        tr.write_csv(path)
        means = tr.mean_counts()
        steps = len(tr.rows)
        more = {
            lab: sum(r[lab] > r["actual"] for r in tr.rows) / max(steps, 1) for lab in tr.labels
        }
        data[cfg.tasks[ti].name] = {
            "driver": tr.driver,
            "mean": means,
            "more": more,
            "csv": path.name,
        }
        lines += [
            f"Task `{cfg.tasks[ti].name}`, driver `{tr.driver}`, cache "
            f"`{driver.cache_ref.label}`, "
            f"{len(sub)} samples, {steps} (step, sample) pairs; per-step table: `{path.name}`.",
            "",
            "| policy | mean tokens/step | steps above the driver |",
            "|---|---|---|",
            f"| {tr.driver} (driver) | {means['actual']:.2f} | – |",
        ]
        lines += [f"| {lab} | {means[lab]:.2f} | {more[lab]:.0%} |" for lab in tr.labels]
        lines.append("")
    return "\n".join(lines), data


def _audit_report(
    cfg: AblationConfig,
    runs: Sequence[RunSpec],
    tasks: Sequence[Any],
    samples: Sequence[Sequence[Any]],
    model_fn: Callable[[], Any],
    out: Path,
) -> tuple[str, list[dict[str, Any]]]:
    spec = cfg.audit
    length = cfg.lengths[0]
    pols = spec.policies if spec.policies is not None else _unique_settings(runs)
    model = model_fn()
    summaries = []
    records = []
    for ti, task in enumerate(tasks):
        sub = list(samples[ti][: spec.samples])
        if not sub:
            continue
        prompts = _prompts(model, task, sub)
        for setting in pols:
            dcfg = resolve_setting(
                setting,
                cache=spec.cache,
                gen_length=length.gen_length,
                block_length=length.block_length,
                seed=cfg.seeds[0],
            ).config
            res = commit_audit(model, prompts, dcfg, every=spec.every, max_steps=spec.max_steps)
            s = {"task": cfg.tasks[ti].name, **res.summary()}
            summaries.append(s)
            records += [{"task": s["task"], "policy": res.policy, **r} for r in res.records]
    path = out / "audit.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        cols = ["task", "policy", "block", "step", "row", "committed", "mismatched"]
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(records)
    lines = [
        "## Commit audit",
        "",
        f"Each audited step's parallel commit re-decoded one token at a time (fresh forwards, "
        f"cache `{spec.cache.label}`, greedy); {spec.samples} samples per task. Per-step records: "
        f"`{path.name}`.",
        "",
        "| task | policy | audited steps | parallel steps | mean parallel commit | "
        "steps disagreeing | tokens disagreeing |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s['task']} | {s['policy']} | {s['audited_steps']} | {s['parallel_steps']} | "
            f"{s['mean_parallel_commit']:.2f} | {s['step_disagreement']:.1%} | "
            f"{s['token_disagreement']:.1%} |"
        )
    lines.append("")
    return "\n".join(lines), summaries


def finish_sweep(
    cfg: AblationConfig,
    out: Path,
    runs: Sequence[RunSpec],
    samples: Sequence[Sequence[Any]],
    tasks: Sequence[Any],
    result: SweepResult,
    *,
    device: str,
    use_wandb: bool,
    plots: bool,
    say: Callable[[str], None],
) -> SweepResult:
    """Rank 0 after the merge: table, plots, counterfactual/audit reports, W&B.

    Args:
        cfg: the config.
        out: the sweep folder.
        runs: the runs.
        samples: each task's samples (after the limit).
        tasks: the task objects.
        result: the partial result to complete.
        device: the device for traced decodes.
        use_wandb: log to W&B.
        plots: draw plots.
        say: status output.

    Returns:
        ``result`` with rows, table and files filled in.
    """
    wanted = {(r.run_id, s.id) for r in runs for s in samples[r.task_index]}
    rows = [r for r in read_sweep_rows(out) if (r["run_id"], r["sample_id"]) in wanted]
    rows.sort(key=lambda r: (r["run_id"], int(r["sample_index"])))
    missing = len(wanted) - len(rows)
    if missing:
        say(f"warning: {missing} (run, sample) rows are missing; rerun the same command")
    table = build_table(cfg, runs, rows)
    result.rows, result.table = rows, table
    md = format_markdown(table, title=f"{cfg.name}")
    atomic_write_text(out / "summary.md", md + "\n")
    atomic_write_text(out / "summary.csv", table_csv(table))
    result.files.update(summary_md=out / "summary.md", summary_csv=out / "summary.csv")
    print(md, flush=True)
    model_fn = _LazyModel(cfg, device)
    sections = [f"# Ablation `{cfg.name}`", "", cfg.description, "", md, ""]
    if cfg.paper is not None:
        entries = paper_report(cfg, runs, rows)
        paper_md = format_paper_report(entries, cfg.paper.source, cfg.paper.baseline)
        atomic_write_text(out / "paper.md", paper_md + "\n")
        atomic_write_text(out / "paper.json", json.dumps(entries, indent=1) + "\n")
        result.files.update(paper_md=out / "paper.md", paper_json=out / "paper.json")
        sections += ["## Published figures beside ours", "", paper_md, ""]
        print(paper_md, flush=True)
    extra: dict[str, Any] = {}
    if plots and cfg.plots.enabled and table:
        try:
            figs = draw_all(cfg, runs, rows, table, tasks, samples, model_fn, out)
        except ImportError as exc:
            say(f"plots skipped: {exc}")
            figs = {}
        result.files.update(figs)
        if figs:
            sections += ["## Plots", ""] + [f"- {k}: `{p.name}`" for k, p in figs.items()] + [""]
    if cfg.counterfactual.enabled:
        text, extra["counterfactual"] = _counterfactual_report(
            cfg, runs, tasks, samples, model_fn, out
        )
        sections.append(text)
        print(text, flush=True)
    if cfg.audit.enabled:
        text, extra["audit"] = _audit_report(cfg, runs, tasks, samples, model_fn, out)
        result.files["audit_csv"] = out / "audit.csv"
        sections.append(text)
        print(text, flush=True)
    atomic_write_text(out / "report.md", "\n".join(sections) + "\n")
    result.files["report"] = out / "report.md"
    if use_wandb and cfg.wandb.enabled:
        log_sweep(cfg, out, runs, rows, table, result.files, extra, say=say)
    say(f"results in {out}")
    return result
