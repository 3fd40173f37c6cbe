"""Ablation sweeps: config validation, grid expansion, kill -9 / resume, W&B offline
read-back, counterfactual trace, commit audit and a 2-process accelerate run.

Everything runs on a tiny random LLaDA checkpoint with the synthetic task's character-level
tokenizer and a fake task registered from a plugin module written by the tests (so that
subprocesses can register it through the config's ``plugins`` field).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from dlm_decode.ablate import (
    TIMING_COLUMNS,
    AblationConfigError,
    commit_audit,
    counterfactual_trace,
    expand_runs,
    expand_settings,
    load_config,
    read_rows,
    read_table_csv,
    run_sweep,
)
from dlm_decode.ablate.store import RowStore, read_sweep_rows, repair_tail
from dlm_decode.config import DecodeConfig, PolicyRef
from dlm_decode.evaluate import ROW_TIMING_FIELDS

ROOT = Path(__file__).resolve().parents[1]

FAKE_TASKS = '''
"""A fake task plugin for the ablation tests."""
from dlm_decode.hookspecs import hookimpl
from dlm_decode.tasks.base import Sample, Task

WORDS = ("copy", "sort", "add", "word")


class FakeAblTask(Task):
    name = "fake_abl"
    version = 1
    chat = False

    def __init__(self, n: int = 40) -> None:
        self.n = n

    def samples(self, limit=None):
        out = [
            Sample(id=f"fake-{i:03d}", prompt=f"{WORDS[i % 4]}: {'abcdefghij'[: 3 + i % 7]}{i}\\n",
                   reference=None, meta={"family": WORDS[i % 4]})
            for i in range(self.n)
        ]
        return out[:limit] if limit is not None else out

    def score(self, sample, completion):
        ok = sum(map(ord, completion)) % 3 == 0
        return {"correct": ok, "extracted": completion[:4], "family": sample.meta["family"]}


class FakeDupTask(FakeAblTask):
    """Like fake_abl, but two samples share an id (a broken data file)."""

    name = "fake_dup"

    def samples(self, limit=None):
        out = super().samples(None)
        out[5].id = out[2].id
        return out[:limit] if limit is not None else out


@hookimpl
def register_tasks(register):
    register(FakeAblTask)
    register(FakeDupTask)


from plugin_support import TaggedDual


@hookimpl
def register_caches(register):
    register(TaggedDual)
'''


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A peaky random checkpoint (so that rules commit several tokens) and the plugin."""
    from safetensors.torch import load_file, save_file

    from dlm_decode.models.testing import write_random_checkpoint
    from dlm_decode.tasks.synthetic import build_tokenizer

    base = tmp_path_factory.mktemp("ablate")
    ckpt = write_random_checkpoint(
        base / "ckpt",
        "llada",
        seed=1,
        tokenizer=build_tokenizer(),
        vocab_size=100,
        mask_token_id=3,
        eos_token_id=2,
        pad_token_id=0,
        max_length=256,
    )
    weights = load_file(str(ckpt / "model.safetensors"))
    weights["model.transformer.ff_out.weight"] *= 150.0  # confident, varied profiles
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    plugdir = base / "plug"
    plugdir.mkdir()
    (plugdir / "abl_fake_tasks.py").write_text(FAKE_TASKS)
    sys.path.insert(0, str(plugdir))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {"base": base, "ckpt": ckpt, "plugdir": plugdir}
    torch.set_num_threads(threads)
    sys.path.remove(str(plugdir))
    from dlm_decode.registry import reset_registry

    reset_registry()


def make_config(env: dict[str, Any], **over: Any) -> dict[str, Any]:
    """The small sweep the tests run (4 runs × 12 samples)."""
    cfg: dict[str, Any] = {
        "name": "abl_test",
        "plugins": ["abl_fake_tasks"],
        "model": {"name": str(env["ckpt"]), "device": "cpu", "threads": 1},
        "tasks": [{"name": "fake_abl", "limit": 12}],
        "caches": ["dual"],
        "lengths": [{"gen_length": 32, "block_length": 8}],
        "seeds": [0],
        "batch_size": 2,
        "baseline": {"policy": "fixed"},
        "policies": [
            {"policy": "fixed"},
            {"policy": "threshold", "args": {"threshold": 0.9}},
            {"matched": {"margins": [0.25]}},
        ],
        "wandb": {"enabled": False},
        "plots": {"enabled": False},
    }
    cfg.update(over)
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def sub_env(env: dict[str, Any]) -> dict[str, str]:
    e = dict(os.environ)
    paths = [str(env["plugdir"]), str(ROOT / "tests"), str(ROOT), e.get("PYTHONPATH", "")]
    e["PYTHONPATH"] = os.pathsep.join(paths)
    e.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        DLM_DECODE_PLUGINS="",
        HF_HUB_OFFLINE="1",
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
    )
    return e


def strip_timing(table: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in t.items() if k not in TIMING_COLUMNS} for t in table]


def strip_row(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in (*ROW_TIMING_FIELDS, "rank")}


def rows_by_key(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["run_id"], r["sample_id"]): strip_row(r) for r in rows}


@pytest.fixture(scope="module")
def reference(env: dict[str, Any]) -> dict[str, Any]:
    """An uninterrupted in-process sweep with plots and W&B (offline) enabled."""
    out = env["base"] / "reference"
    wdir = env["base"] / "wandb"
    wdir.mkdir()
    cfg = load_config(
        make_config(
            env,
            wandb={"enabled": True, "project": "abl-test"},
            plots={"enabled": True, "profile_steps": 2},
        )
    )
    old = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_DIR", "WANDB_SILENT")}
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=str(wdir), WANDB_SILENT="true")
    try:
        res = run_sweep(cfg, out, progress=False)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {"out": out, "result": res, "wandb_dir": wdir, "cfg": cfg}


# --------------------------------------------------------------------------------------
# Config validation and grid expansion
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        (
            {
                "policies": [
                    {"policy": "fixed"},
                    {"policy": "threshold"},
                    {"policy": "frechet", "args": {"margin": -0.1}},
                ]
            },
            "policies[2].args.margin: Input should be greater than or equal to 0",
        ),
        (
            {
                "policies": [
                    {"policy": "fixed"},
                    {"policy": "threshold", "args": {"threshold": [0.5, 1.5]}},
                ]
            },
            "policies[1].args.threshold[1]: Input should be less than or equal to 1",
        ),
        (
            {"policies": [{"policy": "fixed"}, {"policy": "frechett"}]},
            "policies[1].policy: unknown policy 'frechett'. Did you mean 'frechet'",
        ),
        (
            {"policies": [{"policy": "fixed"}, {"policy": "factor", "argz": {}}]},
            "policies[1].argz: unknown field",
        ),
        (
            {"policies": [{"policy": "fixed"}, {"policy": "factor", "args": {"f": 0.5}}]},
            "policies[1].args.f: unknown parameter of factor (allowed: factor)",
        ),
        (
            {"policies": [{"policy": "fixed"}, {"matched": {"margins": [0.1, 1.2]}}]},
            "policies[1].matched.margins: every margin must lie in [0, 1)",
        ),
        (
            {"lengths": [{"gen_length": 30, "block_length": 8}]},
            "lengths[0]: gen_length=30 is not a multiple of block_length=8",
        ),
        ({"caches": ["dual", "duall"]}, "caches[1].name: unknown cache 'duall'"),
        (
            {"tasks": [{"name": "fake_abl", "limit": 0}]},
            "tasks[0].limit: must be a positive number of samples (or omitted for every "
            "sample), got 0",
        ),
        (
            {"tasks": [{"name": "fake_abl", "limit": -1}]},
            "tasks[0].limit: must be a positive number of samples (or omitted for every "
            "sample), got -1",
        ),
        (
            {"batch_size": 0},
            "batch_size: must be a positive integer (prompts decoded together), got 0",
        ),
        ({"temperature": float("inf")}, "temperature: Input should be a finite number"),
        ({"name": ".."}, "name: '..' is not a safe sweep name"),
        ({"name": "a/b"}, "name: 'a/b' is not a safe sweep name"),
        ({"name": "."}, "name: '.' is not a safe sweep name"),
        (
            {"tasks": [{"name": "fake_abl", "shots": 2}]},
            "tasks[0]: task 'fake_abl' does not take shots (--shots); its options: n",
        ),
        (
            {"plugins": ["abl_fake_tasks", "no_such_plugin_mod"]},
            "plugins[1]: cannot import plugin module 'no_such_plugin_mod' (No module named",
        ),
        (
            {"baseline": {"policy": "threshold", "args": {"threshold": 0.3}}},
            "baseline: no policy setting of the grid matches threshold",
        ),
        ({"batch_size": "many"}, "batch_size: Input should be a valid integer"),
    ],
)
def test_invalid_configs_name_the_yaml_path(
    env: dict[str, Any], tmp_path: Path, patch: dict[str, Any], expected: str
) -> None:
    path = write_config(tmp_path / "bad.yaml", make_config(env, **patch))
    with pytest.raises(AblationConfigError) as info:
        load_config(path)
    assert expected in str(info.value), str(info.value)


