"""Two real ``dlm-decode ablate`` processes on one sweep folder.

(a) Two sweeps on the same ``--out``: the second fails at once (exit 2, one line naming
the first's pid, host and start time) and the folder ends with exactly one row per
(run, sample). (b) The sharded reproduction of the issue: ``WORLD_SIZE=2 RANK=0`` started
first, ``RANK=1`` after a delay; rank 0 finishes first and must neither merge nor delete
rank 1's shard; the last rank merges: every row, once, no shard file left.

Both run on the shipped ``tiny`` model (2 settings × 60 synthetic problems, 120 rows);
the observed counts are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dlm_decode.ablate import read_rows

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = 60
SETTINGS = 2
N_ROWS = SAMPLES * SETTINGS

pytestmark = pytest.mark.skipif(
    not (ROOT / "dlm_decode/assets/tiny/model.safetensors").is_file(),
    reason="the shipped tiny checkpoint is not built",
)


def _config(tmp_path: Path) -> Path:
    cfg = {
        "name": "concurrency",
        "model": {"name": "tiny", "device": "cpu", "threads": 1},
        "tasks": [{"name": "synthetic", "limit": SAMPLES}],
        "caches": ["dual"],
        "lengths": [{"gen_length": 32, "block_length": 16}],
        "batch_size": 5,
        "policies": [{"policy": "fixed"}, {"policy": "threshold", "args": {"threshold": 0.9}}],
        "wandb": {"enabled": False},
        "plots": {"enabled": False},
    }
    path = tmp_path / "concurrency.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")])
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    e.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
        TOKENIZERS_PARALLELISM="false",
        **extra,
    )
    return e


def _cmd(cfg: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dlm_decode",
        "ablate",
        str(cfg),
        "--out",
        str(out),
        "--no-wandb",
        "--no-plots",
        "--no-progress",
    ]


def _wait_for_rows(path: Path, proc: subprocess.Popen[str], timeout: float = 120.0) -> None:
    """Wait until ``path`` holds a row: the process then holds its lock and is decoding."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if path.exists() and path.read_bytes().count(b"\n") >= 1:
            return
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"the sweep exited {proc.returncode} early: {err[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no row in {path} after {timeout} s")


def _keys(rows: list[dict]) -> list[tuple[str, str]]:
    return [(r["run_id"], r["sample_id"]) for r in rows]


def test_second_sweep_on_the_same_folder_fails_at_once(tmp_path: Path) -> None:
    cfg, out = _config(tmp_path), tmp_path / "out"
    first = subprocess.Popen(
        _cmd(cfg, out), env=_env(), cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for_rows(out / "rows.jsonl", first)
        t0 = time.monotonic()
        second = subprocess.run(
            _cmd(cfg, out), env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        elapsed = time.monotonic() - t0
        first_still_running = first.poll() is None
        _, first_err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    rows = read_rows(out / "rows.jsonl")
    unique = len(set(_keys(rows)))
    print(
        f"\n[concurrent sweeps] first exit {first.returncode}; second exit "
        f"{second.returncode} after {elapsed:.1f} s (first still running then: "
        f"{first_still_running}); rows.jsonl: {len(rows)} rows, {unique} unique, "
        f"expected {N_ROWS}"
    )
    print(f"[concurrent sweeps] second's stderr: {second.stderr.strip()}")
    assert second.returncode == 2, second.stderr[-2000:]
    errors = [ln for ln in second.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1, second.stderr
    msg = errors[0]
    assert msg.startswith("dlm-decode: error: sweep folder"), msg
    assert f"pid {first.pid} on host {socket.gethostname()} since " in msg, msg
    assert "another --out" in msg
    assert first_still_running, "the second sweep waited for the first instead of failing"
    assert first.returncode == 0, first_err[-2000:]
    assert len(rows) == unique == N_ROWS


def test_sharded_ranks_without_a_barrier_merge_every_row_once(tmp_path: Path) -> None:
    """``WORLD_SIZE=2 RANK=0 … & sleep; WORLD_SIZE=2 RANK=1 …`` (the issue's reproduction)."""
    cfg, out = _config(tmp_path), tmp_path / "out"
    procs: dict[int, subprocess.Popen[str]] = {}
    ended: dict[int, float] = {}
    try:
        procs[0] = subprocess.Popen(
            _cmd(cfg, out), env=_env(WORLD_SIZE="2", RANK="0"), cwd=tmp_path,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        _wait_for_rows(out / "rows.rank0.jsonl", procs[0])  # rank 0 is decoding
        procs[1] = subprocess.Popen(
            _cmd(cfg, out), env=_env(WORLD_SIZE="2", RANK="1"), cwd=tmp_path,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        outputs: dict[int, str] = {}
        t0 = time.monotonic()
        while len(ended) < 2 and time.monotonic() - t0 < 600:
            for r, p in procs.items():
                if r not in ended and p.poll() is not None:
                    ended[r] = time.monotonic()
            time.sleep(0.05)
        for r, p in procs.items():
            outputs[r] = p.communicate(timeout=60)[1]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    rows = read_rows(out / "rows.jsonl")
    unique = len(set(_keys(rows)))
    left = sorted(p.name for p in out.glob("rows.rank*"))
    first_done = min(ended, key=ended.get) if ended else None
    print(
        f"\n[sharded] rank 0 exit {procs[0].returncode}, rank 1 exit {procs[1].returncode}; "
        f"rank {first_done} finished first; rows.jsonl: {len(rows)} rows, {unique} unique, "
        f"expected {N_ROWS}; rows per rank: "
        f"{ {r: sum(1 for x in rows if x['rank'] == r) for r in (0, 1)} }; "
        f"shard files left: {left}"
    )
    for r in (0, 1):
        print(f"[sharded] rank {r} said: {outputs[r].strip().splitlines()[-1:]}")
    assert procs[0].returncode == 0, outputs[0][-2000:]
    assert procs[1].returncode == 0, outputs[1][-2000:]
    assert len(rows) == unique == N_ROWS
    assert {r["rank"] for r in rows} == {0, 1}
    assert left == []
    merged = [r for r in (0, 1) if "every rank is done; merged" in outputs[r]]
    assert len(merged) == 1, outputs  # exactly one rank merged
    early = 1 - merged[0]
    assert "still running" in outputs[early] or "already merged" in outputs[early]
    if first_done == 0:  # the case: rank 0 finished while rank 1 was appending
        assert merged == [1] and "rank(s) 1 still running" in outputs[0]
    assert (out / "summary.csv").is_file()
