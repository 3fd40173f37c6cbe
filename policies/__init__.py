"""Built-in commit policies, registered through the ``dlm_decode`` entry point like any plugin."""

from __future__ import annotations

from collections.abc import Callable

from dlm_decode.hookspecs import hookimpl
from policies.rules import (
    BUILTIN_POLICIES,
    FactorPolicy,
    FixedPolicy,
    FrechetPolicy,
    FrechetRobustPolicy,
    ThresholdPolicy,
)

__all__ = [
    "FactorPolicy",
    "FixedPolicy",
    "FrechetPolicy",
    "FrechetRobustPolicy",
    "ThresholdPolicy",
    "register_commit_policies",
]


@hookimpl
def register_commit_policies(register: Callable[[type], None]) -> None:
    """Register the five built-in rules."""
    for cls in BUILTIN_POLICIES:
        register(cls)
