"""``topk``: commit the ``k`` most confident masked positions of every row.

A complete third-party commit policy for dlm_decode: a params model, a policy class and
the hook that registers it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from dlm_decode import CountPolicy, StepState, hookimpl

__all__ = ["TopKParams", "TopKPolicy", "register_commit_policies"]


class TopKParams(BaseModel):
    """Params of ``topk``; unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    k: int = Field(2, ge=1, description="Tokens to commit per step (k ≥ 1).")


class TopKPolicy(CountPolicy):
    """Commit the ``k`` most confident masked positions (all of them when fewer remain)."""

    name: ClassVar[str] = "topk"
    version: ClassVar[int] = 1
    Params: ClassVar[type[BaseModel]] = TopKParams

    def commit_count(
        self, sorted_conf: torch.Tensor, valid: torch.Tensor, state: StepState
    ) -> torch.Tensor:
        # (B,) the same k for every row; CountPolicy clamps it to [1, masked count].
        return torch.full(valid.shape[:1], self.params.k, dtype=torch.long, device=valid.device)


@hookimpl
def register_commit_policies(register: Callable[[type], None]) -> None:
    """Register ``topk`` with dlm_decode."""
    register(TopKPolicy)
