"""The contract-v2 example plugin (``docs/examples/dlm-decode-recheck``) works from its entry
point through ``generate``, ``eval``, ``ablate`` (counterfactual trace and commit audit
included) and the fast path, and passes its own tests.

Like ``tests/test_example_plugin.py``: the package is pip-installed from a copy into a
temporary folder; the commands run as subprocesses with ``DLM_DECODE_PLUGINS=recheck``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from plugin_support import install_example, plugin_env, run_example_tests

import dlm_decode
from dlm_decode import registry as registry_module
from dlm_decode.fast import FastDecoder

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "dlm-decode-recheck"
PROMPT = "sort: 5143132214512231\n"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_example(EXAMPLE, tmp_path_factory)


def _run(site: Path, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "dlm_decode", *argv],
        cwd=cwd,
        env=plugin_env(site, "recheck"),
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture
def registered(site: Path) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(site))
        mp.setenv(registry_module.ENV_VAR, "recheck")
        registry_module.reset_registry()
        try:
            yield
        finally:
            registry_module.reset_registry([])
            sys.modules.pop("dlm_decode_recheck", None)


def test_recheck_generates_and_evaluates_from_its_entry_point(site: Path, tmp_path: Path) -> None:
    done = _run(
        site, "generate", "--policy", "recheck", "--policy-arg", "doubt=0.5", PROMPT, cwd=tmp_path
    )
    assert "recheck(doubt=0.5, max_entropy=0.5, max_rechecks=1) [recheck.v1]" in done.stderr
    done = _run(site, "eval", "--policy", "recheck", "--limit", "6", "--json", cwd=tmp_path)
    summary = json.loads(done.stdout)
    assert summary["n"] == 6 and summary["settings"]["policy"] == "recheck.v1"


def test_recheck_sweeps_with_counterfactual_trace_and_audit(site: Path, tmp_path: Path) -> None:
    cfg = {
        "name": "recheck_sweep",
        "model": {"name": "tiny", "device": "cpu", "threads": 1},
        "tasks": [{"name": "synthetic", "limit": 4}],
        "caches": ["dual"],
        "lengths": [{"gen_length": 32, "block_length": 16}],
        "batch_size": 4,
        "policies": [{"policy": "recheck", "args": {"doubt": [0.3, 0.6]}}, {"policy": "threshold"}],
        "counterfactual": {
            "enabled": True,
            "driver": {"policy": "recheck"},
            "policies": [{"policy": "recheck"}, {"policy": "eb"}, {"policy": "threshold"}],
            "samples": 2,
        },
        "audit": {
            "enabled": True,
            "samples": 2,
            "max_steps": 4,
            "policies": [{"policy": "recheck"}],
        },
        "wandb": {"enabled": False},
        "plots": {"enabled": True, "profile_policy": {"policy": "recheck"}, "profile_steps": 2},
    }
    path = tmp_path / "recheck.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _run(site, "ablate", str(path), "--out", str(tmp_path / "out"), "--no-progress", cwd=tmp_path)
    out = tmp_path / "out"
    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 4 and {r["policy_key"] for r in rows} == {"recheck.v1", "threshold.v1"}
    report = (out / "report.md").read_text()
    assert "## Counterfactual trace" in report and "## Commit audit" in report
    assert "recheck(doubt=0.3, max_entropy=0.5, max_rechecks=1)" in report
    assert (out / "profiles.png").is_file()


def test_recheck_on_the_fast_path_equals_the_reference(registered: None) -> None:
    model = dlm_decode.load_model("tiny")
    prompts = [model.tokenizer(p)["input_ids"] for p in (PROMPT, "copy: jigiuroujgttdoky\n")]
    kw = dict(policy="recheck:doubt=0.6", gen_length=32, block_length=16)
    ref = dlm_decode.generate(model, prompts, **kw)
    fast = FastDecoder(model, graphs=False, **kw)
    for _ in range(2):
        got = fast.generate(prompts)
        assert torch.equal(got.sequences, ref.sequences)
        assert torch.equal(got.remask_counts, ref.remask_counts)


def test_recheck_own_tests_pass_against_the_installed_copy(site: Path, tmp_path: Path) -> None:
    out = run_example_tests(EXAMPLE, "dlm_decode_recheck", site, "recheck", tmp_path)
    assert "2 passed" in out
