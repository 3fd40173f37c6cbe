"""The example third-party plugin in ``docs/examples/dlm-decode-topk`` works as documented.

The package is installed with pip into a temporary target folder (a copy of the source, so
no build files land in the repository), found through its ``dlm_decode`` entry point, and
checked with the same contract helpers every registered policy gets; its own test suite
(which calls [`dlm_decode.testing.check_policy`][dlm_decode.testing.check_policy]) runs
against the installed copy.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import DEVICES
from hypothesis import given, settings
from hypothesis import strategies as st
from plugin_support import install_example, run_example_tests

import dlm_decode
from dlm_decode import registry as registry_module
from dlm_decode.registry import Registry
from dlm_decode.settings import validate_params
from dlm_decode.testing import check_policy_on
from dlm_decode.testing.strategies import PolicyInput, policy_inputs

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "dlm-decode-topk"

#: Examples per device for the contract property of ``topk``.
TOPK_EXAMPLES = 200


@pytest.fixture(scope="module")
def topk_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Install the example with pip into a temporary folder and put it on ``sys.path``."""
    site = install_example(EXAMPLE, tmp_path_factory)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(site))
        yield site
    sys.modules.pop("dlm_decode_topk", None)
    importlib.invalidate_caches()


@pytest.fixture(scope="module")
def topk_registry(topk_site: Path) -> Registry:
    """A registry built from entry points with ``DLM_DECODE_PLUGINS=topk``."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(registry_module.ENV_VAR, "topk")
        return Registry.build(registry_module.entry_point_plugins())


def test_example_plugin_is_loaded_from_its_entry_point_when_allowed(
    topk_registry: Registry, topk_site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cls = topk_registry.resolve("policy", "topk")
    assert cls.__module__ == "dlm_decode_topk"
    assert Path(sys.modules["dlm_decode_topk"].__file__).parent == topk_site
    assert topk_registry.sources[("policy", "topk", 1)] == "topk"
    assert "frechet" in topk_registry.names("policy")  # built-ins load alongside

    monkeypatch.setenv(registry_module.ENV_VAR, "")
    filtered = Registry.build(registry_module.entry_point_plugins())
    assert "topk" not in filtered.names("policy")


def test_example_plugin_params_forbid_extras_and_validate_k(topk_registry: Registry) -> None:
    cls = topk_registry.resolve("policy", "topk")
    assert validate_params(cls, {}).k == 2
    with pytest.raises(ValueError, match=r"topk\.v1: k:"):
        validate_params(cls, {"k": 0})
    with pytest.raises(ValueError, match=r"kk: unknown parameter of topk \(allowed: k\)"):
        validate_params(cls, {"kk": 1})


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=TOPK_EXAMPLES, deadline=None)
@given(inp=policy_inputs(), k=st.integers(1, 6))
def test_example_plugin_passes_the_policy_contract_and_commits_min_k_m(
    topk_registry: Registry, device: str, inp: PolicyInput, k: int
) -> None:
    cls = topk_registry.resolve("policy", "topk")
    policy = cls(validate_params(cls, {"k": k}))
    commit = check_policy_on(policy, inp.to(device))
    m = inp.masked.sum(-1)
    assert torch.equal(commit.sum(-1).cpu(), torch.minimum(m, torch.full_like(m, k)))


def test_example_plugin_through_the_public_api(topk_site: Path) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(registry_module.ENV_VAR, "topk")
        registry_module.reset_registry()
    try:
        policy = dlm_decode.get_policy("topk", k=3)
        assert policy.key == "topk.v1"
        conf = torch.tensor([[0.1, 0.9, 0.8, 0.7, 0.2]])
        masked = torch.tensor([[True, True, False, True, True]])
        state = dlm_decode.StepState(0, 0, 1, None, masked.sum(-1))
        got = policy.select(conf, masked, state)
        assert got.tolist() == [[False, True, False, True, True]]
    finally:
        registry_module.reset_registry([])


def test_example_plugin_own_tests_pass_against_the_installed_copy(
    topk_site: Path, tmp_path: Path
) -> None:
    out = run_example_tests(EXAMPLE, "dlm_decode_topk", topk_site, "topk", tmp_path)
    assert "2 passed" in out
