"""Table and plot of the contract-v2 frontier on the tiny model, from sweep folders.

    dlm-decode ablate experiments/configs/tiny_frontier_v2.yaml --no-wandb --out runs/fv2
    python experiments/frontier_v2/report.py runs/fv2 --plot docs/concepts/img/frontier_v2.png

Per setting: accuracy on all held-out problems and per family, NFE and tokens per NFE,
edits and remasks per sample (rows written before those fields existed count 0). Later
folders win for settings that appear in several.
"""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict
from pathlib import Path

from dlm_decode.evaluate import get_task

FAMILIES = ("copy", "reverse", "sort", "add", "word", "hide")


def load(folders: list[Path]) -> OrderedDict[str, list[dict]]:
    """Rows by setting label (``policy(args)``), in sweep order."""
    by: OrderedDict[str, list[dict]] = OrderedDict()
    for folder in folders:
        seen: dict[str, list[dict]] = {}
        for line in (folder / "rows.jsonl").read_text().splitlines():
            row = json.loads(line)
            seen.setdefault(row["setting"], []).append(row)
        by.update(seen)
    return by


def table(by: OrderedDict[str, list[dict]]) -> tuple[str, list[dict]]:
    """The Markdown table and one summary dict per setting."""
    family = {s.id: s.meta["family"] for s in get_task("synthetic").samples(None)}
    head = ["setting", "all", *FAMILIES, "NFE/sample", "tokens/NFE", "edits", "remasks"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out = []
    for setting, rows in by.items():
        acc = sum(r["correct"] for r in rows) / len(rows)
        per = []
        for f in FAMILIES:
            sel = [r for r in rows if family[r["sample_id"]] == f]
            per.append(sum(r["correct"] for r in sel) / len(sel))
        nfe = sum(r["nfe"] for r in rows)
        tpn = sum(r["response_tokens"] for r in rows) / nfe
        edits = sum(r.get("edits", 0) for r in rows) / len(rows)
        remasks = sum(r.get("remasks", 0) for r in rows) / len(rows)
        out.append(
            {
                "setting": setting,
                "family": rows[0]["policy"],
                "accuracy": acc,
                "nfe": nfe / len(rows),
                "n": len(rows),
            }
        )
        cells = [
            setting,
            f"{acc:.3f}",
            *(f"{p:.2f}" for p in per),
            f"{nfe / len(rows):.1f}",
            f"{tpn:.2f}",
            f"{edits:.2f}",
            f"{remasks:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), out


def plot(summary: list[dict], path: Path) -> None:
    """Accuracy against NFE per sample, one line per policy family (fixed: per score)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: OrderedDict[str, list[dict]] = OrderedDict()
    for s in summary:
        key = s["family"]
        if key == "fixed":
            key = "fixed/" + s["setting"].split("score=")[1].split(",")[0]
        groups.setdefault(key, []).append(s)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    markers = "os^Dv<>PXh*p"
    for i, (name, pts) in enumerate(groups.items()):
        pts = sorted(pts, key=lambda p: p["nfe"])
        ax.plot(
            [p["nfe"] for p in pts],
            [p["accuracy"] for p in pts],
            marker=markers[i % 12],
            label=name,
            linewidth=1.5,
            markersize=6,
        )
    ax.set_xscale("log")
    ax.set_xlabel("NFE per sample (log scale; gen 64, block 16, dual cache)")
    ax.set_ylabel("exact match, 600 held-out problems")
    ax.set_title("tiny model: every built-in commit policy at three or more operating points")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path, help="sweep folders (rows.jsonl)")
    p.add_argument("--plot", type=Path, default=None, help="write the plot here (PNG)")
    args = p.parse_args()
    text, summary = table(load(args.folders))
    print(text)
    if args.plot:
        plot(summary, args.plot)


if __name__ == "__main__":
    main()
