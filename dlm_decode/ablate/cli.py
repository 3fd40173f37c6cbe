"""``dlm-decode ablate CONFIG``: the command-line front of the sweep runner.

Every user error is one line (``dlm-decode: error: …``, exit code 2) raised before any
model loads or any file is written: the config, the flags, the device, the tasks and
their samples, W&B reachability when it logs online, and the sweep folder's lock.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from dlm_decode.ablate.config import load_config
from dlm_decode.ablate.runner import check_sweep_inputs, run_sweep
from dlm_decode.argtypes import positive_int

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``ablate`` options to ``parser``."""
    parser.add_argument("config", help="the sweep's YAML file (experiments/configs/NAME.yaml)")
    parser.add_argument(
        "--out", default=None, help="sweep folder (default runs/<name>); rerun to resume"
    )
    parser.add_argument(
        "--limit", type=positive_int, default=None, help="cap every task's samples (CI-size runs)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=None, help="override batch_size")
    parser.add_argument("--device", default=None, help="override model.device")
    parser.add_argument("--no-wandb", action="store_true", help="do not log to W&B")
    parser.add_argument("--no-plots", action="store_true", help="do not draw plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything a run checks (config, device, tasks, samples, W&B) and list "
        "the runs; decode and write nothing",
    )


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Show warnings as ``dlm-decode: warning: …`` lines (no source line under them)."""

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        print(f"dlm-decode: warning: {message}", file=file or sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def run(args: argparse.Namespace) -> int:
    """Validate the config and every input (before any model loads), then run or resume
    the sweep.

    Args:
        args: the parsed ``ablate`` arguments.

    Returns:
        The exit code (0; errors are raised as ``ValueError`` and reported by the CLI as one
        line with exit code 2).
    """
    with _one_line_warnings():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    use_wandb = not args.no_wandb and cfg.wandb.enabled
    kw: dict[str, Any] = {"limit": args.limit, "batch_size": args.batch_size}
    if args.dry_run:
        _, runs, _, _ = check_sweep_inputs(cfg, device=args.device, use_wandb=use_wandb, **kw)
        for r in runs:
            print(json.dumps({"run_id": r.run_id, "label": r.label}))
        print(f"{len(runs)} runs; config, device, tasks and samples OK", file=sys.stderr)
        return 0
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    run_sweep(
        cfg,
        out,
        use_wandb=use_wandb,
        plots=not args.no_plots,
        progress=not args.no_progress,
        device=args.device,
        **kw,
    )
    return 0
