"""``dlm-decode ablate CONFIG``: the command-line front of the sweep runner."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dlm_decode.ablate.config import expand_runs, load_config
from dlm_decode.ablate.runner import run_sweep
from dlm_decode.ablate.tracking import import_wandb

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``ablate`` options to ``parser``."""
    parser.add_argument("config", help="the sweep's YAML file (experiments/configs/NAME.yaml)")
    parser.add_argument(
        "--out", default=None, help="sweep folder (default runs/<name>); rerun to resume"
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="cap every task's samples (CI-size runs)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="override batch_size")
    parser.add_argument("--device", default=None, help="override model.device")
    parser.add_argument("--no-wandb", action="store_true", help="do not log to W&B")
    parser.add_argument("--no-plots", action="store_true", help="do not draw plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--dry-run", action="store_true", help="validate and list the runs; decode nothing"
    )


def run(args: argparse.Namespace) -> int:
    """Validate the config (before any model loads), then run or resume the sweep."""
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be ≥ 1, got {args.limit}")
    cfg = load_config(args.config)
    runs = expand_runs(cfg)
    if args.dry_run:
        for r in runs:
            print(json.dumps({"run_id": r.run_id, "label": r.label}))
        print(f"{len(runs)} runs", file=sys.stderr)
        return 0
    use_wandb = not args.no_wandb and cfg.wandb.enabled
    if use_wandb:
        import_wandb()  # fail now, not after hours of decoding
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    run_sweep(
        cfg,
        out,
        limit=args.limit,
        batch_size=args.batch_size,
        use_wandb=use_wandb,
        plots=not args.no_plots,
        progress=not args.no_progress,
        device=args.device,
    )
    return 0