def test_cli_reports_config_errors_before_loading_a_model(
    env: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dlm_decode import cli
    from dlm_decode.models import loading

    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("the model must not load for an invalid config")

    monkeypatch.setattr(loading, "load_model", boom)
    bad = make_config(
        env, policies=[{"policy": "fixed"}, {"policy": "frechet", "args": {"margin": [0.2, -1]}}]
    )
    path = write_config(tmp_path / "bad.yaml", bad)
    assert cli.main(["ablate", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "policies[1].args.margin[1]: Input should be greater than or equal to 0" in err
    assert not (tmp_path / "o").exists()


def test_grid_expansion_products_matched_pairs_and_stable_ids(env: dict[str, Any]) -> None:
    cfg = load_config(
        make_config(
            env,
            caches=["prefix", "dual"],
            seeds=[0, 1],
            policies=[
                {"policy": "fixed"},
                {"policy": "threshold", "args": {"threshold": [0.5, 0.7, 0.9]}},
                {"policy": "frechet_robust", "args": {"margin": [0.1, 0.2], "eta": [0.0, 0.05]}},
                {"policy": "factor", "args": {"factor": 0.75}},
                {"matched": {"margins": [0.15, 0.25, 0.3]}},
            ],
        )
    )
    settings = [(s.policy.name, s.policy.args) for s in expand_settings(cfg)]
    assert settings[:4] == [
        ("fixed", {}),
        ("threshold", {"threshold": 0.5}),
        ("threshold", {"threshold": 0.7}),
        ("threshold", {"threshold": 0.9}),
    ]
    assert len([s for s in settings if s[0] == "frechet_robust"]) == 4
    matched = settings[-6:]
    assert matched == [
        ("factor", {"factor": 0.85}),
        ("frechet", {"margin": 0.15}),
        ("factor", {"factor": 0.75}),
        ("frechet", {"margin": 0.25}),
        ("factor", {"factor": 0.7}),
        ("frechet", {"margin": 0.3}),
    ]
    runs = expand_runs(cfg)
    # factor 0.75 appears twice in the grid (explicit and matched): one run per cache/seed.
    n_settings = len(settings) - 1
    assert len(runs) == n_settings * 2 * 2
    fixed = [r for r in runs if r.policy_key == "fixed.v2"]
    assert {r.steps for r in fixed} == {32}  # one token per step by default
    assert all(r.steps is None for r in runs if r.policy_key != "fixed.v2")
    # Ids ignore limit and batch size, and depend on everything that changes outputs.
    again = expand_runs(
        load_config(
            make_config(
                env,
                caches=["prefix", "dual"],
                seeds=[0, 1],
                batch_size=7,
                tasks=[{"name": "fake_abl", "limit": 3}],
                policies=cfg.model_dump()["policies"],
            )
        )
    )
    assert [r.run_id for r in again] == [r.run_id for r in runs]
    assert len({r.run_id for r in runs}) == len(runs)


def test_shipped_configs_validate() -> None:
    from dlm_decode.registry import get_registry

    files = sorted((ROOT / "experiments" / "configs").glob("*.yaml"))
    files += sorted((ROOT / "experiments" / "paper").glob("*.yaml"))
    assert len(files) >= 5
    tasks = set(get_registry().names("task"))
    for f in files:
        cfg = load_config(f, validate_plugins=False)
        if all(t.name in tasks for t in cfg.tasks):
            load_config(f)
            assert expand_runs(cfg)
    sweep = load_config(ROOT / "experiments/configs/tiny_sweep.yaml", validate_plugins=False)
    args = {(s.policy.name, tuple(s.policy.args.values())) for s in expand_settings(sweep)}
    for tau in (0.5, 0.7, 0.9):
        assert ("threshold", (tau,)) in args
    for f in (0.7, 0.75, 0.85, 1.0):
        assert ("factor", (f,)) in args
    for d in (0.0, 0.15, 0.25, 0.3):
        assert ("frechet", (d,)) in args
    assert {c.name for c in sweep.caches} == {"prefix", "dual"}


# --------------------------------------------------------------------------------------
# Storage, resume, kill -9
# --------------------------------------------------------------------------------------


def test_torn_final_line_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    with RowStore(path) as store:
        store.append([{"run_id": "a", "sample_id": "1"}, {"run_id": "a", "sample_id": "2"}])
    with open(path, "a") as f:
        f.write('{"run_id": "a", "sample_id": "3", "comp')
    assert [r["sample_id"] for r in read_rows(path)] == ["1", "2"]
    assert repair_tail(path) > 0
    with RowStore(path) as store:
        store.append([{"run_id": "a", "sample_id": "3"}])
    assert [r["sample_id"] for r in read_rows(path)] == ["1", "2", "3"]


def test_sweep_outputs(reference: dict[str, Any]) -> None:
    out: Path = reference["out"]
    res = reference["result"]
    for name in (
        "config.resolved.yaml",
        "environment.json",
        "rows.jsonl",
        "summary.md",
        "summary.csv",
        "report.md",
        "frontier.png",
        "commits_per_step.png",
        "profiles.png",
    ):
        assert (out / name).is_file(), name
    assert not (out / "caches.png").exists()  # one cache: nothing to compare
    envj = json.loads((out / "environment.json").read_text())
    for key in ("python", "torch", "transformers", "dlm_decode", "git", "cpu", "seeds"):
        assert key in envj
    rows = read_rows(out / "rows.jsonl")
    assert len(rows) == 4 * 12
    # Timing fields say what they are: the batch's wall time and each row's share of it.
    assert all("latency_s" not in r for r in rows)
    batches: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        assert r["batch_latency_s"] > 0 and r["batch_rows"] in (1, 2)
        assert r["latency_share_s"] == pytest.approx(r["batch_latency_s"] / r["batch_rows"])
        batches.setdefault((r["run_id"], r["sample_index"] // 2), []).append(r)
    for members in batches.values():  # batch_size 2, greedy: one generate call per batch
        assert {m["batch_latency_s"] for m in members} == {members[0]["batch_latency_s"]}
        assert all(m["batch_rows"] == len(members) for m in members)
    for t in res.table:
        mine = [r for r in rows if r["run_id"] == t["run_id"]]
        assert t["wall_s"] == pytest.approx(sum(r["latency_share_s"] for r in mine))
    assert all(r["token_forwards"] >= r["nfe"] for r in rows)
    assert all(
        float(t["token_forwards_per_sample"]) > 0 for t in read_table_csv(out / "summary.csv")
    )
    assert all(sum(r["commits"]) == 32 and len(r["commits"]) == r["nfe"] for r in rows)
    table = {t["setting"]: t for t in res.table}
    base = table["fixed(score=confidence, steps=32)"]
    assert base["is_baseline"] and base["speedup"] == 1.0 and base["nfe_per_sample"] == 32
    # The task's own families survive beside the policy family (they used to be shadowed).
    assert {r["family"] for r in rows} == {"copy", "sort", "add", "word"}
    assert {r["policy_family"] for r in rows} == {"fixed", "threshold", "factor", "frechet"}
    assert {"accuracy_copy", "accuracy_sort", "accuracy_add", "accuracy_word"} <= set(base)
    fr = table["frechet(margin=0.25)"]
    assert fr["nfe_reduction"] == pytest.approx(32 / fr["nfe_per_sample"])
    assert fr["tokens_per_nfe"] > 1.0  # the peaky model commits in parallel
    summary = (out / "summary.md").read_text()
    assert "| fake_abl | fixed(score=confidence, steps=32) * | dual | 32/8 |" in summary


def test_environment_json_lists_plugin_distributions_and_component_keys(
    reference: dict[str, Any],
) -> None:
    import importlib.metadata

    envj = json.loads((reference["out"] / "environment.json").read_text())
    plugins = {p["source"]: p for p in envj["plugins"]}
    version = importlib.metadata.version("dlm-decode")
    for source in ("dlm_decode.policies", "dlm_decode.caches", "dlm_decode.models"):
        assert plugins[source]["builtin"] is True
        assert (plugins[source]["distribution"], plugins[source]["version"]) == (
            "dlm-decode",
            version,
        )
    assert "policy frechet.v1" in plugins["dlm_decode.policies"]["provides"]
    # The config's plugin module is listed too (not installed: no distribution).
    fake = plugins["abl_fake_tasks"]
    assert fake["builtin"] is False and fake["distribution"] is None
    assert {"task fake_abl.v1", "cache tagged_dual.v1"} <= set(fake["provides"])
    runs = reference["result"].runs
    assert envj["components"] == {
        "policies": sorted({r.policy_key for r in runs}),
        "caches": ["dual.v1"],
    }
    assert {"threshold.v1", "factor.v1", "frechet.v1"} <= set(envj["components"]["policies"])


def test_plugin_distributions_name_an_installed_plugin_and_its_version(
    tmp_path: Path,
) -> None:
    import importlib

    from dlm_decode.ablate.runner import plugin_distributions
    from dlm_decode.registry import reset_registry

    site = tmp_path / "site"
    info = site / "dlm_fake_envplug-0.3.0.dist-info"
    info.mkdir(parents=True)
    meta = "Metadata-Version: 2.1\nName: dlm-fake-envplug\nVersion: 0.3.0\n"
    (info / "METADATA").write_text(meta)
    (info / "entry_points.txt").write_text("[dlm_decode]\nenvplug = dlm_fake_envplug\n")
    (site / "dlm_fake_envplug.py").write_text(
        "from dlm_decode.hookspecs import hookimpl\n"
        "from dlm_decode.tasks.base import Task\n\n"
        "class EnvTask(Task):\n"
        "    name = 'env_fake'\n    version = 2\n    chat = False\n"
        "    def samples(self, limit=None):\n        return []\n"
        "    def score(self, sample, completion):\n        return {'correct': False}\n\n"
        "@hookimpl\ndef register_tasks(register):\n    register(EnvTask)\n"
    )
    old = os.environ.get("DLM_DECODE_PLUGINS")
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    os.environ["DLM_DECODE_PLUGINS"] = "envplug"
    try:
        reset_registry()
        found = {p["source"]: p for p in plugin_distributions()}
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("dlm_fake_envplug", None)
        if old is None:
            os.environ.pop("DLM_DECODE_PLUGINS", None)
        else:
            os.environ["DLM_DECODE_PLUGINS"] = old
        reset_registry()
    assert found["envplug"] == {
        "source": "envplug",
        "distribution": "dlm-fake-envplug",
        "version": "0.3.0",
        "builtin": False,
        "provides": ["task env_fake.v2"],
    }
    assert found["dlm_decode.tasks"]["distribution"] == "dlm-decode"


def test_table_reads_rows_written_before_the_latency_fields_were_renamed(
    reference: dict[str, Any],
) -> None:
    from dlm_decode.ablate import build_table

    cfg, res = reference["cfg"], reference["result"]
    rows = read_sweep_rows(reference["out"])
    old = [
        {
            **{k: v for k, v in r.items() if k not in ROW_TIMING_FIELDS},
            "latency_s": r["latency_share_s"],
        }
        for r in rows
    ]
    new_table = build_table(cfg, res.runs, rows)
    old_table = build_table(cfg, res.runs, old)
    assert [t["wall_s"] for t in old_table] == pytest.approx([t["wall_s"] for t in new_table])
    assert [t["tokens_per_s"] for t in old_table] == pytest.approx(
        [t["tokens_per_s"] for t in new_table]
    )
    from dlm_decode.ablate.tracking import sample_metrics

    assert sample_metrics(old[0])["sample/latency_share_s"] == rows[0]["latency_share_s"]
    assert "sample/batch_latency_s" not in sample_metrics(old[0])
    assert sample_metrics(rows[0])["sample/batch_latency_s"] == rows[0]["batch_latency_s"]


def _wait_rows(path: Path, proc: subprocess.Popen, n: int, timeout: float = 60.0) -> int:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if path.exists():
            count = path.read_bytes().count(b"\n")
            if count >= n:
                return count
        if proc.poll() is not None:
            break
        time.sleep(0.005)
    raise AssertionError(f"sweep did not write {n} rows in time (exit {proc.poll()})")


def test_kill_9_and_resume_equals_uninterrupted(
    env: dict[str, Any], reference: dict[str, Any], tmp_path: Path
) -> None:
    cfg_path = write_config(tmp_path / "abl_test.yaml", make_config(env))
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "dlm_decode",
        "ablate",
        str(cfg_path),
        "--out",
        str(out),
        "--no-wandb",
        "--no-progress",
    ]
    proc = subprocess.Popen(
        cmd, env=sub_env(env), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        written = _wait_rows(out / "rows.jsonl", proc, 6)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert written < 48, "the sweep finished before it could be killed"
    before = read_rows(out / "rows.jsonl")
    # Simulate a crash in the middle of a write as well: a torn final line.
    with open(out / "rows.jsonl", "a") as f:
        f.write('{"run_id": "' + before[-1]["run_id"] + '", "sample_id": "fake-0')
    done = subprocess.run(
        cmd, env=sub_env(env), cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dropped a torn final line" in done.stderr
    after = read_rows(out / "rows.jsonl")
    keys = [(r["run_id"], r["sample_id"]) for r in after]
    assert len(keys) == len(set(keys)) == 48  # none twice, none lost
    assert after[: len(before)] == before  # finished rows are never rewritten
    ref_rows = rows_by_key(read_rows(reference["out"] / "rows.jsonl"))
    assert rows_by_key(after) == ref_rows
    assert strip_timing(read_table_csv(out / "summary.csv")) == strip_timing(
        read_table_csv(reference["out"] / "summary.csv")
    )
    # A third invocation decodes nothing.
    again = subprocess.run(
        [*cmd, "--no-plots"],
        env=sub_env(env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "0 samples to decode" in again.stderr


# --------------------------------------------------------------------------------------
# W&B offline read-back
# --------------------------------------------------------------------------------------


def _read_wandb_file(path: Path) -> dict[str, Any]:
    """Parse an offline ``.wandb`` file (LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, payload = 32768, 7, b""
    records = []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        if length == 0 and kind == 0:
            pos += left
            continue
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(payload)
            records.append(rec)
            payload = b""

    def items(seq: Any) -> dict[str, Any]:
        return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in seq}

    out: dict[str, Any] = {"history": [], "summary": {}, "config": {}}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            out["history"].append(items(rec.history.item))
        elif kind == "summary":
            out["summary"].update(items(rec.summary.update))
        elif kind == "config":
            out["config"].update(items(rec.config.update))
        elif kind == "run":
            out["name"] = rec.run.display_name
            out["config"].update(items(rec.run.config.update))
            out["summary"].update(items(rec.run.summary.update))
    return out


def test_wandb_offline_logs_equal_the_rows_and_table(reference: dict[str, Any]) -> None:
    pytest.importorskip("wandb")
    files = sorted(reference["wandb_dir"].glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 5  # 4 runs + the summary run
    runs = {}
    for f in files:
        rec = _read_wandb_file(f)
        rid = rec["config"].get("run_id", "summary")
        runs[rid["value"] if isinstance(rid, dict) else rid] = rec
    res = reference["result"]
    rows = read_sweep_rows(reference["out"])
    for t in res.table:
        rec = runs[t["run_id"]]
        for key in ("accuracy", "nfe_per_sample", "tokens_per_nfe", "tokens_per_s", "n"):
            assert rec["summary"][key] == pytest.approx(t[key]), key
        mine = sorted(
            (r for r in rows if r["run_id"] == t["run_id"]), key=lambda r: r["sample_index"]
        )
        hist = [h for h in rec["history"] if "sample/correct" in h]
        assert [h["sample/correct"] for h in hist] == [int(r["correct"]) for r in mine]
        assert [h["sample/nfe"] for h in hist] == [r["nfe"] for r in mine]
        assert [h["sample/response_tokens"] for h in hist] == [r["response_tokens"] for r in mine]
        assert any(k.startswith("commits/per_step_hist") for h in rec["history"] for k in h)
        commits = [c for r in mine for c in r["commits"]]
        assert rec["summary"]["commits/mean_per_step"] == pytest.approx(sum(commits) / len(commits))
    assert any(k.startswith("plots/frontier") for h in runs["summary"]["history"] for k in h)
    assert json.loads((reference["out"] / "wandb_logged.json").read_text())


def _offline_sweep(
    env: dict[str, Any], out: Path, wdir: Path, plots: dict[str, Any], log: list[str]
) -> list[Path]:
    """Rerun the reference sweep's config into ``out`` with W&B offline in ``wdir``;
    return the offline run files this invocation wrote."""
    cfg = load_config(make_config(env, wandb={"enabled": True, "project": "abl-test"}, plots=plots))
    old = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_DIR", "WANDB_SILENT")}
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=str(wdir), WANDB_SILENT="true")
    try:
        res = run_sweep(cfg, out, progress=False, log=log.append)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert res.decoded == 0
    return sorted(wdir.glob("wandb/offline-run-*/run-*.wandb"))


def test_rerun_after_a_plot_setting_changed_logs_the_redrawn_plots(
    env: dict[str, Any], reference: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    from dlm_decode.ablate import plots

    out = tmp_path / "sweep"
    shutil.copytree(reference["out"], out)
    logged = json.loads((out / "wandb_plots.json").read_text())
    assert set(logged) == {"frontier", "commits_per_step", "profiles"}
    # Same settings: the plots are redrawn identically, so nothing is logged again.
    log: list[str] = []
    same = {"enabled": True, "profile_steps": 2}
    assert _offline_sweep(env, out, tmp_path / "w1", same, log) == []
    assert not any(line.startswith("W&B:") for line in log)
    # A plot setting changed: the rows are all there, but the redrawn plot is logged.
    drawn: list[tuple[Any, ...]] = []
    real = plots.plot_profiles

    def spy(steps: Any, policy: Any, path: Path, title: str) -> Path:
        drawn.append((steps, policy, title))
        return real(steps, policy, path, title)

    monkeypatch.setattr(plots, "plot_profiles", spy)
    before = (out / "profiles.png").read_bytes()
    changed = {
        "enabled": True,
        "profile_steps": 3,
        "profile_policy": {"policy": "threshold", "args": {"threshold": 0.9}},
    }
    log.clear()
    (run_file,) = _offline_sweep(env, out, tmp_path / "w2", changed, log)
    assert (out / "profiles.png").read_bytes() != before
    rec = _read_wandb_file(run_file)
    assert rec["name"] == "abl_test/summary"
    keys = {k for h in rec["history"] for k in h}
    assert any(k.startswith("plots/profiles") for k in keys), keys
    assert any(k.startswith("plots/frontier") for k in keys)  # the summary run is complete
    assert rec["summary"]["plots/redrawn"] == ["profiles"]
    assert any("redrawn plots logged again: profiles" in line for line in log), log
    now = json.loads((out / "wandb_plots.json").read_text())
    assert now["profiles"] != logged["profiles"] and now["frontier"] == logged["frontier"]
    # The profile plot drew the traced rule's own criterion, every masked position.
    ((steps, policy, title),) = drawn
    assert policy.key == "threshold.v1" and "threshold" in title and len(steps) == 3
    for caption, prof, committed in steps:
        assert f"{len(prof)} masked, {committed} committed" in caption


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------


def _capture_figure(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Keep every figure that is saved (so a test can inspect it after ``plt.close``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen: list[Any] = []
    real = plt.Figure.savefig

    def spy(fig: Any, path: Any, **kw: Any) -> None:
        seen.append(fig)
        real(fig, path, **kw)

    monkeypatch.setattr(plt.Figure, "savefig", spy)
    return seen


def _profile(m: int) -> list[float]:
    return [round(1.0 - 0.03 * i - (0.3 if i >= 5 else 0.0), 4) for i in range(m)]


def test_profiles_draw_the_traced_rules_own_criterion_at_every_masked_position(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from dlm_decode.ablate import plots
    from dlm_decode.policies.rules import FactorPolicy, FrechetPolicy, ThresholdPolicy

    seen = _capture_figure(monkeypatch)
    steps = [("16 masked", _profile(16), 5), ("11 masked", _profile(11), 3)]
    for policy, name, bound in (
        (ThresholdPolicy(ThresholdPolicy.Params(threshold=0.8)), "c(n)", "τ = 0.8"),
        (FactorPolicy(FactorPolicy.Params(factor=1.0)), "(n+1)(1−c(n))", "f = 1"),
        (FrechetPolicy(FrechetPolicy.Params(margin=0.25)), "G_n", "δ = 0.25"),
    ):
        plots.plot_profiles(steps, policy, tmp_path / "p.png", "t")
        fig = seen.pop()
        panels = [ax for ax in fig.axes if ax.get_xlabel() == "prefix size n"]
        for ax, (_, prof, _) in zip(panels, steps, strict=True):
            assert len(ax.patches) == len(prof)  # a bar per masked position
            assert ax.get_xlim()[1] > len(prof)
            xs = sorted(x for ln in ax.lines for x in ln.get_xdata() if ln.get_marker() == "o")
            assert xs == list(range(1, len(prof) + 1))  # the criterion at every n
            crit = policy.criterion(torch.tensor(prof, dtype=torch.float64))
            assert crit is not None
            n = list(range(1, len(prof) + 1))
            (curve,) = [ln for ln in ax.lines if list(ln.get_xdata()) == n]
            assert list(curve.get_ydata()) == pytest.approx(crit.values.tolist())
        texts = [t.get_text() for t in fig.legends[0].get_texts()]
        assert any(t.startswith(name) for t in texts), texts
        assert bound in texts and not (name != "G_n" and any("G_n" in t for t in texts))


def test_profiles_of_a_rule_without_a_criterion_draw_the_profile_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from dlm_decode.ablate import plots
    from dlm_decode.policies.rules import FixedPolicy, ThresholdPolicy

    seen = _capture_figure(monkeypatch)
    steps = [("16 masked", _profile(16), 1)]
    plots.plot_profiles(steps, FixedPolicy(), tmp_path / "p.png", "t")
    (ax,) = [ax for ax in seen[0].axes if ax.get_xlabel() == "prefix size n"]
    assert len(ax.patches) == 16
    assert [ln.get_marker() for ln in ax.lines if ln.get_marker() == "o"] == []
    texts = [t.get_text() for t in seen[0].legends[0].get_texts()]
    assert sorted(texts) == ["c(n) sorted confidence", "committed"]

    class Declares:  # any policy may declare a criterion, count rule or not
        def criterion(self, sorted_conf: torch.Tensor) -> Any:
            return ThresholdPolicy(ThresholdPolicy.Params(threshold=0.5)).criterion(sorted_conf)

    plots.plot_profiles(steps, Declares(), tmp_path / "p.png", "t")  # type: ignore[arg-type]
    texts = [t.get_text() for t in seen[1].legends[0].get_texts()]
    assert "τ = 0.5" in texts


def test_frontier_labels_of_close_points_never_overlap(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from dlm_decode.ablate import plots
    from dlm_decode.ablate.config import expand_runs as expand

    cfg = load_config(
        {
            "name": "close",
            "model": {"name": "tiny", "device": "cpu"},
            "tasks": [{"name": "synthetic", "limit": 2}],
            "caches": ["dual", "prefix"],
            "lengths": [{"gen_length": 32, "block_length": 8}],
            "policies": [
                {"policy": "threshold", "args": {"threshold": [0.5, 0.6, 0.7, 0.8, 0.9]}},
                {"policy": "factor", "args": {"factor": [0.7, 0.8, 0.9, 1.0]}},
                {"policy": "frechet", "args": {"margin": [0.1, 0.2, 0.3]}},
            ],
            "wandb": {"enabled": False},
        },
        validate_plugins=False,
    )
    runs = expand(cfg)
    far = len(runs) - 2  # the last two points spread the axes: the others sit in a clump
    table = [
        {
            "run_id": r.run_id,
            "task": "synthetic",
            "policy_family": r.setting.family_label,
            "setting": r.setting_label,
            "cache": r.cache,
            "gen_length": 32,
            "block_length": 8,
            "n": 2,
            "accuracy": 0.9 if i >= far else 0.5 + 0.002 * (i % 3),
            "tokens_per_s": (100.0 + 0.2 * i) * (10 if i >= far else 1),
            "tokens_per_nfe": (2.0 + 0.002 * i) * (4 if i >= far else 1),
            "token_forwards_per_sample": (300.0 + 0.5 * i) * (3 if i >= far else 1),
        }
        for i, r in enumerate(runs)
    ]
    assert len(table) == 24
    seen = _capture_figure(monkeypatch)
    plots.plot_frontier(table, runs, tmp_path / "frontier.png", "close")
    (fig,) = seen
    texts = [t for ax in fig.axes for t in ax.texts]
    assert len(texts) == 3 * 24  # every point of every panel is labelled
    measured = plots.label_boxes(fig)  # gives the closed figure a canvas, and draws it
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in texts]
    assert [tuple(b.extents) for b in boxes] == [tuple(b.extents) for b in measured]
    clashes = [
        (texts[i].get_text(), texts[j].get_text())
        for i in range(len(boxes))
        for j in range(i + 1, len(boxes))
        if boxes[i].overlaps(boxes[j])
    ]
    assert clashes == []


# --------------------------------------------------------------------------------------
# Counterfactual trace and commit audit
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(env: dict[str, Any]) -> Any:
    from dlm_decode.models import load_model

    return load_model(str(env["ckpt"]))


def test_counterfactual_trace(model: Any) -> None:
    prompts = [model.tokenizer.encode(p) for p in ("copy: abcdef\n", "sort: 5123\n", "add: 9\n")]
    margins = (0.0, 0.15, 0.25, 0.3)
    pols = []
    for d in margins:
        pols += [
            PolicyRef(name="frechet", args={"margin": d}),
            PolicyRef(name="factor", args={"factor": 1 - d}),
        ]
    pols += ["threshold:threshold=0.9", "fixed"]
    cfg = DecodeConfig(
        policy="frechet", policy_args={"margin": 0.25}, cache="dual", gen_length=32, block_length=8
    )
    tr = counterfactual_trace(model, prompts, cfg, pols)
    assert tr.rows
    # The driver's column is the decode's commit counts.
    actual = tr.result.commit_counts  # (steps, B)
    for row in tr.rows:
        assert row["actual"] == int(actual[row["step_index"], row["row"]])
        assert row["frechet(margin=0.25)"] == row["actual"]
        assert row["fixed(score=confidence)"] == 1  # one token per step without a step budget
        for d in margins:
            assert row[f"frechet(margin={d:g})"] >= row[f"factor(factor={1 - d:g})"]
            assert 1 <= row[f"frechet(margin={d:g})"] <= row["masked"]
    assert any(r["actual"] > 1 for r in tr.rows)
    assert tr.mean_counts()["actual"] > 1.0


def test_commit_audit(model: Any) -> None:
    prompts = [model.tokenizer.encode(p) for p in ("copy: abcdef\n", "sort: 5123\n")]
    cfg = DecodeConfig(
        policy="threshold",
        policy_args={"threshold": 0.5},
        cache="none",
        gen_length=16,
        block_length=8,
    )
    res = commit_audit(model, prompts, cfg, every=1, max_steps=6)
    assert res.records
    assert {r["block"] for r in res.records} <= {0, 1}
    s = res.summary()
    assert s["audited_steps"] == len(res.records)
    assert s["parallel_steps"] >= 1
    assert 0.0 <= s["token_disagreement"] <= s["step_disagreement"] <= 1.0
    # A single-token commit from the same state is what a fresh forward proposes too.
    assert s["single_disagreement"] == 0.0
    # Every record agrees with the decode's own commits.
    for r in res.records:
        assert r["committed"] <= 8 and 0 <= r["mismatched"] <= r["committed"]


def test_sweep_report_includes_counterfactual_and_audit(
    env: dict[str, Any], tmp_path: Path
) -> None:
    cfg = load_config(
        make_config(
            env,
            tasks=[{"name": "fake_abl", "limit": 2}],
            counterfactual={"enabled": True, "samples": 2},
            audit={"enabled": True, "samples": 1, "max_steps": 3},
        )
    )
    run_sweep(cfg, tmp_path / "o", progress=False, use_wandb=False)
    report = (tmp_path / "o" / "report.md").read_text()
    assert "## Counterfactual trace" in report and "## Commit audit" in report
    assert (tmp_path / "o" / "counterfactual.fake_abl.csv").is_file()
    assert (tmp_path / "o" / "audit.csv").is_file()


# --------------------------------------------------------------------------------------
# Data parallel
# --------------------------------------------------------------------------------------


def test_accelerate_two_processes_merge_to_the_same_rows(
    env: dict[str, Any], reference: dict[str, Any], tmp_path: Path
) -> None:
    # Through this interpreter, not an ``accelerate`` on PATH: ``python -m pytest`` from an
    # unactivated venv must run this test, not skip it.
    pytest.importorskip("accelerate.commands.launch", reason="accelerate is not installed")
    cfg_path = write_config(tmp_path / "abl_test.yaml", make_config(env))
    out = tmp_path / "dp"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "dlm_decode",
        "ablate",
        str(cfg_path),
        "--out",
        str(out),
        "--no-wandb",
        "--no-progress",
        "--no-plots",
    ]
    e = sub_env(env)
    e["ACCELERATE_USE_CPU"] = "true"
    done = subprocess.run(cmd, env=e, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0/2" in done.stderr and "rank 1/2" in done.stderr
    # A real torch.distributed barrier: rank 0 merges after it, no rank waits on markers.
    assert "rank 0/2: every rank is done; merged 48 rows" in done.stderr
    assert "still running" not in done.stderr and "already merged" not in done.stderr
    assert not list(out.glob("rows.rank*.jsonl"))  # merged by rank 0 after the barrier
    rows = read_rows(out / "rows.jsonl")
    assert {r["rank"] for r in rows} == {0, 1}
    assert rows_by_key(rows) == rows_by_key(read_rows(reference["out"] / "rows.jsonl"))
    assert strip_timing(read_table_csv(out / "summary.csv")) == strip_timing(
        read_table_csv(reference["out"] / "summary.csv")
    )


def test_rank_files_left_behind_are_merged_by_the_next_run(
    env: dict[str, Any], reference: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "left"
    out.mkdir()
    rows = read_rows(reference["out"] / "rows.jsonl")
    for r in (0, 1):
        (out / f"rows.rank{r}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows[r::2]))
    cfg = load_config(make_config(env))
    res = run_sweep(cfg, out, progress=False, use_wandb=False, plots=False)
    assert res.decoded == 0
    assert not list(out.glob("rows.rank*.jsonl"))
    assert rows_by_key(read_rows(out / "rows.jsonl")) == rows_by_key(rows)


def test_module_docstring_example_config_is_valid(env: dict[str, Any]) -> None:
    text = textwrap.dedent(
        f"""
        name: doc_example
        plugins: [abl_fake_tasks]
        model: {{name: "{env["ckpt"]}", device: cpu}}
        tasks: [{{name: fake_abl, limit: 4}}]
        caches: [prefix, dual]
        lengths: [{{gen_length: 32, block_length: 8}}]
        baseline: {{policy: fixed}}
        policies:
          - policy: fixed
          - policy: threshold
            args: {{threshold: [0.5, 0.7, 0.9]}}
          - matched: {{margins: [0.15, 0.25, 0.3]}}
        """
    )
    cfg = load_config(yaml.safe_load(text))
    assert len(expand_runs(cfg)) == 2 * (1 + 3 + 6)


@pytest.mark.skipif(
    not (
        Path(__file__).resolve().parents[1] / "dlm_decode/assets/tiny/model.safetensors"
    ).is_file(),
    reason="the shipped tiny checkpoint is not built",
)
def test_ci_size_sweep_on_the_shipped_tiny_model_runs_end_to_end(tmp_path: Path) -> None:
    """experiments/configs/tiny_ci.yaml, exactly as a user runs it, on the real tiny model."""
    from dlm_decode.cli import main

    cfg = Path(__file__).resolve().parents[1] / "experiments/configs/tiny_ci.yaml"
    out = tmp_path / "tiny_ci"
    assert main(["ablate", str(cfg), "--no-wandb", "--out", str(out)]) == 0
    rows = read_rows(out / "rows.jsonl")
    settings = {r["run_id"] for r in rows}
    assert len(rows) == 10 * len(settings) and len(settings) == 4
    assert all(sum(r["commits"]) == 64 and len(r["commits"]) == r["nfe"] for r in rows)
    table = (out / "summary.csv").read_text().splitlines()
    assert len(table) == 1 + len(settings)
    assert (out / "frontier.png").stat().st_size > 0
    # Rerunning the same command computes nothing new and keeps every row.
    assert main(["ablate", str(cfg), "--no-wandb", "--out", str(out)]) == 0
    assert len(read_rows(out / "rows.jsonl")) == len(rows)


def test_sweeps_differing_only_in_a_cache_arg_give_two_rows_lines_and_wandb_runs(
    env: dict[str, Any], tmp_path: Path
) -> None:
    from dlm_decode.ablate.plots import frontier_series

    cfg = load_config(
        make_config(
            env,
            caches=[
                {"name": "tagged_dual", "args": {"tag": 1}},
                {"name": "tagged_dual", "args": {"tag": 2}},
            ],
            tasks=[{"name": "fake_abl", "limit": 2}],
            baseline=None,
            policies=[{"policy": "threshold", "args": {"threshold": 0.9}}],
            wandb={"enabled": True, "project": "abl-test", "mode": "offline"},
        )
    )
    runs = expand_runs(cfg)
    assert [r.cache for r in runs] == ["tagged_dual(tag=1)", "tagged_dual(tag=2)"]
    assert len({r.run_id for r in runs}) == 2
    assert all("tagged_dual(tag=" in r.label for r in runs)
    old = os.environ.get("WANDB_DIR")
    os.environ["WANDB_DIR"] = str(tmp_path / "wandb")
    try:
        res = run_sweep(cfg, tmp_path / "out", progress=False, plots=False)
    finally:
        if old is None:
            os.environ.pop("WANDB_DIR", None)
        else:
            os.environ["WANDB_DIR"] = old
    assert sorted(t["cache"] for t in res.table) == ["tagged_dual(tag=1)", "tagged_dual(tag=2)"]
    rows = read_rows(tmp_path / "out" / "rows.jsonl")
    assert sorted({r["cache"] for r in rows}) == ["tagged_dual(tag=1)", "tagged_dual(tag=2)"]
    assert {r["cache_args"]["tag"] for r in rows} == {1, 2}
    csv_caches = {t["cache"] for t in read_table_csv(tmp_path / "out" / "summary.csv")}
    assert csv_caches == {"tagged_dual(tag=1)", "tagged_dual(tag=2)"}
    lines = frontier_series(res.table, runs, "tokens_per_nfe")
    assert sorted(lines) == ["threshold / tagged_dual(tag=1)", "threshold / tagged_dual(tag=2)"]
    logged = json.loads((tmp_path / "out" / "wandb_logged.json").read_text())
    assert sorted(logged) == sorted(r.run_id for r in runs)


def test_caches_plot_has_a_point_per_cache_setting_and_length(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dlm_decode.ablate import plots

    table = [
        {
            "setting": s,
            "cache": c,
            "gen_length": g,
            "block_length": 16,
            "token_forwards_per_sample": 100.0 * (ci + 1) + g,
            "accuracy": 0.5 + 0.1 * ci,
        }
        for s in ("threshold(threshold=0.9)", "frechet(margin=0.25)")
        for ci, c in enumerate(("none", "dual", "dual(refresh_every=4)"))
        for g in (64, 128)
    ]
    seen: list[Any] = []
    real_savefig = plt.Figure.savefig

    def spy(fig: Any, path: Any, **kw: Any) -> None:
        seen.append(fig)
        real_savefig(fig, path, **kw)

    plt.Figure.savefig = spy  # type: ignore[method-assign]
    try:
        path = plots.plot_caches(table, tmp_path / "caches.png", "t")
    finally:
        plt.Figure.savefig = real_savefig  # type: ignore[method-assign]
    assert path.stat().st_size > 0
    (fig,) = seen
    panels = [ax for ax in fig.axes if ax.get_xlabel().startswith("token-forwards")]
    assert [ax.get_title() for ax in panels] == ["gen 64, block 16", "gen 128, block 16"]
    for ax in panels:
        assert sum(len(c.get_offsets()) for c in ax.collections) == 6  # 2 settings × 3 caches
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        "none",
        "dual",
        "dual(refresh_every=4)",
    ]


# --------------------------------------------------------------------------------------
# One-line user errors, raised before any decoding (nothing written)
# --------------------------------------------------------------------------------------


def _no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from dlm_decode.ablate import runner

    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("no model may load for a user error")

    monkeypatch.setattr(runner, "load_model", boom)


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``dlm-decode`` in-process; assert exit code 2 and one stderr line; return it."""
    from dlm_decode import cli

    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("dlm-decode: error: "), lines[0]
    return lines[0]


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_duplicate_sample_ids_fail_before_decoding(
    env: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _no_model(monkeypatch)
    cfg = make_config(env, tasks=[{"name": "fake_dup", "limit": 12}])
    path = write_config(tmp_path / "dup.yaml", cfg)
    out = tmp_path / "o"
    for extra in ([], ["--dry-run"]):
        msg = _one_line_error(["ablate", str(path), "--out", str(out), *extra], capsys)
        assert "task 'fake_dup': sample id 'fake-002' occurs 2 times" in msg, msg
        assert "ids must be unique" in msg
        assert not out.exists()
    # Beyond the duplicate the data is fine: a limit that stops before it runs.
    with pytest.raises(ValueError, match="sample id 'fake-002' occurs 2 times"):
        run_sweep(load_config(cfg), out, use_wandb=False, progress=False)
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--batch-size", "-1"], "argument --batch-size: must be a positive integer, got '-1'"),
        (["--batch-size", "0"], "argument --batch-size: must be a positive integer, got '0'"),
        (["--limit", "0"], "argument --limit: must be a positive integer, got '0'"),
        (["--limit", "-3"], "argument --limit: must be a positive integer, got '-3'"),
    ],
)
def test_non_positive_batch_size_and_limit_flags_are_one_line_errors(
    env: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    flags: list[str],
    expected: str,
) -> None:
    _no_model(monkeypatch)
    path = write_config(tmp_path / "c.yaml", make_config(env))
    out = tmp_path / "o"
    msg = _one_line_error(["ablate", str(path), "--out", str(out), *flags], capsys)
    assert expected in msg, msg
    assert not out.exists()


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"batch_size": 0}, "batch_size: must be a positive integer"),
        ({"tasks": [{"name": "fake_abl", "limit": 0}]}, "tasks[0].limit: must be a positive"),
        ({"tasks": [{"name": "fake_abl", "limit": -2}]}, "got -2"),
    ],
)
def test_non_positive_yaml_batch_size_and_limit_are_one_line_errors(
    env: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    patch: dict[str, Any],
    expected: str,
) -> None:
    _no_model(monkeypatch)
    path = write_config(tmp_path / "c.yaml", make_config(env, **patch))
    out = tmp_path / "o"
    msg = _one_line_error(["ablate", str(path), "--out", str(out)], capsys)
    assert expected in msg, msg
    assert not out.exists()


def test_run_sweep_refuses_non_positive_limit_and_batch_size(
    env: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_model(monkeypatch)
    cfg = load_config(make_config(env))
    out = tmp_path / "o"
    with pytest.raises(ValueError, match=r"--batch-size must be a positive integer .* got -1"):
        run_sweep(cfg, out, batch_size=-1, use_wandb=False)
    with pytest.raises(ValueError, match=r"--batch-size must be a positive integer .* got 0"):
        run_sweep(cfg, out, batch_size=0, use_wandb=False)
    with pytest.raises(ValueError, match=r"--limit must be a positive number of samples"):
        run_sweep(cfg, out, limit=0, use_wandb=False)
    assert not out.exists()


@pytest.mark.parametrize(
    ("patch", "flags", "expected"),
    [
        (
            {"tasks": [{"name": "fake_abl", "shots": 3}]},
            [],
            "tasks[0]: task 'fake_abl' does not take shots",
        ),
        ({"model": {"name": "tiny", "device": "tpu"}}, [], "device 'tpu' is not a device"),
        ({}, ["--device", "tpu"], "device 'tpu' is not a device"),
        ({"temperature": float("inf")}, [], "temperature: Input should be a finite number"),
        ({"plugins": ["missing"]}, [], "plugins[0]: cannot import plugin module 'missing'"),
        (
            {"policies": [{"policy": "threshold", "args": {"threshold": 0.9, "bogus": 1}}]},
            [],
            "policies[0].args.bogus: unknown parameter of threshold",
        ),
        (
            {"caches": [{"name": "dual", "args": {"bogus": 1}}]},
            [],
            "caches[0].args.bogus: unknown parameter of dual",
        ),
        (
            {"counterfactual": {"driver": {"policy": "frechet", "args": {"marg": 0.1}}}},
            [],
            "counterfactual.driver.args.marg: unknown parameter of frechet",
        ),
        ({"tasks": [{"name": "fake_dup"}]}, [], "sample id 'fake-002' occurs 2 times"),
        ({"name": ".."}, [], "name: '..' is not a safe sweep name"),
    ],
)
def test_dry_run_checks_everything_a_run_checks(
    env: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    patch: dict[str, Any],
    flags: list[str],
    expected: str,
) -> None:
    _no_model(monkeypatch)
    cfg = make_config(env, **patch)
    if "plugins" in patch:
        cfg["tasks"] = [{"name": "synthetic", "limit": 2}]
    path = write_config(tmp_path / "c.yaml", cfg)
    out = tmp_path / "o"
    for extra in (["--dry-run"], []):  # the dry run fails exactly where the run would
        msg = _one_line_error(["ablate", str(path), "--out", str(out), *flags, *extra], capsys)
        assert expected in msg, msg
        assert not out.exists()


def test_dry_run_of_a_valid_config_lists_the_runs_and_writes_nothing(
    env: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dlm_decode import cli

    path = write_config(tmp_path / "c.yaml", make_config(env))
    out = tmp_path / "o"
    assert cli.main(["ablate", str(path), "--out", str(out), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all("run_id" in json.loads(ln) for ln in lines)
    assert not out.exists()


def test_unsafe_sweep_name_never_writes_into_the_current_directory(
    env: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _no_model(monkeypatch)
    work = tmp_path / "work"
    (work / "runs").mkdir(parents=True)
    path = write_config(tmp_path / "c.yaml", make_config(env, name=".."))
    monkeypatch.chdir(work)
    msg = _one_line_error(["ablate", str(path)], capsys)  # default --out runs/<name>
    assert "name: '..' is not a safe sweep name" in msg
    assert "letters, digits and . _ - only" in msg
    assert sorted(p.name for p in work.rglob("*")) == ["runs"]


def test_rows_without_run_id_are_skipped_with_one_warning(
    env: dict[str, Any],
    reference: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from dlm_decode import cli
    from dlm_decode.ablate.store import SkippedRowsWarning

    out = tmp_path / "o"
    out.mkdir()
    good = (reference["out"] / "rows.jsonl").read_text().splitlines(keepends=True)
    bad = [json.dumps({"sample_id": "fake-000", "correct": True}) + "\n", "[1, 2]\n"]
    text = "".join([*good[:3], bad[0], *good[3:10], bad[0], bad[1], *good[10:]])
    (out / "rows.jsonl").write_text(text)
    with pytest.warns(SkippedRowsWarning) as record:
        rows = read_rows(out / "rows.jsonl")
    assert len(record) == 1
    msg = str(record[0].message)
    assert str(out / "rows.jsonl") in msg
    assert "skipped 3 unusable lines" in msg
    assert "2 without run_id/sample_id (lines 4, 12)" in msg
    assert "1 not a JSON object (line 13)" in msg
    assert rows_by_key(rows) == rows_by_key(read_rows(reference["out"] / "rows.jsonl"))
    with pytest.warns(SkippedRowsWarning):
        assert len(read_sweep_rows(out)) == 48
    # The CLI resumes over it: nothing to decode, one warning line, the table is whole.
    path = write_config(tmp_path / "c.yaml", make_config(env))
    code = cli.main(["ablate", str(path), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    warned = [ln for ln in err.splitlines() if "unusable line" in ln]
    assert warned and all(ln.startswith("dlm-decode: warning: ") for ln in warned), err
    assert "0 samples to decode" in err
    assert len(read_table_csv(out / "summary.csv")) == 4


class _Conn:
    def __enter__(self) -> _Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def test_wandb_online_without_network_fails_at_once(
    env: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import socket

    pytest.importorskip("wandb")
    _no_model(monkeypatch)
    calls: list[tuple[Any, ...]] = []

    def unreachable(address: tuple[str, int], timeout: float | None = None, *a: Any) -> None:
        calls.append((address, timeout))
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    path = write_config(
        tmp_path / "c.yaml", make_config(env, wandb={"enabled": True, "project": "abl-test"})
    )
    out = tmp_path / "o"
    for extra in ([], ["--dry-run"]):
        t0 = time.monotonic()
        msg = _one_line_error(["ablate", str(path), "--out", str(out), *extra], capsys)
        assert time.monotonic() - t0 < 10
        assert "W&B is set to log online but api.wandb.ai:443 cannot be reached" in msg, msg
        assert "WANDB_MODE=offline" in msg and "--no-wandb" in msg
        assert not out.exists()
    assert calls[0] == (("api.wandb.ai", 443), 3.0)
    # --no-wandb and offline mode never connect.
    from dlm_decode.ablate.tracking import check_wandb

    calls.clear()
    monkeypatch.setenv("WANDB_MODE", "offline")
    check_wandb(None)
    check_wandb("disabled")
    assert calls == []
    # A self-hosted server from WANDB_BASE_URL, reachable: no error.
    monkeypatch.setattr(
        socket, "create_connection", lambda addr, timeout=None: calls.append(addr) or _Conn()
    )
    monkeypatch.setenv("WANDB_BASE_URL", "http://wandb.internal:8080/")
    check_wandb("online")
    assert calls == [("wandb.internal", 8080)]


# --------------------------------------------------------------------------------------
# Locks and the sharded completion protocol (in-process; the two-process runs are in
# tests/test_sweep_concurrency.py)
# --------------------------------------------------------------------------------------


def test_sweep_lock_is_exclusive_per_folder_and_per_rank(tmp_path: Path) -> None:
    import socket

    from dlm_decode.ablate.locking import SweepLock, SweepLockedError

    out = tmp_path / "o"
    host = socket.gethostname()
    with SweepLock(out, 0, 1):
        for rank, world in ((0, 1), (0, 2), (1, 2)):
            with pytest.raises(SweepLockedError) as info:
                SweepLock(out, rank, world).acquire()
            msg = str(info.value)
            assert "\n" not in msg
            assert f"is in use by pid {os.getpid()} on host {host} since " in msg, msg
            assert "(single process)" in msg and "another --out" in msg
    # Ranks of one sharded sweep share the folder; a second rank 0 does not.
    with SweepLock(out, 0, 2), SweepLock(out, 1, 2):
        with pytest.raises(SweepLockedError, match=r"\(rank 0 of WORLD_SIZE=2\)"):
            SweepLock(out, 0, 2).acquire()
        with pytest.raises(SweepLockedError) as info:
            SweepLock(out, 0, 1).acquire()
        assert "(rank 0 of WORLD_SIZE=2)" in str(info.value)
        assert "(rank 1 of WORLD_SIZE=2)" in str(info.value)
    with SweepLock(out, 0, 1):  # released
        pass


def test_lock_of_a_killed_sweep_does_not_block(env: dict[str, Any], tmp_path: Path) -> None:
    from dlm_decode.ablate.locking import SweepLock, SweepLockedError

    out = tmp_path / "o"
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from dlm_decode.ablate.locking import SweepLock\n"
        f"SweepLock(Path({str(out)!r}), 0, 1).acquire()\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=sub_env(env), stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(SweepLockedError, match=f"pid {proc.pid} "):
            SweepLock(out, 0, 1).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert (out / "sweep.lock").exists()  # the file stays; the kernel dropped the flock
    with SweepLock(out, 0, 1):
        pass


def test_cli_refuses_a_locked_folder_without_touching_it(
    env: dict[str, Any],
    reference: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dlm_decode.ablate.locking import SweepLock

    _no_model(monkeypatch)
    out = tmp_path / "o"
    out.mkdir()
    shutil.copy(reference["out"] / "rows.jsonl", out / "rows.jsonl")
    path = write_config(tmp_path / "c.yaml", make_config(env))
    with SweepLock(out, 0, 2):  # a rank of a sharded sweep is running
        before = _tree(out)
        msg = _one_line_error(["ablate", str(path), "--out", str(out)], capsys)
        assert _tree(out) == before
    assert f"sweep folder {out} is in use by pid {os.getpid()}" in msg, msg
    assert "(rank 0 of WORLD_SIZE=2)" in msg


def test_env_sharded_rank_finishing_first_keeps_the_other_shard(
    env: dict[str, Any],
    reference: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for k in ("LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    cfg = load_config(make_config(env))
    out = tmp_path / "o"
    out.mkdir()
    ref = read_rows(reference["out"] / "rows.jsonl")
    # Rank 1 is "still appending": a shard with some of its rows and no done marker.
    partial = [r for r in ref if r["sample_index"] % 2 == 1][:5]
    (out / "rows.rank1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in partial))
    shard1 = (out / "rows.rank1.jsonl").read_bytes()
    said: list[str] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    res0 = run_sweep(cfg, out, use_wandb=False, plots=False, progress=False, log=said.append)
    assert (res0.merged, res0.waiting_for, res0.decoded) == (False, [1], 24)
    assert "rank(s) 1 still running" in said[-1]
    assert (out / "rows.rank1.jsonl").read_bytes() == shard1  # never merged away
    assert (out / "rows.rank0.done").exists() and not (out / "rows.rank1.done").exists()
    assert not (out / "rows.jsonl").exists() and not (out / "summary.csv").exists()
    # A rank outside the world is one line, and nothing is written.
    before = _tree(out)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match=r"^RANK=2 is not a rank of WORLD_SIZE=2; give each"):
        run_sweep(cfg, out, use_wandb=False, plots=False, progress=False)
    assert _tree(out) == before
    # Rank 1 resumes its shard, finishes last and merges every row exactly once.
    monkeypatch.setenv("RANK", "1")
    res1 = run_sweep(cfg, out, use_wandb=False, plots=False, progress=False, log=said.append)
    assert res1.merged and res1.decoded == 24 - 5
    rows = read_rows(out / "rows.jsonl")
    assert rows_by_key(rows) == rows_by_key(ref)
    assert len(rows) == 48
    assert not list(out.glob("rows.rank*"))
    assert len(read_table_csv(out / "summary.csv")) == 4
