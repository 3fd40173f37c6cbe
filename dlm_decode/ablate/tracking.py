"""Weights & Biases logging of a finished sweep (optional: ``pip install dlm-decode[wandb]``).

Every run of the grid becomes a W&B run (grouped by sweep) with its config, one history
step per sample (``sample/*``), its summary metrics, and a histogram of tokens committed
per step (plus the mean commit count at each step index). A final ``<name>/summary`` run
holds the summary table and the plots.

Logging happens after the rows are complete and is computed from them, so a sweep that was
killed and resumed logs exactly what an uninterrupted one logs. Runs already logged are
listed in ``wandb_logged.json`` in the sweep folder and are not logged twice. The plots
logged are listed in ``wandb_plots.json`` with a digest of each PNG: a rerun that redraws a
plot differently (a plot setting changed, or rows were added) logs a new summary run with
the table and every plot, and a rerun that changes nothing logs nothing.

Mode: ``wandb.mode`` from the config; else ``WANDB_MODE`` when set; else online when an
API key is configured (``WANDB_API_KEY`` or a ``wandb login``), otherwise offline.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import math
import netrc
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dlm_decode.ablate.config import AblationConfig, RunSpec
from dlm_decode.ablate.store import atomic_write_text
from dlm_decode.evaluate import row_latency_share

__all__ = [
    "PLOTS_MARKER",
    "SUMMARY_KEYS",
    "WandbMissingError",
    "WandbUnreachableError",
    "check_wandb",
    "check_wandb_reachable",
    "effective_mode",
    "import_wandb",
    "log_sweep",
    "plot_digests",
    "resolve_mode",
    "sample_metrics",
]

#: Summary metrics logged per run (the table's numeric columns).
SUMMARY_KEYS = (
    "n",
    "accuracy",
    "tokens_per_s",
    "nfe_per_sample",
    "tokens_per_nfe",
    "token_forwards_per_sample",
    "speedup",
    "nfe_reduction",
    "wall_s",
)


#: The sweep folder's record of the plots logged to W&B: plot name → SHA-256 of its PNG.
PLOTS_MARKER = "wandb_plots.json"


def plot_digests(files: dict[str, Path]) -> dict[str, str]:
    """SHA-256 of every PNG among ``files`` that exists (``name → hex digest``).

    Args:
        files: name → path of the files a sweep wrote.

    Returns:
        The digests of the plots, by name.
    """
    return {
        name: hashlib.sha256(Path(p).read_bytes()).hexdigest()
        for name, p in files.items()
        if str(p).endswith(".png") and Path(p).is_file()
    }


class WandbMissingError(ImportError, ValueError):
    """wandb is not installed (a ``ValueError`` too: the CLI reports it as one line)."""


class WandbUnreachableError(ValueError):
    """W&B would log online but its server cannot be reached."""


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1]
    try:
        return netrc.netrc().authenticators(host.split("/")[0]) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(configured: str | None) -> str | None:
    """The W&B mode to pass to ``wandb.init``.

    Args:
        configured: ``wandb.mode`` of the config.

    Returns:
        ``configured`` when set; ``None`` (let wandb read it) when ``WANDB_MODE`` is set or an
        API key is configured; otherwise ``"offline"``.
    """
    if configured:
        return configured
    if os.environ.get("WANDB_MODE"):
        return None
    return None if _has_api_key() else "offline"


def effective_mode(configured: str | None) -> str:
    """The mode W&B will actually run in: ``online``, ``offline`` or ``disabled``.

    Args:
        configured: ``wandb.mode`` of the config.

    Returns:
        The mode [`resolve_mode`][dlm_decode.ablate.tracking.resolve_mode] passes, or the
        one wandb reads from ``WANDB_MODE`` (``run`` → online, ``dryrun`` → offline).
    """
    mode = resolve_mode(configured) or os.environ.get("WANDB_MODE") or "online"
    mode = mode.strip().lower()
    return {"run": "online", "dryrun": "offline"}.get(mode, mode)


def _base_url() -> str:
    """The W&B server: ``WANDB_BASE_URL``, else the ``base_url`` of wandb's settings files,
    else ``https://api.wandb.ai``."""
    url = os.environ.get("WANDB_BASE_URL")
    if url:
        return url
    cfg_dir = os.environ.get("WANDB_CONFIG_DIR") or os.path.join(
        os.path.expanduser("~"), ".config", "wandb"
    )
    for path in (os.path.join("wandb", "settings"), os.path.join(cfg_dir, "settings")):
        parser = configparser.ConfigParser()
        try:
            parser.read(path)
            url = parser.get("default", "base_url", fallback="")
        except (configparser.Error, OSError):
            url = ""
        if url:
            return url
    return "https://api.wandb.ai"


