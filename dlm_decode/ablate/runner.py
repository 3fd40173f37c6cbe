"""Running a sweep: resumable, crash-safe, data-parallel over processes.

For each run of the grid (see [`expand_runs`][dlm_decode.ablate.config.expand_runs]) the
runner decodes the samples not yet in the sweep folder, appends one JSONL row per sample
as each batch finishes, and finally (rank 0) merges, tabulates, plots and logs.

Determinism: a run's samples are split into fixed batches (``batch_size`` consecutive
samples of the rank's share); on resume only the missing samples of a batch are decoded.
Greedy decoding does not depend on batch composition (the Decoder guarantees batched ==
alone). With ``temperature > 0`` each sample is decoded alone with a seed derived from the
run's seed and the sample id, so its noise never depends on what else was in the batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

import dlm_decode
from dlm_decode.ablate.config import AblationConfig, RunSpec, expand_runs
from dlm_decode.ablate.report import SweepResult, finish_sweep
from dlm_decode.ablate.store import (
    RowStore,
    atomic_write_text,
    merge_rank_files,
    rank_file,
    read_sweep_rows,
)
from dlm_decode.decoder import Decoder
from dlm_decode.evaluate import decode_and_score, get_task
from dlm_decode.models.loading import load_model, resolve_device

__all__ = [
    "DistInfo",
    "SweepResult",
    "dist_info",
    "environment_info",
    "run_sweep",
    "sample_seed",
]


@dataclass
class DistInfo:
    """Rank, world size and a barrier.

    Attributes:
        rank: this process's rank.
        world: number of processes.
        barrier: blocks until every rank calls it.
        source: ``accelerate``, ``env`` or ``single``.
    """

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = field(default=lambda: None)
    source: str = "single"


def dist_info(cpu: bool) -> DistInfo:
    """Rank and world size from ``accelerate.PartialState`` when launched by accelerate
    (or torchrun), else from ``RANK``/``WORLD_SIZE``; a single process otherwise.

    Args:
        cpu: the sweep runs on CPU (accelerate then uses the gloo backend).

    Returns:
        The [`DistInfo`][dlm_decode.ablate.runner.DistInfo].
    """
    world_env = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_env <= 1:
        return DistInfo()
    try:
        from accelerate import PartialState
    except ImportError:
        PartialState = None
    if PartialState is not None and "LOCAL_RANK" in os.environ and "MASTER_ADDR" in os.environ:
        state = PartialState(cpu=cpu)
        if state.num_processes > 1:
            return DistInfo(
                state.process_index, state.num_processes, state.wait_for_everyone, "accelerate"
            )
    rank = int(os.environ.get("RANK", "0") or 0)
    return DistInfo(rank, world_env, lambda: None, "env")


def sample_seed(seed: int, sample_id: str) -> int:
    """Per-sample seed for sampled decoding (independent of batch composition)."""
    h = hashlib.sha256(f"{seed}:{sample_id}".encode()).hexdigest()
    return int(h[:8], 16)


def _git_commit() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        return {"commit": head, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_info(cfg: AblationConfig, device: str, world: int) -> dict[str, Any]:
    """Versions, hardware and seeds of this invocation (``environment.json``)."""

    def version(mod: str) -> str | None:
        try:
            return __import__(mod).__version__
        except Exception:
            return None

    gpu = None
    if torch.cuda.is_available():
        gpu = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "dlm_decode": dlm_decode.__version__,
        "wandb": version("wandb"),
        "accelerate": version("accelerate"),
        "git": _git_commit(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "device": device,
        "world_size": world,
        "seeds": list(cfg.seeds),
        "torch_threads": torch.get_num_threads(),
    }


def decode_batch(
    model: Any,
    task: Any,
    run: RunSpec,
    batch: Sequence[tuple[int, Any]],
    rank: int,
) -> list[dict[str, Any]]:
    """Decode and score one batch of ``(sample_index, Sample)``; returns their rows.

    Args:
        model: the model.
        task: the task object.
        run: the run.
        batch: ``(index, sample)`` pairs.
        rank: this process's rank (recorded in the rows).

    Returns:
        One row per sample.
    """
    samples = [s for _, s in batch]
    cfg = run.decode_config()
    groups: list[tuple[list[int], Any]] = []
    if run.temperature > 0:  # sampled: each sample alone with its own seed
        for k, s in enumerate(samples):
            c = cfg.model_copy(update={"seed": sample_seed(run.seed, s.id)})
            groups.append(([k], c))
    else:
        groups.append((list(range(len(samples))), cfg))
    rows: list[dict[str, Any] | None] = [None] * len(samples)
    for members, c in groups:
        base_rows, _ = decode_and_score(Decoder(model, c), task, [samples[k] for k in members])
        for k, base in zip(members, base_rows, strict=True):
            base.pop("prompt")
            row: dict[str, Any] = {
                "run_id": run.run_id,
                "sample_id": base.pop("id"),
                "sample_index": batch[k][0],
                "rank": rank,
                **run.describe(),
            }
            row.update({k2: v for k2, v in base.items() if k2 not in row})
            rows[k] = row
    return [r for r in rows if r is not None]


def run_sweep(
    cfg: AblationConfig,
    out_dir: str | Path,
    *,
    limit: int | None = None,
    batch_size: int | None = None,
    use_wandb: bool = True,
    plots: bool = True,
    progress: bool = True,
    device: str | None = None,
    log: Callable[[str], None] | None = None,
) -> SweepResult:
    """Run (or resume) a sweep into ``out_dir``.

    Args:
        cfg: a validated config.
        out_dir: the sweep folder (created; existing rows are reused).
        limit: cap every task's sample count (overrides a larger ``tasks[].limit``).
        batch_size: override ``cfg.batch_size``.
        use_wandb: log to W&B (also needs ``cfg.wandb.enabled``).
        plots: draw the plots.
        progress: show a progress bar.
        device: override ``cfg.model.device``.
        log: where status lines go (default stderr).

    Returns:
        A [`SweepResult`][dlm_decode.ablate.report.SweepResult].
    """
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device or cfg.model.device)
    if cfg.model.threads is not None:
        torch.set_num_threads(cfg.model.threads)
    dist = dist_info(cpu=dev == "cpu")
    rank, world = dist.rank, dist.world
    runs = expand_runs(cfg)
    bs = batch_size or cfg.batch_size
    if rank == 0:
        resolved = cfg.model_dump(mode="json")
        atomic_write_text(out / "config.resolved.yaml", yaml.safe_dump(resolved, sort_keys=False))
        atomic_write_text(
            out / "environment.json",
            json.dumps(environment_info(cfg, dev, world), indent=2) + "\n",
        )
        if world == 1:
            merge_rank_files(out)  # rank files left by an interrupted multi-process run
    # Tasks and samples first (cheap, and fails before the model loads).
    tasks, samples = [], []
    for t in cfg.tasks:
        task = get_task(t.name, **t.task_kwargs())
        n = t.limit
        if limit is not None:
            n = limit if n is None else min(n, limit)
        tasks.append(task)
        samples.append(task.samples(n))
    done = {(str(r["run_id"]), str(r["sample_id"])) for r in read_sweep_rows(out)}
    todo: list[tuple[RunSpec, list[list[tuple[int, Any]]]]] = []
    total = 0
    for run in runs:
        mine = [(i, s) for i, s in enumerate(samples[run.task_index]) if i % world == rank]
        chunks = []
        for k in range(0, len(mine), bs):
            chunk = [(i, s) for i, s in mine[k : k + bs] if (run.run_id, s.id) not in done]
            if chunk:
                chunks.append(chunk)
                total += len(chunk)
        if chunks:
            todo.append((run, chunks))
    already = sum(len(samples[r.task_index]) for r in runs) - total * world
    say(
        f"ablate {cfg.name}: {len(runs)} runs, {sum(len(s) for s in samples)} samples/run-set, "
        f"rank {rank}/{world}: {total} samples to decode"
        + (f" (resuming; ~{max(already, 0)} rows already done)" if done else "")
    )
    decoded = 0
    if todo:
        model = load_model(cfg.model.name, device=dev, dtype=cfg.model.dtype)
        store = RowStore(rank_file(out, rank, world))
        if store.dropped_bytes:
            say(f"dropped a torn final line ({store.dropped_bytes} bytes) from {store.path}")
        bar = tqdm(total=total, disable=not progress, desc=f"rank {rank}", file=sys.stderr)
        try:
            for run, chunks in todo:
                bar.set_description(run.label)
                for chunk in chunks:
                    rows = decode_batch(model, tasks[run.task_index], run, chunk, rank)
                    store.append(rows)
                    decoded += len(rows)
                    bar.update(len(rows))
        finally:
            bar.close()
            store.close()
    result = SweepResult(out_dir=out, runs=runs, decoded=decoded)
    dist.barrier()
    if rank != 0:
        return result
    merge_rank_files(out)
    return finish_sweep(
        cfg,
        out,
        runs,
        samples,
        tasks,
        result,
        device=dev,
        use_wandb=use_wandb,
        plots=plots,
        say=say,
    )
