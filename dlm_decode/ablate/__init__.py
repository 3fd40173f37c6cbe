"""Ablation sweeps: which policy, which margin, which cache, on which task, at what cost.

One YAML config describes a grid; ``dlm-decode ablate CONFIG`` runs it resumably (one JSONL
row per (run, sample), fsync'd as it completes), data-parallel under ``accelerate launch``,
and writes a summary table, plots, optional counterfactual-trace and commit-audit reports,
and (optionally) W&B runs. See ``docs/guides/ablations.md``.

Example:
    ```python
    from dlm_decode.ablate import load_config, run_sweep

    cfg = load_config("experiments/configs/tiny_cpu.yaml")
    result = run_sweep(cfg, "runs/tiny_cpu", use_wandb=False)
    best = max(result.table, key=lambda row: row["accuracy"])
    ```
"""

from __future__ import annotations

from dlm_decode.ablate.cli import add_arguments, run
from dlm_decode.ablate.config import (
    AblationConfig,
    AblationConfigError,
    RunSpec,
    Setting,
    expand_runs,
    expand_settings,
    load_config,
    setting_label,
)
from dlm_decode.ablate.counterfactual import (
    AuditPolicy,
    AuditResult,
    CounterfactualPolicy,
    CounterfactualTrace,
    commit_audit,
    counterfactual_trace,
)
from dlm_decode.ablate.report import TIMING_COLUMNS, build_table, read_table_csv
from dlm_decode.ablate.runner import SweepResult, run_sweep
from dlm_decode.ablate.store import read_rows, read_sweep_rows

__all__ = [
    "TIMING_COLUMNS",
    "AblationConfig",
    "AblationConfigError",
    "AuditPolicy",
    "AuditResult",
    "CounterfactualPolicy",
    "CounterfactualTrace",
    "RunSpec",
    "Setting",
    "SweepResult",
    "add_arguments",
    "build_table",
    "commit_audit",
    "counterfactual_trace",
    "expand_runs",
    "expand_settings",
    "load_config",
    "read_rows",
    "read_sweep_rows",
    "read_table_csv",
    "run",
    "run_sweep",
    "setting_label",
]
