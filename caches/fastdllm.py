"""Fast-dLLM's caches: ``none``, ``prefix`` and ``dual``, with an optional periodic refresh
inside a block (``refresh_every``, as Fast-dLLM++'s LLaDA-V hook refreshes its prefix every
32 steps).

Each call is one model forward (one NFE). For a model whose logits are shifted (Dream:
position ``i`` is predicted by output ``i − 1``) the span a step recomputes starts one
position before the block, so that the block's first position has its predicting row.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from dlm_decode.caches.common import block_logits
from dlm_decode.interfaces import Cache, CacheContext

__all__ = ["DualCache", "NoCache", "PrefixCache", "RefreshParams"]


class NoCache(Cache):
    """No reuse: every step runs the full sequence (the original LLaDA loop)."""

    name: ClassVar[str] = "none"
    capturable: ClassVar[bool] = True
    exact: ClassVar[bool] = True

    def refresh(self, ctx, x, block_start, block_end):
        return block_logits(ctx, x, 0, x.shape[1], block_start, block_end, use_kv=False)

    step = refresh


class RefreshParams(BaseModel):
    """Params of ``prefix`` and ``dual``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    refresh_every: int | None = Field(
        None,
        ge=1,
        description="also refresh at every k-th step of a block (None: only at its start)",
    )


class _KVCache(Cache):
    Params: ClassVar[type[BaseModel]] = RefreshParams
    capturable: ClassVar[bool] = True

    @property
    def refresh_every(self) -> int | None:
        """The params' ``refresh_every`` (``None`` for a subclass whose params lack it)."""
        return getattr(self.params, "refresh_every", None)

    @property
    def exact(self) -> bool:  # type: ignore[override]
        """A refresh at every step recomputes everything: the logits of ``none``."""
        return self.refresh_every == 1

    def setup(self, ctx: CacheContext, batch_size: int, total_length: int) -> None:
        ctx.kv = ctx.model.new_kv(batch_size, total_length)

    def wants_refresh(self, ctx: CacheContext) -> bool:
        """Every ``refresh_every``-th step of the block."""
        k = self.refresh_every
        return k is not None and ctx.step.step % k == 0

    def refresh(self, ctx, x, block_start, block_end):
        # One full forward; every position's K/V lands in the buffer.
        return block_logits(ctx, x, 0, x.shape[1], block_start, block_end, use_kv=True)


class PrefixCache(_KVCache):
    """Fast-dLLM PrefixCache: K/V before the block are reused; steps run ``[block_start:]``.

    At a refresh (the block's first step, and every ``refresh_every``-th step when set) one
    full forward stores K/V for every position. Other steps recompute the block and
    everything after it (the suffix changes meaning as the block fills) and attend to the
    stored prefix.
    """

    name: ClassVar[str] = "prefix"

    def step(self, ctx, x, block_start, block_end):
        s = block_start - ctx.model.logits_shift
        return block_logits(ctx, x, s, x.shape[1], block_start, block_end, use_kv=True)


class DualCache(_KVCache):
    """Fast-dLLM DualCache: steps run only the block; prefix and suffix K/V are reused.

    At a refresh (the block's first step, and every ``refresh_every``-th step when set) one
    full forward stores K/V for every position; other steps recompute and overwrite only
    the block's K/V (and, for a shifted model, the one position before it).
    ``refresh_every=1`` is ``none``, token for token.
    """

    name: ClassVar[str] = "dual"

    def step(self, ctx, x, block_start, block_end):
        s = block_start - ctx.model.logits_shift
        return block_logits(ctx, x, s, block_end, block_start, block_end, use_kv=True)
