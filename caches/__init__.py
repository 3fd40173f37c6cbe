"""Built-in KV-cache strategies: ``none``, ``prefix`` and ``dual`` (Fast-dLLM).

Each is one model forward per call (one NFE). For a model whose logits are shifted (Dream:
position ``i`` is predicted by output ``i − 1``) the span a step recomputes starts one
position before the block, so that the block's first position has its predicting row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch

from dlm_decode.hookspecs import hookimpl
from dlm_decode.interfaces import Cache, CacheContext

__all__ = ["DualCache", "NoCache", "PrefixCache", "register_caches"]


def _block_logits(
    ctx: CacheContext,
    x: torch.Tensor,
    span_start: int,
    span_end: int,
    block_start: int,
    block_end: int,
    *,
    use_kv: bool,
) -> torch.Tensor:
    """Forward over ``x[:, span_start:span_end]``; logits for ``[block_start, block_end)``."""
    shift = ctx.model.logits_shift
    lo = block_start - shift - span_start  # output row predicting block_start
    if lo < 0:
        raise ValueError(
            f"span starting at {span_start} cannot predict position {block_start} of a "
            f"shifted model; the prompt must be at least one token long"
        )
    return ctx.model.forward(
        x[:, span_start:span_end],  # (B, S)
        start=span_start,
        kv=ctx.kv if use_kv else None,
        attention_mask=ctx.attention_mask,
        position_ids=ctx.position_ids[:, span_start:span_end],
        logits_rows=(lo, lo + block_end - block_start),
    )  # (B, L, V)


class NoCache(Cache):
    """No reuse: every step runs the full sequence (the original LLaDA loop)."""

    name: ClassVar[str] = "none"

    def refresh(self, ctx, x, block_start, block_end):
        return _block_logits(ctx, x, 0, x.shape[1], block_start, block_end, use_kv=False)

    step = refresh


class _KVCache(Cache):
    def setup(self, ctx: CacheContext, batch_size: int, total_length: int) -> None:
        ctx.kv = ctx.model.new_kv(batch_size, total_length)

    def refresh(self, ctx, x, block_start, block_end):
        # One full forward; every position's K/V lands in the buffer.
        return _block_logits(ctx, x, 0, x.shape[1], block_start, block_end, use_kv=True)


class PrefixCache(_KVCache):
    """Fast-dLLM PrefixCache: K/V before the block are reused; steps run ``[block_start:]``.

    At block start one full forward stores K/V for every position. Later steps recompute
    the block and everything after it (the suffix changes meaning as the block fills) and
    attend to the stored prefix.
    """

    name: ClassVar[str] = "prefix"

    def step(self, ctx, x, block_start, block_end):
        s = block_start - ctx.model.logits_shift
        return _block_logits(ctx, x, s, x.shape[1], block_start, block_end, use_kv=True)


class DualCache(_KVCache):
    """Fast-dLLM DualCache: steps run only the block; prefix and suffix K/V are reused.

    At block start one full forward stores K/V for every position; later steps recompute and
    overwrite only the block's K/V (and, for a shifted model, the one position before it).
    """

    name: ClassVar[str] = "dual"

    def step(self, ctx, x, block_start, block_end):
        s = block_start - ctx.model.logits_shift
        return _block_logits(ctx, x, s, block_end, block_start, block_end, use_kv=True)


@hookimpl
def register_caches(register: Callable[[type], None]) -> None:
    """Register ``none``, ``prefix`` and ``dual``."""
    for cls in (NoCache, PrefixCache, DualCache):
        register(cls)
