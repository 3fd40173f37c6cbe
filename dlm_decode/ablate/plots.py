"""The sweep's figures (matplotlib, Agg backend, PNG in the sweep folder).

* ``frontier*.png`` — accuracy against tokens/s and against tokens per NFE, one line per
  policy family (and cache) through its settings (Fast-dLLM++ Figure 2 style);
* ``caches*.png`` — when a sweep compares caches: accuracy against token-forwards per
  sample, one panel per gen/block length, a point per cache × setting (the compute each
  cache saves, and what it costs in accuracy);
* ``commits_per_step*.png`` — tokens committed at each denoising step of one example
  decode, policy beside policy (Figure 4 style), from the rows' commit counts;
* ``profiles*.png`` — sorted confidence profiles of a traced decode, every masked position
  of each drawn step, with what the traced rule itself compares along the profile (its
  [`ProfileCriterion`][dlm_decode.interfaces.ProfileCriterion] and bound); a rule that
  declares none gets the profile alone.

Point labels (the frontier's parameter values) are placed by
[`place_labels`][dlm_decode.ablate.plots.place_labels], so that no two overlap.
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
from dlm_decode.interfaces import CommitPolicy, ProfileCriterion

__all__ = [
    "draw_all",
    "frontier_series",
    "label_boxes",
    "place_labels",
    "plot_caches",
    "plot_commits_per_step",
    "plot_frontier",
    "plot_profiles",
    "profile_criterion",
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


#: Directions tried around a point, in order of preference (right-above first).
_DIRECTIONS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (0, 1), (0, -1), (1, 0), (-1, 0))
#: Label distances from the point tried, in points; past the first a leader line is drawn.
_RADII = (4.0, 11.0, 18.0, 26.0, 36.0, 48.0, 62.0, 80.0)
_GAP_PX = 2.0  # clearance kept between two labels


def _clear(box: Any, boxes: Sequence[Any]) -> bool:
    """Whether ``box`` stays ``_GAP_PX`` away from every box of ``boxes``."""
    return not any(
        box.x0 < b.x1 + _GAP_PX
        and b.x0 < box.x1 + _GAP_PX
        and box.y0 < b.y1 + _GAP_PX
        and b.y0 < box.y1 + _GAP_PX
        for b in boxes
    )


def _inside(box: Any, frame: Any) -> bool:
    return frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1


def place_labels(
    ax: Any,
    points: Sequence[tuple[float, float, str, Any]],
    *,
    placed: list[Any] | None = None,
    fontsize: float = 8,
) -> list[Any]:
    """Annotate points so that no two labels overlap (greedy placement).

    Each label tries positions around its point, nearest first (eight directions at a
    growing distance), and takes the first whose bounding box (from the renderer) keeps
    clear of every label placed before it, preferring positions inside the axes; a label
    pushed past the nearest ring gets a thin leader line to its point. The axes limits
    are fixed first, and the boxes are measured in pixels: call it once the figure's
    layout is final (after ``tight_layout``).

    Args:
        ax: the axes.
        points: ``(x, y, text, colour)`` in data coordinates; empty texts are skipped.
        placed: bounding boxes (display coordinates) to keep clear of, e.g. the labels of
            other panels; the new labels' boxes are appended to it.
        fontsize: label font size in points.

    Returns:
        The annotations, in the order of ``points`` (without the skipped ones).
    """
    ax.set_xlim(ax.get_xlim())  # autoscaling must not move the points after placement
    ax.set_ylim(ax.get_ylim())
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    boxes = placed if placed is not None else []
    radii = (*_RADII, *(_RADII[-1] + 20.0 * k for k in range(1, 60)))
    out = []
    for x, y, text, color in points:
        if not text:
            continue
        ann = ax.annotate(
            text, (x, y), textcoords="offset points", xytext=(0, 0), fontsize=fontsize, color=color
        )
        inside = outside = None
        for radius in radii:
            for cx, cy in _DIRECTIONS:
                ann.set_horizontalalignment("left" if cx > 0 else "right" if cx < 0 else "center")
                ann.set_verticalalignment("bottom" if cy > 0 else "top" if cy < 0 else "center")
                ann.xyann = (cx * radius, cy * radius)
                box = ann.get_window_extent(renderer)
                if not _clear(box, boxes):
                    continue
                cand = (box, ann.xyann, ann.get_ha(), ann.get_va(), radius)
                if _inside(box, frame):
                    inside = cand
                    break
                outside = outside or cand
            if inside is not None or (outside is not None and radius >= _RADII[-1]):
                break
        chosen = inside or outside
        if chosen is None:  # the rings reach past every other label, so never in practice
            raise RuntimeError(f"no free place for the label {text!r}")
        box, offset, ha, va, radius = chosen
        ann.set_horizontalalignment(ha)
        ann.set_verticalalignment(va)
        ann.xyann = offset
        if radius > _RADII[0]:  # a leader line from the point to the label's nearest edge
            px, py = ax.transData.transform((x, y))
            ex, ey = min(max(px, box.x0), box.x1), min(max(py, box.y0), box.y1)
            lx, ly = ax.transData.inverted().transform((ex, ey))
            ax.plot([x, lx], [y, ly], color=color, linewidth=0.5, alpha=0.6, clip_on=False)
        boxes.append(box)
        out.append(ann)
    return out


def label_boxes(fig: Any) -> list[Any]:
    """The display-space bounding boxes of every annotation in ``fig`` (drawn first).

    A figure already closed by pyplot gets an Agg canvas again, so it can be drawn.

    Args:
        fig: a matplotlib figure.

    Returns:
        One box per annotation, panel by panel.
    """
    if not hasattr(fig.canvas, "get_renderer"):
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [t.get_window_extent(renderer) for ax in fig.axes for t in ax.texts]


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

    Seeds are averaged. Each point is annotated with its parameter value, placed by
    [`place_labels`][dlm_decode.ablate.plots.place_labels] so that no two labels overlap.
    The lines are [`frontier_series`][dlm_decode.ablate.plots.frontier_series].

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
    labels_of: dict[Any, list[tuple[float, float, str, Any]]] = {ax: [] for ax in axes}
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
            labels_of[ax] += [(x, y, lab, color) for x, y, lab in pts]
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy")
        ax.margins(x=0.08, y=0.1)
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.suptitle(title + "  (labels: policy parameter)", fontsize=12)
    fig.tight_layout(rect=(0, legend_h / height, 1, 1))
    placed: list[Any] = []  # shared, so labels of neighbouring panels cannot collide either
    for ax in axes:
        place_labels(ax, labels_of[ax], placed=placed)
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


def profile_criterion(policy: Any, sorted_conf: torch.Tensor) -> ProfileCriterion | None:
    """What ``policy`` declares it compares along a sorted profile, if anything.

    Any policy may declare it with a ``criterion(sorted_conf)`` method returning a
    [`ProfileCriterion`][dlm_decode.interfaces.ProfileCriterion]
    ([`CountPolicy.criterion`][dlm_decode.interfaces.CountPolicy.criterion]; the built-in
    ``threshold``, ``factor`` and ``frechet`` rules do).

    Args:
        policy: the traced policy (``None`` allowed).
        sorted_conf: ``(L,)`` confidences sorted descending.

    Returns:
        The criterion, or ``None`` when the policy declares none.
    """
    fn = getattr(policy, "criterion", None)
    if not callable(fn):
        return None
    crit = fn(sorted_conf)
    return crit if isinstance(crit, ProfileCriterion) else None


def plot_profiles(
    steps: Sequence[tuple[str, list[float], int]],
    policy: CommitPolicy | None,
    path: Path,
    title: str,
) -> Path:
    """Sorted confidence profiles, each with the traced policy's own criterion.

    Every masked position of the step is drawn (``n = 1 … masked count``). A policy that
    declares a criterion (see
    [`profile_criterion`][dlm_decode.ablate.plots.profile_criterion]) gets its per-prefix
    values, filled where they pass the bound and hollow where they do not, and its bound
    (``threshold``: ``c(n)`` vs τ; ``factor``: ``(n+1)(1−c(n))`` vs f; ``frechet``: ``G_n``
    vs δ); other policies show the profile and the committed count only.

    Args:
        steps: ``(caption, sorted profile, committed count)`` per panel.
        policy: the policy that decoded.
        path: output PNG.
        title: figure title.

    Returns:
        ``path``.
    """
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    k = len(steps)
    fig, axes = plt.subplots(1, k, figsize=(4.6 * k, 4.4), squeeze=False)
    for i, (caption, prof, committed) in enumerate(steps):
        ax = axes[0][i]
        c = torch.tensor(prof, dtype=torch.float64)
        n = list(range(1, len(prof) + 1))
        ax.bar(n, prof, color="0.82", label="c(n) sorted confidence")
        lo, hi = 0.0, 1.05
        crit = profile_criterion(policy, c)
        if crit is not None:
            vals = [float(v) for v in crit.values.reshape(-1).tolist()]
            ok = [bool(v) for v in crit.passing().reshape(-1).tolist()]
            ax.plot(n, vals, "-", color="tab:blue", linewidth=1.2)
            ax.plot(
                [m for m, p in zip(n, ok, strict=True) if p],
                [v for v, p in zip(vals, ok, strict=True) if p],
                "o",
                color="tab:blue",
                label=f"{crit.name} (filled: passes)",
            )
            ax.plot(
                [m for m, p in zip(n, ok, strict=True) if not p],
                [v for v, p in zip(vals, ok, strict=True) if not p],
                "o",
                color="tab:blue",
                markerfacecolor="white",
            )
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
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
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
