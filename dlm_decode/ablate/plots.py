"""The sweep's figures (matplotlib, Agg backend, PNG in the sweep folder).

* ``frontier*.png`` — accuracy against tokens/s and against tokens per NFE, one line per
  policy family (and cache) through its settings (Fast-dLLM++ Figure 2 style);
* ``commits_per_step*.png`` — tokens committed at each denoising step of one example
  decode, policy beside policy (Figure 4 style), from the rows' commit counts;
* ``profiles*.png`` — sorted confidence profiles of a traced decode with the Fréchet score
  ``G_n``, the factor core ``F_n`` and the heterogeneity bonus ``B_n``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dlm_decode.ablate.config import AblationConfig, RunSpec

__all__ = ["draw_all", "plot_commits_per_step", "plot_frontier", "plot_profiles"]

_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
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


def plot_frontier(
    table: Sequence[dict[str, Any]], runs: Sequence[RunSpec], path: Path, title: str
) -> Path:
    """Accuracy vs tokens/s and vs tokens/NFE, a line per family × cache (× length).

    Seeds are averaged. Each point is annotated with its parameter value.

    Args:
        table: the summary rows of one task.
        runs: the runs (for params).
        path: output PNG.
        title: figure title.

    Returns:
        ``path``.
    """
    plt = _plt()
    by_id = {r.run_id: r for r in runs}
    lengths = sorted({(t["gen_length"], t["block_length"]) for t in table})
    caches = sorted({t["cache"] for t in table})
    families = list(dict.fromkeys(t["family"] for t in table))
    colors = plt.get_cmap("tab10")
    # (family, cache, length, setting) → mean over seeds
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for t in table:
        key = (t["family"], t["cache"], (t["gen_length"], t["block_length"]), t["setting"])
        groups.setdefault(key, []).append(t)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, xkey, xlabel in (
        (axes[0], "tokens_per_s", "throughput (response tokens / s)"),
        (axes[1], "tokens_per_nfe", "tokens per NFE (parallelism)"),
    ):
        for fi, fam in enumerate(families):
            for ci, cache in enumerate(caches):
                for li, length in enumerate(lengths):
                    pts = []
                    for (f, c, ln, _), ts in groups.items():
                        if f == fam and c == cache and ln == length:
                            x = sum(t[xkey] for t in ts) / len(ts)
                            y = sum(t["accuracy"] for t in ts) / len(ts)
                            pts.append((x, y, _short(by_id[ts[0]["run_id"]])))
                    if not pts:
                        continue
                    pts.sort()
                    label = fam
                    if len(caches) > 1:
                        label += f" / {cache}"
                    if len(lengths) > 1:
                        label += f" / g{length[0]}b{length[1]}"
                    ax.plot(
                        [p[0] for p in pts],
                        [p[1] for p in pts],
                        linestyle=_STYLES[ci % len(_STYLES)],
                        marker=_MARKERS[(ci + li) % len(_MARKERS)],
                        color=colors(fi % 10),
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
                                color=colors(fi % 10),
                            )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(title + "  (labels: policy parameter)", fontsize=12)
    fig.tight_layout()
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
    steps: Sequence[tuple[str, list[float], int]], margin: float | None, path: Path, title: str
) -> Path:
    """Sorted confidence profiles with ``G_n``, ``F_n`` and ``B_n`` per prefix size.

    Args:
        steps: ``(caption, sorted profile, committed count)`` per panel.
        margin: δ of the driving policy (drawn as a line), or ``None``.
        path: output PNG.
        title: figure title.

    Returns:
        ``path``.
    """
    import torch

    from dlm_decode.frechet import frechet_scores

    plt = _plt()
    k = len(steps)
    fig, axes = plt.subplots(1, k, figsize=(4.6 * k, 4.4), squeeze=False)
    for i, (caption, prof, committed) in enumerate(steps):
        ax = axes[0][i]
        c = torch.tensor(prof, dtype=torch.float64)
        s = frechet_scores(c)
        show = min(len(prof), max(committed + 5, 8), 24)
        n = list(range(1, show + 1))
        ax.bar(n, c[:show].tolist(), color="0.82", label="c(n) sorted confidence")
        ax.plot(n, s.gap[:show].tolist(), "o-", color="tab:blue", label="G_n Fréchet score")
        ax.plot(
            n, s.factor_core[:show].tolist(), "s--", color="tab:orange", label="F_n factor core"
        )
        ax.plot(
            n, s.bonus[:show].tolist(), "^:", color="tab:green", label="B_n heterogeneity bonus"
        )
        if margin is not None:
            ax.axhline(margin, color="tab:red", linewidth=1, label=f"δ = {margin:g}")
        ax.axvline(committed + 0.5, color="black", linestyle="--", linewidth=1, label="committed")
        vals = [*s.gap[:show].tolist(), *s.bonus[:show].tolist(), 1.0]
        ax.set_ylim(-1.05, max(1.05, max(vals) + 0.1))
        ax.set_xlim(0.4, show + 0.6)
        ax.set_xlabel("prefix size n")
        ax.set_title(caption, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("value (F_n clipped at −1)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=8.5, frameon=False)
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
    length, cache, seed = cfg.lengths[0], cfg.caches[0].name, cfg.seeds[0]
    cand = [
        r
        for r in runs
        if r.task_index == ti
        and r.cache == cache
        and r.seed == seed
        and (r.gen_length, r.block_length) == (length.gen_length, length.block_length)
    ]
    fams: dict[str, list[RunSpec]] = {}
    for r in cand:
        fams.setdefault(r.setting.family, []).append(r)
    by_key = {(r["run_id"], r["sample_id"]): r for r in rows}
    out = []
    for members in fams.values():
        pick = members[(len(members) - 1) // 2]
        row = by_key.get((pick.run_id, sample_id))
        if row is not None:
            out.append((pick.setting.label, row))
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
    from dlm_decode.ablate.counterfactual import resolve_policies
    from dlm_decode.config import DecodeConfig
    from dlm_decode.decoder import Decoder
    from dlm_decode.evaluate import _task_chat, encode_prompts

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
        if not samples[ti]:
            continue
        idx = min(cfg.plots.example_sample, len(samples[ti]) - 1)
        sample = samples[ti][idx]
        ex = _pick_examples(cfg, runs, rows, ti, sample.id)
        length = cfg.lengths[0]
        if ex:
            files[f"commits_per_step{suf}"] = plot_commits_per_step(
                ex,
                out / f"commits_per_step{suf}.png",
                f"{tspec.name} sample {sample.id}: tokens committed per step "
                f"(cache {cfg.caches[0].name}, gen {length.gen_length}, "
                f"block {length.block_length})",
            )
        # Traced decode of the example for the profile plot.
        ref = cfg.plots.profile_policy
        ((label, (pol, _)),) = resolve_policies([(ref.policy, ref.args, ref.steps)]).items()
        model = model_fn()
        prompt = encode_prompts(model, [sample.prompt], chat=_task_chat(tasks[ti], model))
        dcfg = DecodeConfig(
            policy=ref.policy,
            policy_args=ref.args,
            cache=cfg.caches[0].name,
            cache_args=cfg.caches[0].args,
            gen_length=length.gen_length,
            block_length=length.block_length,
            steps=ref.steps or (length.gen_length if pol.requires else None),
            trace=True,
        )
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
        margin = getattr(pol.params, "margin", None)
        files[f"profiles{suf}"] = plot_profiles(
            panels,
            margin,
            out / f"profiles{suf}.png",
            f"{tspec.name} sample {sample.id}: sorted confidence profiles under {label}",
        )
    return files
