"""Built-in commit policies, registered through the ``dlm_decode`` entry point like any plugin.

* [`dlm_decode.policies.rules`][dlm_decode.policies.rules]: the count rules ``fixed``,
  ``threshold``, ``factor``, ``frechet`` and ``frechet_robust`` (contract v1, plus
  ``fixed.v2``'s scoring option);
* [`dlm_decode.policies.families`][dlm_decode.policies.families]: the field's rules on
  contract v2 — ``margin``, ``eb``, ``klass``, ``credit``, ``wino``, ``joint_threshold``.
"""

from __future__ import annotations

from collections.abc import Callable

from dlm_decode.hookspecs import hookimpl
from dlm_decode.policies.families import (
    FAMILY_POLICIES,
    CreditPolicy,
    EBPolicy,
    JointThresholdPolicy,
    KLASSPolicy,
    MarginPolicy,
    WinoPolicy,
)
from dlm_decode.policies.rules import (
    BUILTIN_POLICIES,
    FactorPolicy,
    FixedPolicy,
    FixedScoredPolicy,
    FrechetPolicy,
    FrechetRobustPolicy,
    ThresholdPolicy,
)

__all__ = [
    "CreditPolicy",
    "EBPolicy",
    "FactorPolicy",
    "FixedPolicy",
    "FixedScoredPolicy",
    "FrechetPolicy",
    "FrechetRobustPolicy",
    "JointThresholdPolicy",
    "KLASSPolicy",
    "MarginPolicy",
    "ThresholdPolicy",
    "WinoPolicy",
    "register_commit_policies",
]


@hookimpl
def register_commit_policies(register: Callable[[type], None]) -> None:
    """Register the built-in rules."""
    for cls in (*BUILTIN_POLICIES, *FAMILY_POLICIES):
        register(cls)