def check_wandb_reachable(timeout: float = 3.0) -> None:
    """Resolve and connect to the W&B server within ``timeout`` seconds.

    Args:
        timeout: seconds for the DNS lookup and TCP connect together (roughly).

    Raises:
        WandbUnreachableError: one line naming the server and the fix.
    """
    url = _base_url()
    parts = urlsplit(url if "://" in url else f"https://{url}")
    host = parts.hostname or "api.wandb.ai"
    try:
        port = parts.port or (80 if parts.scheme == "http" else 443)
    except ValueError:
        port = 443
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = str(exc).strip() or type(exc).__name__
        raise WandbUnreachableError(
            f"W&B is set to log online but {host}:{port} cannot be reached ({reason}); "
            f"run with WANDB_MODE=offline (sync later with `wandb sync`) or --no-wandb"
        ) from None


def check_wandb(configured: str | None, timeout: float = 3.0) -> None:
    """Before decoding: wandb is importable and, when it would log online, reachable.

    Args:
        configured: ``wandb.mode`` of the config.
        timeout: seconds for the reachability check.

    Raises:
        WandbMissingError: wandb is not installed.
        WandbUnreachableError: online, and the server cannot be reached.
    """
    import_wandb()
    if effective_mode(configured) == "online":
        check_wandb_reachable(timeout)


def import_wandb() -> Any:
    """``import wandb``, or a [`WandbMissingError`][dlm_decode.ablate.tracking.WandbMissingError]
    that says how to install it."""
    try:
        import wandb
    except ImportError as exc:
        raise WandbMissingError(
            "W&B logging needs wandb: pip install 'dlm-decode[wandb]' (or run with --no-wandb)"
        ) from exc
    return wandb


