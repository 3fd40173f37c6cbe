"""The field's refresh strategies on cache contract v2: dInfer's vicinity refresh,
dKV-Cache's delayed caching, and a refresh triggered by hidden-state drift (dLLM-Cache
style).

Formulas, sources and what each one recomputes: ``docs/concepts/caches.md``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from dlm_decode.caches.common import block_logits, masked_positions_forward, scratch_key_mask
from dlm_decode.interfaces import Cache, CacheContext

__all__ = ["DKVCache", "DKVParams", "DriftCache", "DriftParams", "VicinityCache", "VicinityParams"]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------
# vicinity
# --------------------------------------------------------------------------------------


class VicinityParams(_Params):
    """Params of ``vicinity`` (dInfer's names; its serving defaults)."""

    prefix_look: int = Field(16, ge=0, description="positions before the block recomputed")
    after_look: int = Field(16, ge=0, description="positions after the block recomputed")
    warmup_steps: int = Field(4, ge=0, description="first forwards of a decode without cache")


class VicinityCache(Cache):
    """dInfer's vicinity refresh: every step recomputes a window around the block.

    The first ``warmup_steps`` steps of the first block, and the one after them, are full
    forwards (refreshes); after that a full refresh happens at the start of every block.
    Every other step recomputes ``[block_start − prefix_look, block_end + after_look)``
    (clipped to the sequence) and attends to the stored K/V elsewhere. Source:
    inclusionAI/dInfer, ``VicinityCacheIteration`` in ``python/dinfer/decoding/
    generate_uniform.py`` (serving defaults 16 / 16 / 4; its class defaults are 0 / 0 / 0,
    which is ``dual``). dInfer counts the warm-up over the decode's forwards, so when the
    first block finishes early it continues into the next; counting it over the first
    block's steps keeps a batched row decoding as it would alone.
    """

    name: ClassVar[str] = "vicinity"
    Params: ClassVar[type[BaseModel]] = VicinityParams
    capturable: ClassVar[bool] = True

    def setup(self, ctx: CacheContext, batch_size: int, total_length: int) -> None:
        ctx.kv = ctx.model.new_kv(batch_size, total_length)

    def wants_refresh(self, ctx: CacheContext) -> bool:
        """The warm-up steps of the first block and the first one after them."""
        return ctx.step.block_index == 0 and ctx.step.step <= self.params.warmup_steps

    def refresh(self, ctx, x, block_start, block_end):
        return block_logits(ctx, x, 0, x.shape[1], block_start, block_end, use_kv=True)

    def step(self, ctx, x, block_start, block_end):
        p = self.params
        lo = max(0, block_start - ctx.model.logits_shift - p.prefix_look)
        hi = min(x.shape[1], block_end + p.after_look)
        return block_logits(ctx, x, lo, hi, block_start, block_end, use_kv=True)


# --------------------------------------------------------------------------------------
# dkv
# --------------------------------------------------------------------------------------


class DKVParams(_Params):
    """Params of ``dkv`` (dKV-Cache's name)."""

    cache_reloading_step: int = Field(
        8, ge=1, description="refresh every k-th step of a block (and at its steps 0 and 1)"
    )


class DKVCache(Cache):
    """dKV-Cache's delayed caching (dKV-Cache-Decode): a token's K/V are cached one step
    after it is decoded.

    Steps 0 and 1 of a block and every ``cache_reloading_step``-th step are full forwards.
    Every other step computes only the positions whose K/V are not settled — every position
    still masked anywhere in the sequence, and the positions the policy wrote at the previous
    step (committed or edited; remasked ones are masked) — over a non-contiguous set of
    positions, and reuses the stored K/V of the rest. For a shifted model the positions
    right before the block's masked ones are computed too (their outputs predict them).
    Logits of block positions that a step does not compute are the last ones computed.
    Ma, Yu, Fang, Wang (2025), "dKV-Cache", arXiv 2505.15781; code horseee/dKV-Cache
    (``generation_utils/llada_dkv_cache_decode.py``; README example
    ``cache_reloading_step=8``).
    """

    name: ClassVar[str] = "dkv"
    Params: ClassVar[type[BaseModel]] = DKVParams

    def setup(self, ctx: CacheContext, batch_size: int, total_length: int) -> None:
        ctx.kv = ctx.model.new_kv(batch_size, total_length + 1)  # slot T: padding scratch
        ctx.extra["dkv_mask"] = scratch_key_mask(ctx, total_length)

    def wants_refresh(self, ctx: CacheContext) -> bool:
        """Steps 1 and every ``cache_reloading_step``-th (step 0 always refreshes)."""
        k = ctx.step.step
        return k == 1 or k % self.params.cache_reloading_step == 0

    def refresh(self, ctx, x, block_start, block_end):
        t = x.shape[1]
        logits = block_logits(
            ctx, x, 0, t, block_start, block_end, use_kv=True, key_mask=ctx.extra["dkv_mask"]
        )
        ctx.extra["dkv_logits"] = logits.clone()
        return logits

    def step(self, ctx, x, block_start, block_end):
        st, mask_id, shift = ctx.step, ctx.model.mask_token_id, ctx.model.logits_shift
        bsz, t = x.shape
        compute = x == mask_id  # (B, T) every masked position of the sequence
        changed = torch.zeros_like(compute[:, block_start:block_end])
        for last in (st.last_commit, st.last_edit):
            if last is not None:
                changed |= last
        compute[:, block_start:block_end] |= changed
        if shift:  # the outputs that predict the block's masked positions
            need = (x[:, block_start:block_end] == mask_id) | changed
            compute[:, block_start - shift : block_end - shift] |= need
        positions, out, _ = masked_positions_forward(ctx, x, compute, ctx.extra["dkv_mask"])
        target = positions + shift - block_start  # (B, S) block index each output predicts
        ok = (positions < t) & (target >= 0) & (target < block_end - block_start)
        logits = ctx.extra["dkv_logits"]  # (B, L, V)
        rows = torch.arange(bsz, device=x.device).unsqueeze(-1).expand_as(positions)
        logits[rows[ok], target[ok]] = out[ok].to(logits.dtype)
        return logits.clone()


# --------------------------------------------------------------------------------------
# drift
# --------------------------------------------------------------------------------------


class DriftParams(_Params):
    """Params of ``drift``."""

    threshold: float = Field(
        0.9, ge=-1.0, le=1.0, description="refresh a row when the block's mean cosine falls below"
    )
    layer: int = Field(-1, description="the block (transformer layer) whose output is compared")


class DriftCache(Cache):
    """A dual cache that refreshes a row when its block's hidden states drift (dLLM-Cache
    style, simplified).

    Every forward asks the model for the output of one transformer block (``layer``) at the
    active block's positions. A refresh stores them; each later step compares them with the
    stored ones (cosine similarity, averaged over the block's positions) and, for a row below
    ``threshold``, refreshes that row at the next step: that row recomputes every position
    while the others recompute only the block, in one forward over a set of positions per
    row. Only rows that drift pay for it, and a batched row decodes as it would alone.
    dLLM-Cache (Liu et al. 2025, arXiv 2506.06295) refreshes on fixed intervals and picks
    the response tokens to update by the similarity of their value vectors; this cache keeps
    the idea (update where features changed) on the block's block outputs.
    """

    name: ClassVar[str] = "drift"
    Params: ClassVar[type[BaseModel]] = DriftParams
    refresh_on_request: ClassVar[bool] = False

    def setup(self, ctx: CacheContext, batch_size: int, total_length: int) -> None:
        ctx.kv = ctx.model.new_kv(batch_size, total_length + 1)  # slot T: padding scratch
        ctx.extra["drift_mask"] = scratch_key_mask(ctx, total_length)

    def _span(self, ctx: CacheContext, block_start: int, block_end: int) -> tuple[int, int]:
        shift = ctx.model.logits_shift
        return block_start - shift, block_end - shift  # the rows whose outputs predict it

    def refresh(self, ctx, x, block_start, block_end):
        logits, hidden = block_logits(
            ctx,
            x,
            0,
            x.shape[1],
            block_start,
            block_end,
            use_kv=True,
            key_mask=ctx.extra["drift_mask"],
            hidden_layers=(self.params.layer,),
        )
        lo, hi = self._span(ctx, block_start, block_end)
        ctx.extra["drift_ref"] = hidden[self.params.layer][:, lo:hi].float()  # (B, L, d)
        return logits

    def step(self, ctx, x, block_start, block_end):
        layer, mask = self.params.layer, ctx.extra["drift_mask"]
        lo, hi = self._span(ctx, block_start, block_end)
        if ctx.step.refresh_requested:
            rows = ctx.extra["drift_rows"]  # (B,) rows that drifted at the previous step
            span = torch.zeros_like(x, dtype=torch.bool)
            span[:, lo:hi] = True
            compute = span | rows.unsqueeze(-1)  # (B, T)
            _, out, hidden = masked_positions_forward(
                ctx, x, compute, mask, first=span, hidden_layers=(layer,)
            )
            logits, feat = out[:, : hi - lo], hidden[layer][:, : hi - lo].float()
            ref = ctx.extra["drift_ref"]
            ref.copy_(torch.where(rows[:, None, None], feat, ref))
        else:
            logits, hidden = block_logits(
                ctx,
                x,
                lo,
                hi,
                block_start,
                block_end,
                use_kv=True,
                key_mask=mask,
                hidden_layers=(layer,),
            )
            feat = hidden[layer].float()  # (B, L, d)
        sim = torch.nn.functional.cosine_similarity(feat, ctx.extra["drift_ref"], dim=-1)
        drifted = sim.mean(-1) < self.params.threshold  # (B,)
        ctx.extra["drift_rows"] = drifted
        ctx.request_refresh(drifted.any())
        return logits
