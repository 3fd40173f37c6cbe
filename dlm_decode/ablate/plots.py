"""The sweep's figures (matplotlib, Agg backend, PNG in the sweep folder).

* ``frontier*.png`` — accuracy against tokens/s and against tokens per NFE, one line per
  policy family (and cache) through its settings (Fast-dLLM++ Figure 2 style);
* ``caches*.png`` — when a sweep compares caches: accuracy against token-forwards per
  sample, one panel per gen/block length, a point per cache × setting (the compute each
  cache saves, and what it costs in accuracy);
* ``commits_per_step*.png`` — tokens committed at each denoising step of one example
  decode, policy beside policy (Figure 4 style), from the rows' commit counts;
* ``profiles*.png`` — sorted confidence profiles of a traced decode with the Fréchet score
  ``G_n``, the factor core ``F_n`` and the heterogeneity bonus ``B_n``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dlm_decode.ablate.config import (
    AblationConfig,
    RunSpec,
    resolve_setting,
    setting_label,
)
from dlm_decode.config import format_value
from dlm_decode.decoder import Decoder
from dlm_decode.evaluate import encode_prompts, task_uses_chat
from dlm_decode.interfaces import CommitPolicy, CountPolicy

__all__ = [
    "draw_all",
    "frontier_series",
    "plot_caches",
    "plot_commits_per_step",
    "plot_frontier",
    "plot_profiles",
]

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p")
_STYLES = ("-", "--", ":", "-.")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _suffix(name: str, multi: bool) -> str:
    return f".{name}" if multi else ""


def _short(run: RunSpec | dict[str, Any]) -> str:
    args = run.policy_args if isinstance(run, RunSpec) else run["policy_args"]
    vals = [f"{v:g}" if isinstance(v, float) else str(v) for v in args.values()]
    return ",".join(vals)


def frontier_series(
    table: Sequence[dict[str, Any]], runs: Sequence[RunSpec], xkey: str
) -> dict[str, list[tuple[float, float, str]]]:
    """The frontier plot's lines: legend label → ``(x, accuracy, annotation)`` points.

    One line per policy family × cache × gen/block length (seeds averaged, points sorted
    by ``x``). The cache is named by its label, which carries every argument, so two
    differently configured caches are two lines.

    Args:
        table: the summary rows of one task.
        runs: the runs (for the parameter annotations).
        xkey: the x column (``tokens_per_s``, ``tokens_per_nfe``, …).
    """
    by_id = {r.run_id: r for r in runs}
    lengths = sorted({(t["gen_length"], t["block_length"]) for t in table})
    caches = sorted({t["cache"] for t in table})
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for t in table:  # (family, cache, length, setting) → rows of every seed
        key = (t["policy_family"], t["cache"], (t["gen_length"], t["block_length"]), t["setting"])
        groups.setdefault(key, []).append(t)
    series: dict[str, list[tuple[float, float, str]]] = {}
    for (fam, cache, length, _), ts in groups.items():
        label = fam
        if len(caches) > 1:
            label += f" / {cache}"
        if len(lengths) > 1:
            label += f" / g{length[0]}b{length[1]}"
        x = sum(t[xkey] for t in ts) / len(ts)
        y = sum(t["accuracy"] for t in ts) / len(ts)
        series.setdefault(label, []).append((x, y, _short(by_id[ts[0]["run_id"]])))
    return {label: sorted(pts) for label, pts in series.items()}


def plot_frontier(
    table: Sequence[dict[str, Any]], runs: Sequence[RunSpec], path: Path, title: str
) -> Path:
    """Accuracy vs tokens/s, vs tokens/NFE and vs token-forwards per sample (the positions
    the forwards computed), a line per family × cache (× length).

    Seeds are averaged. Each point is annotated with its parameter value. The lines are
    [`frontier_series`][dlm_decode.ablate.plots.frontier_series].

    Args:
        table: the summary rows of one task.
        runs: the runs (for params).
        path: output PNG.
        title: figure title.

    Returns:
        ``path``.
    """
    plt = _plt()
    colors = plt.get_cmap("tab10")
    families = list(dict.fromkeys(t["policy_family"] for t in table))
    labels = list(frontier_series(table, runs, "tokens_per_s"))
    # The legend sits below the panels, in as many rows as it needs, so it never covers
    # a point however many lines there are.
    ncol = max(1, min(len(labels), 3 if max(map(len, labels), default=0) > 40 else 4))
    legend_h = 0.25 * -(-len(labels) // ncol) + 0.2  # inches
    height = 5.2 + legend_h
    fig, axes = plt.subplots(1, 3, figsize=(19, height))
    for ax, xkey, xlabel in (
        (axes[0], "tokens_per_s", "throughput (response tokens / s)"),
        (axes[1], "tokens_per_nfe", "tokens per NFE (parallelism)"),
        (axes[2], "token_forwards_per_sample", "token-forwards per sample (compute cost)"),
    ):
        for si, (label, pts) in enumerate(frontier_series(table, runs, xkey).items()):
            fi = families.index(label.split(" / ")[0])
            color = colors(fi % 10)
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                linestyle=_STYLES[si % len(_STYLES)],
                marker=_MARKERS[si % len(_MARKERS)],
                color=color,
                label=label,
                markersize=7,
                linewidth=1.8,
            )
            for x, y, lab in pts:
                if lab:
                    ax.annotate(
                        lab,
                        (x, y),
                        textcoords="offset points",
                        xytext=(4, 5),
                        fontsize=8,
                        color=color,
                    )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.suptitle(title + "  (labels: policy parameter)", fontsize=12)
    fig.tight_layout(rect=(0, legend_h / height, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_caches(table: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Accuracy against token-forwards per sample, a panel per gen/block length and a
    point per cache × setting (colour: setting; label: cache). Seeds are averaged.

    Args:
        table: the summary rows of one task (two caches or more).
        path: output PNG.
        title: figure title.

    Returns:
        ``path``.
    """
    plt = _plt()
    colors = plt.get_cmap("tab10")
    lengths = sorted({(t["gen_length"], t["block_length"]) for t in table})
    settings = list(dict.fromkeys(t["setting"] for t in table))
    caches = list(dict.fromkeys(t["cache"] for t in table))
    fig, axes = plt.subplots(1, len(lengths), figsize=(7.2 * len(lengths), 5.4), squeeze=False)
    for ax, length in zip(axes[0], lengths, strict=True):
        for si, setting in enumerate(settings):
            for ci, cache in enumerate(caches):
                ts = [
                    t
                    for t in table
                    if t["setting"] == setting
                    and t["cache"] == cache
                    and (t["gen_length"], t["block_length"]) == length
                ]
                if not ts:
                    continue
                x = sum(t["token_forwards_per_sample"] for t in ts) / len(ts)
                y = sum(t["accuracy"] for t in ts) / len(ts)
                ax.scatter(
                    x,
                    y,
                    s=55,
                    color=colors(si % 10),
                    marker=_MARKERS[ci % len(_MARKERS)],
                    label=setting if ci == 0 else None,
                )
                ax.annotate(  # alternate sides so neighbouring caches stay readable
                    cache.split("(")[0],  # the marker legend names the arguments
                    (x, y),
                    textcoords="offset points",
                    xytext=(5, 4 if ci % 2 == 0 else -11),
                    fontsize=8,
                    color=colors(si % 10),
                )
        ax.set_title(f"gen {length[0]}, block {length[1]}", fontsize=10)
        ax.set_xlabel("token-forwards per sample (positions computed)")
        ax.set_ylabel("accuracy")
        ax.margins(x=0.12, y=0.12)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="best", title="setting", title_fontsize=8)
    marks = [
        plt.Line2D([], [], marker=_MARKERS[ci % len(_MARKERS)], color="0.35", linestyle="", label=c)
        for ci, c in enumerate(caches)
    ]
    ncol = 2 if max(map(len, caches)) > 40 else 4
    legend_h = 0.25 * -(-len(caches) // ncol) + 0.3  # inches
    fig.set_figheight(5.4 + legend_h)
    fig.legend(handles=marks, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, legend_h / (5.4 + legend_h), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_commits_per_step(
    examples: Sequence[tuple[str, dict[str, Any]]], path: Path, title: str
) -> Path:
    """Tokens committed at each denoising step of one decode, one panel per policy.

    Args:
        examples: ``(label, row)`` pairs; each row has ``commits`` and ``block_steps``.
        path: output PNG.
        title: figure title.

    Returns:
        ``path``.
    """
    plt = _plt()
    n = len(examples)
    longest = max(len(r["commits"]) for _, r in examples)
    ymax = max(max(r["commits"]) for _, r in examples)
    fig, axes = plt.subplots(n, 1, figsize=(11, 1.55 * n + 1.2), sharex=True, squeeze=False)
    colors = plt.get_cmap("tab10")
    for i, (label, row) in enumerate(examples):
        ax = axes[i][0]
        c = row["commits"]
        ax.bar(range(1, len(c) + 1), c, width=0.85, color=colors(i % 10))
        edge = 0
        for steps in row["block_steps"][:-1]:
            edge += steps
            ax.axvline(edge + 0.5, color="0.5", linestyle=":", linewidth=0.9)
        ax.set_ylim(0, ymax * 1.15 + 0.5)
        ax.set_xlim(0.3, longest + 0.7)
        ax.text(
            0.995,
            0.88,
            f"{label}   NFE {len(c)}, {sum(c)} tokens",
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=9,
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"},
        )
        ax.set_ylabel("tokens", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[-1][0].set_xlabel("denoising step (dotted lines: block boundaries)")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_profiles(
    steps: Sequence[tuple[str, list[float], int]],
    policy: CommitPolicy | None,
    path: Path,
    title: str,
) -> Path:
    """Sorted confidence profiles, each with the traced policy's own criterion.

    Every masked position of the step is drawn. A
    [`CountPolicy`][dlm_decode.interfaces.CountPolicy] that declares a
    [`criterion`][dlm_decode.interfaces.CountPolicy.criterion] gets its per-prefix values
    and its bound (``threshold``: ``c(n)`` vs τ; ``factor``: ``(n+1)(1−c(n))`` vs f;
    ``frechet``: ``G_n`` vs δ); other policies show the profile and the committed count.

    Args:
        steps: ``(caption, sorted profile, committed count)`` per panel.
        policy: the policy that decoded.
        path: output PNG.
        title: figure title.

    Returns:
        ``path``.
    """
    plt = _plt()
    k = len(steps)
    fig, axes = plt.subplots(1, k, figsize=(4.6 * k, 4.4), squeeze=False)
    for i, (caption, prof, committed) in enumerate(steps):
        ax = axes[0][i]
        c = torch.tensor(prof, dtype=torch.float64)
        n = list(range(1, len(prof) + 1))
        ax.bar(n, prof, color="0.82", label="c(n) sorted confidence")
        lo, hi = 0.0, 1.05
        crit = policy.criterion(c) if isinstance(policy, CountPolicy) else None
        if crit is not None:
            vals = crit.values.tolist()
            ax.plot(n, vals, "o-", color="tab:blue", label=crit.name)
            ax.axhline(
                crit.bound,
                color="tab:red",
                linewidth=1,
                label=f"{crit.bound_name} = {format_value(crit.bound)}",
            )
            lo, hi = min(lo, min(vals) - 0.05), max(hi, max(vals) + 0.1, crit.bound + 0.1)
        ax.axvline(committed + 0.5, color="black", linestyle="--", linewidth=1, label="committed")
        ax.set_ylim(max(lo, -1.05), hi)
        ax.set_xlim(0.4, len(prof) + 0.6)
        ax.set_xlabel("prefix size n")
        ax.set_title(caption, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("value")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8.5, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _diverse_steps(trace: Sequence[Any], k: int) -> list[int]:
    """Pick ``k`` steps that show the rule at work: partial commits first (several tokens,
    not all), then single commits out of many masked, then whole-block commits."""

    def kind(i: int) -> int:
        c, m = trace[i].committed[0], len(trace[i].profiles[0])
        return 0 if 1 < c < m else (1 if c == 1 else 2)

    order = sorted(range(len(trace)), key=lambda i: (kind(i), -len(trace[i].profiles[0]), i))
    picked: list[int] = []
    for want in (0, 1, 2):  # one of each kind first, then fill
        for i in order:
            if kind(i) == want and i not in picked:
                picked.append(i)
                break
    for i in order:
        if len(picked) >= k:
            break
        if i not in picked:
            picked.append(i)
    return picked[:k]


def _pick_examples(
    cfg: AblationConfig,
    runs: Sequence[RunSpec],
    rows: Sequence[dict[str, Any]],
    ti: int,
    sample_id: str,
) -> list[tuple[str, dict[str, Any]]]:
    """One run per family (its middle setting), first length and cache, baseline first."""
    length, seed = cfg.lengths[0], cfg.seeds[0]
    first_cache = next((r.cache for r in runs if r.task_index == ti), None)
    cand = [
        r
        for r in runs
        if r.task_index == ti
        and r.cache == first_cache
        and r.seed == seed
        and (r.gen_length, r.block_length) == (length.gen_length, length.block_length)
    ]
    fams: dict[str, list[RunSpec]] = {}
    for r in cand:
        fams.setdefault(r.setting.family_label, []).append(r)
    by_key = {(r["run_id"], r["sample_id"]): r for r in rows}
    out = []
    for members in fams.values():
        pick = members[(len(members) - 1) // 2]
        row = by_key.get((pick.run_id, sample_id))
        if row is not None:
            out.append((pick.setting_label, row))
    return out


def draw_all(
    cfg: AblationConfig,
    runs: Sequence[RunSpec],
    rows: Sequence[dict[str, Any]],
    table: Sequence[dict[str, Any]],
    tasks: Sequence[Any],
    samples: Sequence[Sequence[Any]],
    model_fn: Callable[[], Any],
    out: Path,
) -> dict[str, Path]:
    """Draw every plot of the sweep; returns ``name → path``."""
    files: dict[str, Path] = {}
    multi = len(cfg.tasks) > 1
    for ti, tspec in enumerate(cfg.tasks):
        suf = _suffix(tspec.name, multi)
        sub = [t for t in table if t["task"] == tspec.name]
        if not sub:
            continue
        files[f"frontier{suf}"] = plot_frontier(
            sub,
            runs,
            out / f"frontier{suf}.png",
            f"{cfg.name}: {tspec.name}, accuracy vs throughput (n={sub[0]['n']})",
        )
        if len({t["cache"] for t in sub}) > 1:
            files[f"caches{suf}"] = plot_caches(
                sub,
                out / f"caches{suf}.png",
                f"{cfg.name}: {tspec.name}, accuracy vs compute per cache (n={sub[0]['n']})",
            )
        if not samples[ti]:
            continue
        idx = min(cfg.plots.example_sample, len(samples[ti]) - 1)
        sample = samples[ti][idx]
        ex = _pick_examples(cfg, runs, rows, ti, sample.id)
        length = cfg.lengths[0]
        ex_cache = next((r.cache for r in runs if r.task_index == ti), "")
        if ex:
            files[f"commits_per_step{suf}"] = plot_commits_per_step(
                ex,
                out / f"commits_per_step{suf}.png",
                f"{tspec.name} sample {sample.id}: tokens committed per step "
                f"(cache {ex_cache}, gen {length.gen_length}, "
                f"block {length.block_length})",
            )
        # Traced decode of the example for the profile plot.
        traced = resolve_setting(
            cfg.plots.profile_policy,
            cache=cfg.caches[0],
            gen_length=length.gen_length,
            block_length=length.block_length,
            trace=True,
        )
        label = setting_label(traced.policy_ref, traced.config.steps)
        model = model_fn()
        prompt = encode_prompts(model, [sample.prompt], chat=task_uses_chat(tasks[ti], model))
        dcfg = traced.config
        res = Decoder(model, dcfg).generate(prompt)
        trace = [st for st in (res.trace or []) if len(st.profiles[0]) >= 3]
        if not trace:
            continue
        k = min(cfg.plots.profile_steps, len(trace))
        chosen = _diverse_steps(trace, k)
        panels = [
            (
                f"block {trace[i].block}, step {trace[i].step}: "
                f"{len(trace[i].profiles[0])} masked, {trace[i].committed[0]} committed",
                trace[i].profiles[0],
                trace[i].committed[0],
            )
            for i in sorted(chosen)
        ]
        files[f"profiles{suf}"] = plot_profiles(
            panels,
            traced.policy,
            out / f"profiles{suf}.png",
            f"{tspec.name} sample {sample.id}: sorted confidence profiles under {label}",
        )
    return files
