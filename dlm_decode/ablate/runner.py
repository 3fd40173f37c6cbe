"""Running a sweep: resumable, crash-safe, data-parallel over processes.

For each run of the grid (see [`expand_runs`][dlm_decode.ablate.config.expand_runs]) the
runner decodes the samples not yet in the sweep folder, appends one JSONL row per sample
as each batch finishes, and finally (the last rank to finish, or rank 0 after a real
``torch.distributed`` barrier) merges, tabulates, plots and logs. Every input is checked
and the folder locked before anything is written (see
``dlm_decode.ablate.locking``).

Determinism: a run's samples are split into fixed batches (``batch_size`` consecutive
samples of the rank's share); on resume only the missing samples of a batch are decoded.
Greedy decoding does not depend on batch composition (the Decoder guarantees batched ==
alone). With ``temperature > 0`` each sample is decoded alone with a seed derived from the
run's seed and the sample id, so its noise never depends on what else was in the batch.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
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
from dlm_decode.ablate.config import AblationConfig, RunSpec, check_batch_size, expand_runs
from dlm_decode.ablate.locking import (
    SweepLock,
    clear_done_marker,
    done_marker,
    done_ranks,
    merge_lock,
    write_done_marker,
)
from dlm_decode.ablate.report import SweepResult, finish_sweep
from dlm_decode.ablate.store import (
    MERGED,
    RowStore,
    atomic_write_text,
    merge_rank_files,
    rank_file,
    read_sweep_rows,
)
from dlm_decode.ablate.tracking import check_wandb
from dlm_decode.decoder import Decoder
from dlm_decode.evaluate import decode_and_score, get_task
from dlm_decode.models.loading import load_model, resolve_device
from dlm_decode.registry import BUILTIN_PLUGINS, ENTRY_POINT_GROUP, get_registry
from dlm_decode.tasks.base import check_limit, load_samples

__all__ = [
    "DistInfo",
    "SweepResult",
    "check_sweep_inputs",
    "dist_info",
    "environment_info",
    "plugin_distributions",
    "run_sweep",
    "sample_seed",
    "used_components",
]


@dataclass
class DistInfo:
    """Rank, world size and, when there is one, a real barrier.

    Attributes:
        rank: this process's rank.
        world: number of processes.
        barrier: blocks until every rank calls it (``torch.distributed.barrier``); a no-op
            unless ``source`` is ``torch``.
        source: ``torch`` (an initialised ``torch.distributed`` process group, as under
            ``accelerate launch`` or torchrun), ``env`` (``RANK``/``WORLD_SIZE`` only: the
            ranks finish through done markers instead of a barrier) or ``single``.
    """

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = field(default=lambda: None)
    source: str = "single"

    @property
    def has_barrier(self) -> bool:
        """Whether ``barrier`` really waits for every rank."""
        return self.source == "torch"


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "")
    if not text.strip():
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not an integer; set it to a whole number") from None


def dist_info(cpu: bool) -> DistInfo:
    """Rank and world size of this process.

    Under ``accelerate launch`` or torchrun (``LOCAL_RANK`` and ``MASTER_ADDR`` set) the
    ``accelerate.PartialState`` process group is used, and its barrier only when
    ``torch.distributed`` really is initialised with that many processes. Otherwise rank and
    world come from ``RANK``/``WORLD_SIZE`` and the sweep has no barrier (its ranks finish
    through done markers, see ``dlm_decode.ablate.locking``).

    Args:
        cpu: the sweep runs on CPU (accelerate then uses the gloo backend).

    Returns:
        The [`DistInfo`][dlm_decode.ablate.runner.DistInfo].

    Raises:
        ValueError: ``WORLD_SIZE`` or ``RANK`` is not an integer, or ``RANK`` is not in
            ``0 … WORLD_SIZE-1``.
    """
    world_env = _env_int("WORLD_SIZE", 1)
    if world_env < 1:
        raise ValueError(f"WORLD_SIZE={world_env} must be ≥ 1 (the number of processes)")
    if world_env == 1:
        return DistInfo()
    try:
        from accelerate import PartialState
    except ImportError:
        PartialState = None
    if PartialState is not None and "LOCAL_RANK" in os.environ and "MASTER_ADDR" in os.environ:
        state = PartialState(cpu=cpu)
        if state.num_processes > 1:
            real = (
                torch.distributed.is_available()
                and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() == state.num_processes
            )
            if real:
                return DistInfo(
                    state.process_index, state.num_processes, torch.distributed.barrier, "torch"
                )
            return DistInfo(state.process_index, state.num_processes, lambda: None, "env")
    rank = _env_int("RANK", 0)
    if not 0 <= rank < world_env:
        raise ValueError(
            f"RANK={rank} is not a rank of WORLD_SIZE={world_env}; give each process a "
            f"different RANK in 0..{world_env - 1}"
        )
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


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def plugin_distributions() -> list[dict[str, Any]]:
    """Every plugin loaded in the registry, with the distribution that provides it.

    One entry per plugin (its entry-point or module name, the registry's ``source``):
    ``distribution`` and ``version`` (the built-ins report the ``dlm-decode``
    distribution; a plugin module registered by name, e.g. a config's ``plugins``, the
    distribution that installs its top-level package, or ``None`` when it is not
    installed), ``builtin``, and ``provides``, the versioned keys it registered
    (``policy frechet.v1``).

    Returns:
        The entries, sorted by source.
    """
    provides: dict[str, list[str]] = {}
    for row in get_registry().listing():
        provides.setdefault(row["source"], []).append(f"{row['kind']} {row['key']}")
    try:
        eps = {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    except Exception:  # unreadable metadata: report what is known
        eps = {}
    try:
        top_level = importlib.metadata.packages_distributions()
    except Exception:
        top_level = {}
    out = []
    for source in sorted(provides):
        builtin = source in BUILTIN_PLUGINS
        dist: str | None = None
        version: str | None = None
        if builtin:
            dist = "dlm-decode"
            version = _dist_version(dist) or dlm_decode.__version__
        elif source in eps and getattr(eps[source], "dist", None) is not None:
            dist, version = eps[source].dist.name, eps[source].dist.version
        else:
            names = top_level.get(source.split(".")[0], [])
            if names:
                dist = names[0]
                version = _dist_version(dist)
        out.append(
            {
                "source": source,
                "distribution": dist,
                "version": version,
                "builtin": builtin,
                "provides": sorted(provides[source]),
            }
        )
    return out


def used_components(runs: Sequence[RunSpec]) -> dict[str, list[str]]:
    """The resolved versioned keys of the policies and caches the runs use.

    Args:
        runs: the runs of the grid.

    Returns:
        ``{"policies": ["frechet.v1", …], "caches": ["dual.v1", …]}``, each sorted.
    """
    return {
        "policies": sorted({r.policy_key for r in runs}),
        "caches": sorted({r.cache_key for r in runs}),
    }


def environment_info(
    cfg: AblationConfig, device: str, world: int, runs: Sequence[RunSpec] | None = None
) -> dict[str, Any]:
    """Versions, hardware, seeds, plugins and components of this invocation
    (``environment.json``).

    Args:
        cfg: the config (seeds).
        device: the resolved device.
        world: number of processes.
        runs: the runs of the grid (default: expanded from ``cfg``), for the policy and
            cache keys.

    Returns:
        The JSON-ready dict; ``plugins`` lists every loaded plugin with its distribution
        and version (see [`plugin_distributions`][dlm_decode.ablate.runner.plugin_distributions]),
        ``components`` the versioned policy and cache keys (see
        [`used_components`][dlm_decode.ablate.runner.used_components]).
    """

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
        "plugins": plugin_distributions(),
        "components": used_components(runs if runs is not None else expand_runs(cfg)),
    }


def decode_batch(
    model: Any,
    task: Any,
    run: RunSpec,
    batch: Sequence[tuple[int, Any]],
    rank: int,
) -> list[dict[str, Any]]:
    """Decode and score one batch of ``(sample_index, Sample)``; returns their rows.

    The rows decoded together by one ``generate`` call (the whole batch when greedy, each
    sample alone when sampled) share their timing: ``batch_latency_s`` is that call's wall
    time, ``batch_rows`` how many rows it decoded and ``latency_share_s`` the one divided
    by the other (the row's share, not its own latency; see
    [`row_latency_share`][dlm_decode.evaluate.row_latency_share]).

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


def check_sweep_inputs(
    cfg: AblationConfig,
    *,
    limit: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    use_wandb: bool = False,
) -> tuple[str, list[RunSpec], list[Any], list[list[Any]]]:
    """Everything a sweep checks before it writes or decodes anything.

    The limit and batch size, the device, every task's options and samples (a positive
    limit, unique ids, at least one sample) and, when W&B logs online, that its server is
    reachable. ``--dry-run`` calls this too, so a dry run that passes does not fail on
    any of these later.

    Args:
        cfg: a validated config.
        limit: the sample cap (``--limit``).
        batch_size: the batch size override (``--batch-size``).
        device: the device override (``--device``).
        use_wandb: W&B logging is on (``cfg.wandb.enabled`` is checked too).

    Returns:
        The device, the runs, the task objects and each task's samples.

    Raises:
        ValueError: one line naming the problem and the fix (W&B, task, device, limit or
            batch size).
    """
    check_limit(limit, "--limit")
    if batch_size is not None:
        check_batch_size(batch_size, "--batch-size")
    dev = resolve_device(device or cfg.model.device)
    runs = expand_runs(cfg)
    tasks, samples = [], []
    for i, t in enumerate(cfg.tasks):
        task = get_task(t.name, **t.task_kwargs())
        n = t.limit
        if limit is not None:
            n = limit if n is None else min(n, limit)
        what = "--limit" if limit is not None and n == limit else f"tasks[{i}].limit"
        tasks.append(task)
        samples.append(load_samples(task, n, what=what))
    if use_wandb and cfg.wandb.enabled:
        check_wandb(cfg.wandb.mode)
    return dev, runs, tasks, samples


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

    Nothing is written before [`check_sweep_inputs`][dlm_decode.ablate.runner.check_sweep_inputs]
    passes and this process holds its lock of the folder
    (``dlm_decode.ablate.locking.SweepLock``); a second sweep on the same folder
    fails at once with a ``SweepLockedError`` naming the first. In a sharded sweep the last
    rank to finish merges the rank files and writes the table; the others return with
    ``result.merged`` false and ``result.waiting_for`` listing the ranks still running.

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

    Raises:
        ValueError: a bad input (see ``check_sweep_inputs``), a bad ``RANK``/``WORLD_SIZE``,
            or ``SweepLockedError``.
    """
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(out_dir)
    dev, runs, tasks, samples = check_sweep_inputs(
        cfg, limit=limit, batch_size=batch_size, device=device, use_wandb=use_wandb
    )
    dist = dist_info(cpu=dev == "cpu")
    with SweepLock(out, dist.rank, dist.world):
        return _run_locked(
            cfg, out, dist, runs, tasks, samples, dev, batch_size, use_wandb, plots, progress, say
        )


def _run_locked(
    cfg: AblationConfig,
    out: Path,
    dist: DistInfo,
    runs: list[RunSpec],
    tasks: list[Any],
    samples: list[list[Any]],
    dev: str,
    batch_size: int | None,
    use_wandb: bool,
    plots: bool,
    progress: bool,
    say: Callable[[str], None],
) -> SweepResult:
    """The body of [`run_sweep`][dlm_decode.ablate.runner.run_sweep], under its lock."""
    rank, world = dist.rank, dist.world
    if cfg.model.threads is not None:
        torch.set_num_threads(cfg.model.threads)
    bs = batch_size or cfg.batch_size
    if rank == 0:
        resolved = cfg.model_dump(mode="json")
        atomic_write_text(out / "config.resolved.yaml", yaml.safe_dump(resolved, sort_keys=False))
        atomic_write_text(
            out / "environment.json",
            json.dumps(environment_info(cfg, dev, world, runs), indent=2) + "\n",
        )
    if world == 1:
        # Rank files left by an interrupted multi-process run: the exclusive folder lock
        # means no rank is running, so every one of them is closed.
        merge_rank_files(out)
    store = None
    with merge_lock(out):
        # Under the merge lock, so that no merge deletes the shard this rank reopens.
        if world > 1:
            clear_done_marker(out, rank)
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
        if todo:
            store = RowStore(rank_file(out, rank, world))
    already = sum(len(samples[r.task_index]) for r in runs) - total * world
    say(
        f"ablate {cfg.name}: {len(runs)} runs, {sum(len(s) for s in samples)} samples/run-set, "
        f"rank {rank}/{world}: {total} samples to decode"
        + (f" (resuming; ~{max(already, 0)} rows already done)" if done else "")
    )
    decoded = 0
    if store is not None:
        if store.dropped_bytes:
            say(f"dropped a torn final line ({store.dropped_bytes} bytes) from {store.path}")
        try:
            model = load_model(cfg.model.name, device=dev, dtype=cfg.model.dtype)
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
        finally:
            store.close()
    result = SweepResult(out_dir=out, runs=runs, decoded=decoded)
    if world > 1:
        write_done_marker(out, rank, world, decoded)
        dist.barrier()  # a real one under torch.distributed; then rank 0 merges
        if dist.has_barrier and rank != 0:
            result.merged = False
            return result
        with merge_lock(out):
            if not done_marker(out, rank).exists():
                result.merged = False
                say(f"rank {rank}/{world}: done; another rank already merged every shard")
                return result
            running = sorted(set(range(world)) - done_ranks(out, world))
            if running:
                result.merged, result.waiting_for = False, running
                say(
                    f"rank {rank}/{world}: done ({decoded} rows decoded); rank(s) "
                    f"{', '.join(map(str, running))} still running: the last rank to finish "
                    f"merges the rows and writes the table"
                )
                return result
            n = merge_rank_files(out, ranks=range(world))
            say(f"rank {rank}/{world}: every rank is done; merged {n} rows into {out / MERGED}")
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
