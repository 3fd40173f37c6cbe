"""``burst``: a dual cache that refreshes the whole sequence after a burst of commits.

When the previous step committed at least ``min_commits`` positions in some row, the block
changed a lot, and the prefix and suffix K/V stored at the block's start have drifted the
most. This cache then asks for a refresh at the next step. It uses contract v2: the step
state (``ctx.step.last_commit``) and a refresh request made on the device (no host sync).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from dlm_decode import hookimpl
from dlm_decode.caches import DualCache

__all__ = ["BurstParams", "BurstRefreshCache", "register_caches"]


class BurstParams(BaseModel):
    """Params of ``burst``; unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_commits: int = Field(4, ge=1, description="Commits in one step that trigger a refresh.")


class BurstRefreshCache(DualCache):
    """The dual cache, plus a refresh at the step after one that committed ``min_commits``
    or more positions in some row."""

    name: ClassVar[str] = "burst"
    version: ClassVar[int] = 1
    Params: ClassVar[type[BaseModel]] = BurstParams

    def step(self, ctx, x, block_start, block_end):
        last = ctx.step.last_commit  # (B, L) bool: what the policy committed last step
        if last is not None:
            ctx.request_refresh((last.sum(-1) >= self.params.min_commits).any())
        return super().step(ctx, x, block_start, block_end)


@hookimpl
def register_caches(register: Callable[[type], None]) -> None:
    """Register ``burst`` with dlm_decode."""
    register(BurstRefreshCache)
