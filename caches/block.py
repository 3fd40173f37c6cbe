"""``block``: the exact KV cache of block-causal models (SDAR, Fast-dLLM v2).

Under block-causal attention (see
[`AttentionPattern`][dlm_decode.interfaces.AttentionPattern]) a query never sees a later
attention block, so the keys and values of a finished block depend on nothing that is
still being decoded: once written, they are final. The cache keeps them in the KV buffer
and denoises each new block over them, with no approximation (unlike ``prefix`` and
``dual`` on a full-attention model).

What each call computes, as SDAR's ``block_diffusion_generate`` does:

* the block's first call (``refresh``) first writes the K/V of every position before the
  block that is not written yet, in one extra forward: the whole prompt blocks before the
  first decode block (the references' prefill), then, at each later block, the block that
  just finished (the references' ``store_kv`` forward); the Decoder counts that forward in
  ``nfe`` and its positions in the token-forwards;
* every call then runs the active block alone (one row before it for a shifted model),
  attending to the cached blocks and to itself; its K/V are rewritten at every step until
  the block is done. A sub-block (a ``block_length`` that divides the attention block, as
  Fast-dLLM v2 decodes) runs its whole attention block, as ``batch_sample`` does, and the
  K/V written are those before that attention block;
* a shifted model with a greedy block head (Fast-dLLM v2) asks, at each new attention
  block, for the one logit the finished block's last row predicts: the write forward
  returns it, so the write and the head cost one forward, as ``batch_sample``'s
  ``update_past_key_values`` forward does.

The references also run the store forward after the last block, whose K/V nothing reads;
this cache does not, so its NFE is the references' minus one.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from dlm_decode.caches.common import block_logits
from dlm_decode.interfaces import Cache, CacheContext

__all__ = ["BlockCache", "SubBlockCache"]

#: ``ctx.extra`` key of the number of leading positions whose K/V are final and stored.
WRITTEN = "block.written"
#: ``ctx.extra`` key: the model has full attention (every call is a plain full forward).
FULL = "block.full"


def cached_span(
    ctx: CacheContext, x: torch.Tensor, lo: int, hi: int, rows: tuple[int, int] | None = None
) -> torch.Tensor:
    """Forward ``x[:, lo:hi]`` writing its K/V into ``ctx.kv`` and attending over the
    buffer; returns the output rows ``rows`` of the span (default all: ``(B, hi − lo, V)``)."""
    return ctx.model.forward(
        x[:, lo:hi],  # (B, S)
        start=lo,
        kv=ctx.kv,
        attention_mask=ctx.attention_mask,
        position_ids=ctx.position_ids[:, lo:hi],
        logits_rows=rows,
    )


class BlockCache(Cache):
    """Exact K/V of every finished block; each step runs only the active block.

    Meant for a block-causal model (``model.attention.block_causal``). Under full
    attention no position's K/V is final before the decode ends, so on such a model every
    call is a plain full forward (exactly ``none``); use ``dual`` or ``prefix`` there for
    speed.
    """

    name: ClassVar[str] = "block"
    exact: ClassVar[bool] = True

    def setup(self, ctx: CacheContext, batch_size: int, total_length: int) -> None:
        """Allocate the KV buffer (nothing for a full-attention model)."""
        ctx.extra[WRITTEN] = 0
        attention = getattr(ctx.model, "attention", None)
        ctx.extra[FULL] = attention is None or attention.block_size is None
        if not ctx.extra[FULL]:
            ctx.kv = ctx.model.new_kv(batch_size, total_length)

    def refresh(self, ctx, x, block_start, block_end):
        if ctx.extra.get(FULL, False):
            return self.step(ctx, x, block_start, block_end)
        written = ctx.extra.get(WRITTEN, 0)
        grid = ctx.model.attention.block_grid_start(block_start)  # a sub-block's own block
        shift = ctx.model.logits_shift
        if written < grid:  # the prefill, or the block that just finished
            # a request for just the rows the written span predicts (a shifted model's
            # greedy block head): this forward's last rows are the logits, no step follows
            head = block_start == grid and block_end - block_start <= shift <= grid - written
            lo = grid - written - shift
            ctx.extra[WRITTEN] = grid
            # K/V only (no row goes through the head), or the head's rows
            rows = (lo, lo + block_end - block_start) if head else (0, 0)
            out = cached_span(ctx, x, written, grid, rows)
            if head:
                return out  # (B, L, V)
        return self.step(ctx, x, block_start, block_end)

    def step(self, ctx, x, block_start, block_end):
        if ctx.extra.get(FULL, False):
            return block_logits(ctx, x, 0, x.shape[1], block_start, block_end, use_kv=False)
        # the whole attention block(s) holding [block_start, block_end) (a sub-block sees
        # the rest of its block, later sub-blocks as masks), and one row before for a
        # shifted model
        pattern = ctx.model.attention
        size = pattern.block_size
        s = max(pattern.block_grid_start(block_start) - ctx.model.logits_shift, 0)
        e = min(max(block_end, -(-block_end // size) * size), x.shape[1])
        return block_logits(ctx, x, s, e, block_start, block_end, use_kv=True)


#: ``ctx.extra`` key: the attention block whose K/V the last full forward wrote (``subblock``).
SUB_CACHED = "subblock.grid"


class SubBlockCache(BlockCache):
    """``block`` plus Fast-dLLM v2's optional sub-block cache (``use_block_cache``).

    For a ``block_length`` that divides the attention block (sub-blocks), a step runs the
    whole attention block only when it must: at the attention block's first step, and
    whenever some row's active sub-block still has a mask at its first position. Every
    other step runs the sub-block's positions alone, over the cached K/V of the blocks
    before and of the rest of its attention block as the last full forward left them (its
    later sub-blocks as masks): an approximation inside the attention block, like the dual
    cache, exact across blocks. That decision reads one flag from the device (a host sync).
    For a shifted model the sub-block's first logit comes from its own output row, as in
    NVlabs' ``batch_sample``: it is only used when that position is already decided in
    every row. Whole blocks (``block_length`` a multiple of the attention block) decode as
    with ``block``.
    """

    name: ClassVar[str] = "subblock"
    exact: ClassVar[bool] = False

    def setup(self, ctx: CacheContext, batch_size: int, total_length: int) -> None:
        """``block``'s buffer, and no attention block cached yet."""
        super().setup(ctx, batch_size, total_length)
        ctx.extra[SUB_CACHED] = -1

    def step(self, ctx, x, block_start, block_end):
        if ctx.extra.get(FULL, False):
            return super().step(ctx, x, block_start, block_end)
        pattern = ctx.model.attention
        grid = pattern.block_grid_start(block_start)
        sub = block_end - block_start < pattern.block_size
        first_masked = bool((x[:, block_start] == ctx.model.mask_token_id).any())
        if not sub or ctx.extra[SUB_CACHED] != grid or first_masked:
            ctx.extra[SUB_CACHED] = grid
            return super().step(ctx, x, block_start, block_end)
        out = cached_span(ctx, x, block_start, block_end)  # (B, L, V): row i predicts i + shift
        if ctx.model.logits_shift:
            out = torch.cat([out[:, :1], out[:, :-1]], dim=1)  # the first row: a stand-in
        return out
