"""The example cache plugin (``docs/examples/dlm-decode-burst``) installs, is found through
its entry point, decodes through ``generate`` and ``eval`` and on the fast path, and
passes its own tests (which call [`check_cache`][dlm_decode.testing.check_cache])."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from plugin_support import install_example, plugin_env, run_example_tests

import dlm_decode
from dlm_decode import registry as registry_module
from dlm_decode.fast import FastDecoder

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "dlm-decode-burst"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_example(EXAMPLE, tmp_path_factory)


@pytest.fixture
def registered(site: Path) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(site))
        mp.setenv(registry_module.ENV_VAR, "burst")
        registry_module.reset_registry()
        try:
            yield
        finally:
            registry_module.reset_registry([])
            sys.modules.pop("dlm_decode_burst", None)


def test_burst_is_listed_and_evaluates_from_its_entry_point(site: Path, tmp_path: Path) -> None:
    env = plugin_env(site, "burst")
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "dlm_decode", *a],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    listing = run("plugins", "--kind", "cache", "--json")
    assert listing.returncode == 0, listing.stderr
    rows = {r["key"]: r for r in json.loads(listing.stdout)}
    assert rows["burst.v1"]["source"] == "burst" and rows["burst.v1"]["params"] == {
        "min_commits": 4
    }
    done = run(
        "eval",
        "--cache",
        "burst",
        "--cache-arg",
        "min_commits=2",
        "--policy",
        "fixed",
        "--steps",
        "64",
        "--limit",
        "4",
        "--json",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["settings"]["cache_label"] == "burst(min_commits=2)" and out["n"] == 4


def test_burst_on_the_fast_path_equals_the_reference(registered: None) -> None:
    model = dlm_decode.load_model("tiny")
    ids = [model.tokenizer("sort: 5143132214512231\n")["input_ids"]]
    kw = dict(cache="burst:min_commits=2", policy="fixed", steps=32, gen_length=64, block_length=16)
    ref = dlm_decode.generate(model, ids, **kw)
    fast = FastDecoder(model, graphs=False, **kw)
    for _ in range(2):
        got = fast.generate(ids)
        assert torch.equal(got.sequences, ref.sequences)
        assert got.token_forwards == ref.token_forwards


def test_burst_own_tests_pass_against_the_installed_copy(site: Path, tmp_path: Path) -> None:
    out = run_example_tests(EXAMPLE, "dlm_decode_burst", site, "burst", tmp_path)
    assert "2 passed" in out
