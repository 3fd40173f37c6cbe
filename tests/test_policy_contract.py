"""The plugin contract, checked for every registered policy and cache with the public
checks of [`dlm_decode.testing`][dlm_decode.testing] (what a plugin author runs on theirs).

The tests iterate ``dlm_decode.list_plugins(...)``, so a plugin registered in the process
gets these checks for free.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
import torch
from conftest import DEVICES

import dlm_decode
from dlm_decode.interfaces import Cache, CacheContext, CommitPolicy, StepState
from dlm_decode.settings import plugin_class
from dlm_decode.testing import (
    HostSyncError,
    check_cache,
    check_policy,
    check_policy_on,
    no_host_sync,
    select_without_sync,
)
from dlm_decode.testing.strategies import PolicyInput

#: Every registered policy key (``frechet.v1``, …).
POLICY_KEYS = [row["key"] for row in dlm_decode.list_plugins("policy")]
#: Every registered cache key (``dual.v1``, …).
CACHE_KEYS = [row["key"] for row in dlm_decode.list_plugins("cache")]

#: Examples per (policy, device) for the contract properties.
CONTRACT_EXAMPLES = 200


# --------------------------------------------------------------------------------------
# The contract, for every registered policy and cache
# --------------------------------------------------------------------------------------


def test_every_builtin_plugin_is_registered() -> None:
    names = {key.split(".")[0] for key in POLICY_KEYS}
    assert {"fixed", "threshold", "factor", "frechet", "frechet_robust"} <= names
    assert {"none", "prefix", "dual"} <= {key.split(".")[0] for key in CACHE_KEYS}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("key", POLICY_KEYS)
def test_policy_passes_the_public_contract_check(key: str, device: str) -> None:
    check_policy(plugin_class("policy", key), max_examples=CONTRACT_EXAMPLES, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("key", CACHE_KEYS)
def test_cache_passes_the_public_contract_check(key: str, device: str) -> None:
    check_cache(plugin_class("cache", key), device=device)


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
        check_policy_on(_EverythingPolicy(), _simple_input())


def test_check_policy_catches_a_broken_class() -> None:
    with pytest.raises(AssertionError, match="not masked"):
        check_policy(_EverythingPolicy, max_examples=20)


class _WritingCache(Cache):
    """Breaks the cache contract: writes the sequence it is given."""

    name: ClassVar[str] = "bad_writer"

    def refresh(self, ctx: CacheContext, x: torch.Tensor, bs: int, be: int) -> torch.Tensor:
        x[:, bs] = 0
        return ctx.model.logits(x, ctx.attention_mask)[:, bs:be]

    step = refresh


class _MisalignedCache(Cache):
    """Breaks the cache contract: returns logits shifted by one position."""

    name: ClassVar[str] = "bad_shift"

    def refresh(self, ctx: CacheContext, x: torch.Tensor, bs: int, be: int) -> torch.Tensor:
        return ctx.model.logits(x, ctx.attention_mask)[:, bs - 1 : be - 1]

    step = refresh


class _WholeSequenceCache(Cache):
    """Breaks the cache contract: returns logits for every position, not the block's."""

    name: ClassVar[str] = "bad_shape"

    def refresh(self, ctx: CacheContext, x: torch.Tensor, bs: int, be: int) -> torch.Tensor:
        return ctx.model.logits(x, ctx.attention_mask)

    step = refresh


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (_WritingCache, "wrote the sequence"),
        (_MisalignedCache, "differ from a plain full forward"),
        (_WholeSequenceCache, "not \\(B, L, V\\)"),
    ],
)
def test_check_cache_catches_broken_caches(cls: type[Cache], message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        check_cache(cls)


class _UndeclaredEntropy(CommitPolicy):
    """Breaks contract v2: reads entropy without declaring it."""

    name: ClassVar[str] = "bad_undeclared"

    def select(self, confidence, masked, state):
        return masked & (state.signals.entropy >= 0)


class _RemaskMasked(CommitPolicy):
    """Breaks contract v2: remasks positions that are still masked."""

    name: ClassVar[str] = "bad_remask"
    revokes: ClassVar[bool] = True

    def select(self, confidence, masked, state):
        from dlm_decode.signals import Decision

        return Decision(masked, remask=~masked)


@pytest.mark.parametrize(
    ("cls", "error", "message"),
    [
        (_UndeclaredEntropy, AttributeError, "does not declare it"),
        (_RemaskMasked, AssertionError, "not committed earlier in this block"),
    ],
)
def test_check_policy_catches_broken_v2_policies(cls, error, message) -> None:
    with pytest.raises(error, match=message):
        check_policy(cls, max_examples=50, decode=False)
