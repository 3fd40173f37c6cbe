"""Helpers shared by the built-in caches: a forward over a span or a set of positions that
returns the active block's logits, and a KV buffer with a scratch slot for padding."""

from __future__ import annotations

import torch

from dlm_decode.interfaces import CacheContext

__all__ = ["block_logits", "masked_positions_forward", "scratch_key_mask"]


def block_logits(
    ctx: CacheContext,
    x: torch.Tensor,
    span_start: int,
    span_end: int,
    block_start: int,
    block_end: int,
    *,
    use_kv: bool,
    key_mask: torch.Tensor | None = None,
    hidden_layers: tuple[int, ...] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Forward over ``x[:, span_start:span_end]``; logits for ``[block_start, block_end)``.

    For a shifted model (output ``i`` predicts ``i + 1``) the span must start at least one
    position before the block.

    Args:
        ctx: the cache context.
        x: ``(B, T)`` the sequence.
        span_start: first position the forward computes.
        span_end: one past the last.
        block_start: the active block's first position.
        block_end: one past its last.
        use_kv: write the span's K/V into ``ctx.kv`` and attend over the whole buffer.
        key_mask: the key mask over the buffer (default ``ctx.attention_mask``).
        hidden_layers: block outputs to return as well (features on request).

    Returns:
        ``(B, L, V)`` logits (and the hidden features when asked for).
    """
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
        attention_mask=ctx.attention_mask if key_mask is None else key_mask,
        position_ids=ctx.position_ids[:, span_start:span_end],
        logits_rows=(lo, lo + block_end - block_start),
        hidden_layers=hidden_layers,
    )


def scratch_key_mask(ctx: CacheContext, total_length: int) -> torch.Tensor:
    """``(B, T + 1)`` bool key mask over a buffer with one scratch slot at ``T`` (hidden):
    padding rows of a positions forward write there and nothing reads it."""
    bsz = ctx.position_ids.shape[0]
    dev = ctx.position_ids.device
    base = ctx.attention_mask
    if base is None:
        base = torch.ones((bsz, total_length), dtype=torch.bool, device=dev)
    return torch.cat([base, torch.zeros((bsz, 1), dtype=torch.bool, device=dev)], dim=1)


def masked_positions_forward(
    ctx: CacheContext,
    x: torch.Tensor,
    compute: torch.Tensor,
    key_mask: torch.Tensor,
    *,
    first: torch.Tensor | None = None,
    hidden_layers: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor] | None]:
    """A forward over the positions ``compute`` marks, row by row, padded to the longest row
    with the scratch slot ``T`` (the buffer has ``T + 1`` slots).

    Args:
        ctx: the cache context (``kv`` of ``T + 1`` slots).
        x: ``(B, T)`` the sequence.
        compute: ``(B, T)`` bool, the positions to compute in each row.
        key_mask: ``(B, T + 1)`` key mask (see
            [`scratch_key_mask`][dlm_decode.caches.common.scratch_key_mask]).
        first: ``(B, T)`` bool, positions to put first in each row (in position order), so
            that their output rows are ``[0, first.sum(-1))``; default none.
        hidden_layers: block outputs to return as well.

    Returns:
        ``positions`` ``(B, S)`` (``T`` at padding), the logits ``(B, S, V)`` of every
        computed row, and the hidden features (or ``None``).
    """
    bsz, t = x.shape
    dev = x.device
    ar = torch.arange(t, device=dev).expand(bsz, t)  # (B, T)
    rank = torch.where(compute, ar, ar + 2 * t)  # computed positions first, in order
    if first is not None:
        rank = torch.where(first & compute, ar - 2 * t, rank)
    order = rank.argsort(-1)  # (B, T)
    s = int(compute.sum(-1).max())  # the longest row: one host read, eager caches only
    order = order[:, :s]  # (B, S)
    keep = compute.gather(-1, order)  # (B, S) false at padding
    positions = torch.where(keep, order, torch.full_like(order, t))  # (B, S)
    ids = torch.where(keep, x.gather(-1, order), torch.zeros_like(order))
    rope = ctx.position_ids.gather(-1, order)  # (B, S)
    out = ctx.model.forward(
        ids,
        positions=positions,
        kv=ctx.kv,
        attention_mask=key_mask,
        position_ids=rope,
        hidden_layers=hidden_layers,
    )
    if hidden_layers is None:
        return positions, out, None
    return positions, out[0], out[1]