def sample_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The per-sample metrics logged at each history step (``sample/*``).

    ``sample/latency_share_s`` is the row's share of its batch's decode time (the same for
    every row of a batch), ``sample/batch_latency_s`` the batch's wall time (absent for
    rows written before it was recorded).

    Args:
        row: a sweep row.

    Returns:
        Metric name → value.
    """
    nfe = row["nfe"]
    return {
        "sample/index": int(row["sample_index"]),
        "sample/correct": int(bool(row["correct"])),
        "sample/nfe": int(nfe),
        "sample/response_tokens": int(row["response_tokens"]),
        "sample/tokens_per_nfe": row["response_tokens"] / nfe if nfe else 0.0,
        "sample/token_forwards": int(row.get("token_forwards", 0)),
        "sample/latency_share_s": row_latency_share(row),
        **(
            {"sample/batch_latency_s": float(row["batch_latency_s"])}
            if row.get("batch_latency_s") is not None
            else {}
        ),
    }


def _clean(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def log_sweep(
    cfg: AblationConfig,
    out: Path,
    runs: Sequence[RunSpec],
    rows: Sequence[dict[str, Any]],
    table: Sequence[dict[str, Any]],
    files: dict[str, Path],
    extra: dict[str, Any],
    *,
    say: Callable[[str], None],
) -> list[str]:
    """Log every run (and a summary run) to W&B.

    A run already listed in ``wandb_logged.json`` is not logged again. The summary run
    (table, plots, ``extra``) is logged when a run was, or when a plot differs from the one
    last logged (its digest in ``wandb_plots.json``): a plot redrawn after a plot setting
    changed reaches W&B even though no run is new.

    Args:
        cfg: the config.
        out: the sweep folder.
        runs: the runs.
        rows: all rows (sorted by run and sample index).
        table: the summary table.
        files: plot files (PNG) to attach to the summary run.
        extra: counterfactual/audit results for the summary run.
        say: status output.

    Returns:
        The run ids logged by this call.
    """
    wandb = import_wandb()
    mode = resolve_mode(cfg.wandb.mode)
    marker = out / "wandb_logged.json"
    logged: list[str] = json.loads(marker.read_text()) if marker.exists() else []
    plots_marker = out / PLOTS_MARKER
    logged_plots: dict[str, str] = {}
    if plots_marker.exists():
        try:
            logged_plots = dict(json.loads(plots_marker.read_text()))
        except (ValueError, TypeError):  # unreadable: log every plot again
            logged_plots = {}
    digests = plot_digests(files)
    redrawn = sorted(name for name, d in digests.items() if logged_plots.get(name) != d)
    group = cfg.wandb.group or cfg.name
    by_run: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_run.setdefault(r["run_id"], []).append(r)
    summ = {t["run_id"]: t for t in table}
    settings = wandb.Settings(silent=True, console="off", x_disable_stats=True)
    wdir = os.environ.get("WANDB_DIR") or str(out)
    new: list[str] = []

    def init(name: str, config: dict[str, Any], job: str) -> Any:
        return wandb.init(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            group=group,
            name=name,
            job_type=job,
            tags=[cfg.name, *cfg.wandb.tags],
            config=config,
            mode=mode,
            dir=wdir,
            reinit="create_new",
            settings=settings,
        )

    for run in runs:
        if run.run_id in logged or run.run_id not in summ:
            continue
        rs = sorted(by_run.get(run.run_id, []), key=lambda r: int(r["sample_index"]))
        wr = init(run.label, {"sweep": cfg.name, **run.describe()}, "ablation-run")
        for step, row in enumerate(rs):
            wr.log(sample_metrics(row), step=step)
        commits = [c for r in rs for c in r["commits"]]
        if commits:
            hist = wandb.Histogram(commits, num_bins=max(1, min(64, max(commits))))
            longest = max(len(r["commits"]) for r in rs)
            mean_by_step = [
                sum(r["commits"][i] for r in rs if i < len(r["commits"]))
                / max(1, sum(i < len(r["commits"]) for r in rs))
                for i in range(longest)
            ]
            steps_tab = wandb.Table(
                columns=["step", "mean_commits"],
                data=[[i + 1, m] for i, m in enumerate(mean_by_step)],
            )
            wr.log({"commits/per_step_hist": hist, "commits/mean_by_step": steps_tab}, step=len(rs))
            wr.summary["commits/mean_per_step"] = sum(commits) / len(commits)
            wr.summary["commits/max_per_step"] = max(commits)
        for k in SUMMARY_KEYS:
            wr.summary[k] = _clean(summ[run.run_id].get(k))
        wr.finish()
        logged.append(run.run_id)
        new.append(run.run_id)
        atomic_write_text(marker, json.dumps(logged) + "\n")
    if new or redrawn:
        wr = init(
            f"{cfg.name}/summary",
            {"sweep": cfg.name, "config": cfg.model_dump(mode="json")},
            "ablation-summary",
        )
        cols = [c for c in table[0]] if table else []
        wt = wandb.Table(
            columns=cols,
            data=[
                [
                    _clean(t.get(c)) if not isinstance(t.get(c), dict) else json.dumps(t.get(c))
                    for c in cols
                ]
                for t in table
            ],
        )
        payload: dict[str, Any] = {"summary_table": wt}
        for name in digests:
            payload[f"plots/{name}"] = wandb.Image(str(files[name]))
        wr.log(payload)
        for k, v in extra.items():
            wr.summary[k] = json.loads(json.dumps(v, default=str))
        wr.summary["plots/redrawn"] = redrawn
        wr.finish()
        atomic_write_text(
            plots_marker, json.dumps({**logged_plots, **digests}, indent=2, sort_keys=True) + "\n"
        )
        shown = mode or os.environ.get("WANDB_MODE") or "online"
        again = [name for name in redrawn if name in logged_plots]
        plots_note = f"; redrawn plots logged again: {', '.join(again)}" if again else ""
        say(f"W&B: logged {len(new)} runs (mode {shown}){plots_note}")
    return new
