"""The CommitPolicy contract, checked for every registered policy.

The tests iterate ``dlm_decode.list_plugins("policy")``, so a plugin gets these checks for
free; the helpers (:func:`check_policy_contract`, :func:`no_host_sync`, …) are reused by
``tests/test_example_plugin.py`` for the example third-party plugin.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, ClassVar
from unittest import mock

import pytest
import torch
from conftest import DEVICES
from hypothesis import given, settings
from strategies import PolicyInput, policy_inputs

import dlm_decode
from dlm_decode.interfaces import CommitPolicy, StepState

#: Every registered policy key (``frechet.v1``, …), instantiated with default params.
POLICY_KEYS = [row["key"] for row in dlm_decode.list_plugins("policy")]

#: Examples per (policy, device) for the contract properties.
CONTRACT_EXAMPLES = 200

#: Tensor methods that copy device data to the host (a sync on CUDA).
HOST_SYNC_METHODS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__")


class HostSyncError(AssertionError):
    """A policy read tensor data on the host inside ``select``."""


def _forbidden(name: str) -> Callable[..., Any]:
    def raiser(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        raise HostSyncError(
            f"select() called Tensor.{name}(): policies must stay on the device "
            f"(no .item(), .tolist(), bool(tensor), …); return a tensor mask instead"
        )

    return raiser


@contextlib.contextmanager
def no_host_sync(device: str | torch.device) -> Iterator[None]:
    """Fail on any host read of tensor data inside the block.

    Patches :data:`HOST_SYNC_METHODS` on ``torch.Tensor`` to raise :class:`HostSyncError`;
    on CUDA also sets ``torch.cuda.set_sync_debug_mode("error")`` so that syncs made in C++
    (``nonzero``, copies to the host, …) fail too.
    """
    with contextlib.ExitStack() as stack:
        for name in HOST_SYNC_METHODS:
            stack.enter_context(mock.patch.object(torch.Tensor, name, _forbidden(name)))
        if torch.device(device).type == "cuda":
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            stack.callback(torch.cuda.set_sync_debug_mode, previous)
        yield


def select_without_sync(policy: CommitPolicy, inp: PolicyInput) -> torch.Tensor:
    """``policy.select`` on ``inp`` under :func:`no_host_sync`."""
    with no_host_sync(inp.confidence.device):
        return policy.select(inp.confidence, inp.masked, inp.state)


def check_commit_mask(commit: Any, inp: PolicyInput) -> None:
    """Assert the contract on one ``select`` result.

    Bool tensor, same shape and device; commits only masked positions; at least one
    commit in every row with a masked position and none in a row without.
    """
    assert isinstance(commit, torch.Tensor), f"select returned {type(commit).__name__}"
    assert commit.dtype == torch.bool, f"commit mask has dtype {commit.dtype}, not bool"
    assert commit.shape == inp.masked.shape
    assert commit.device.type == inp.masked.device.type
    commit, masked = commit.cpu(), inp.masked.cpu()
    assert not (commit & ~masked).any(), "committed a position that is not masked"
    has_masked = masked.any(-1)
    per_row = commit.sum(-1)
    assert (per_row[has_masked] >= 1).all(), "a row with masked positions committed nothing"
    assert (per_row[~has_masked] == 0).all(), "a row with nothing masked committed something"


def check_policy_contract(policy: CommitPolicy, inp: PolicyInput) -> torch.Tensor:
    """Every contract check on one input: mask contract, no host sync, inputs untouched,
    unmasked confidence values ignored, deterministic. Returns the commit mask."""
    conf_before, masked_before = inp.confidence.clone(), inp.masked.clone()
    commit = select_without_sync(policy, inp)
    check_commit_mask(commit, inp)
    assert torch.equal(inp.confidence, conf_before), "select modified the confidences"
    assert torch.equal(inp.masked, masked_before), "select modified the mask"
    # Values at unmasked positions are meaningless: overwrite them, same answer.
    scrambled = torch.where(inp.masked, inp.confidence, 1 - inp.confidence)
    again = policy.select(scrambled, inp.masked, inp.state)
    assert torch.equal(again, commit), "select depends on values at unmasked positions"
    return commit


# --------------------------------------------------------------------------------------
# The contract, for every registered policy
# --------------------------------------------------------------------------------------


def test_every_builtin_policy_is_registered() -> None:
    names = {key.split(".")[0] for key in POLICY_KEYS}
    assert {"fixed", "threshold", "factor", "frechet", "frechet_robust"} <= names


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("key", POLICY_KEYS)
@settings(max_examples=CONTRACT_EXAMPLES, deadline=None)
@given(inp=policy_inputs())
def test_policy_commits_only_masked_and_at_least_one_per_row(
    key: str, device: str, inp: PolicyInput
) -> None:
    policy = dlm_decode.get_policy(key)
    check_policy_contract(policy, inp.to(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("key", POLICY_KEYS)
def test_policy_handles_single_position_blocks(key: str, device: str) -> None:
    policy = dlm_decode.get_policy(key)
    for masked in ([[True]], [[False]], [[True], [False]]):
        m = torch.tensor(masked)
        state = StepState(0, 0, 1, 1, m.sum(-1))
        inp = PolicyInput(torch.full(m.shape, 0.5), m, state, [], [])
        check_policy_contract(policy, inp.to(device))


# --------------------------------------------------------------------------------------
# The checker itself catches violations
# --------------------------------------------------------------------------------------


class _HostReadPolicy(CommitPolicy):
    """Breaks the contract: reads tensor data on the host through ``read``."""

    name: ClassVar[str] = "bad_host_read"

    def __init__(self, read: Callable[[torch.Tensor], Any]) -> None:
        super().__init__()
        self.read = read

    def select(
        self, confidence: torch.Tensor, masked: torch.Tensor, state: StepState
    ) -> torch.Tensor:
        self.read(masked.sum())
        return masked.clone()


class _EverythingPolicy(CommitPolicy):
    """Breaks the contract: commits unmasked positions too."""

    name: ClassVar[str] = "bad_everything"

    def select(
        self, confidence: torch.Tensor, masked: torch.Tensor, state: StepState
    ) -> torch.Tensor:
        return torch.ones_like(masked)


def _simple_input() -> PolicyInput:
    masked = torch.tensor([[True, False, True], [False, False, False]])
    state = StepState(0, 0, 1, 3, masked.sum(-1))
    return PolicyInput(torch.tensor([[0.9, 0.2, 0.4], [0.1, 0.1, 0.1]]), masked, state, [], [])


@pytest.mark.parametrize(
    ("read", "method"),
    [
        (lambda t: t.item(), "item"),
        (lambda t: t.tolist(), "tolist"),
        (lambda t: bool(t), "__bool__"),
        (lambda t: int(t), "__int__"),
        (lambda t: float(t), "__float__"),
        (lambda t: t.numpy(), "numpy"),
    ],
    ids=["item", "tolist", "bool", "int", "float", "numpy"],
)
def test_no_host_sync_guard_catches_host_reads(
    read: Callable[[torch.Tensor], Any], method: str
) -> None:
    with pytest.raises(HostSyncError, match=method):
        select_without_sync(_HostReadPolicy(read), _simple_input())


def test_no_host_sync_guard_restores_tensor_methods() -> None:
    with contextlib.suppress(HostSyncError), no_host_sync("cpu"):
        torch.tensor(1.0).item()
    assert torch.tensor(2.0).item() == 2.0


def test_contract_check_catches_commits_of_unmasked_positions() -> None:
    with pytest.raises(AssertionError, match="not masked"):
        check_policy_contract(_EverythingPolicy(), _simple_input())
