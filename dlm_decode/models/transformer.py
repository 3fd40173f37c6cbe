"""The shared native transformer behind LLaDA, Dream and the shipped tiny model: pure
``torch.nn`` code, no checkpoint handling.

One implementation of RMSNorm, rotary embeddings, attention and the SwiGLU MLP,
parametrised by an [`ArchSpec`][dlm_decode.models.transformer.ArchSpec]; the architectures
differ only in their spec (biases, head counts, RoPE theta and precision) and in how their
checkpoint names the weights, which
[`NativeModel`][dlm_decode.models.native.NativeModel] handles.

Attention is bidirectional (``is_causal=False``) and runs through
``torch.nn.functional.scaled_dot_product_attention`` with a boolean key mask ``(B, 1, 1, T)``.
Grouped-query attention folds the query heads of each key/value group into the query
length, so no key/value copy is made and every SDPA kernel applies (exact because the mask
depends on the key only; a query-dependent mask is tiled over the folded heads).

A spec with ``block_size`` is **block-causal** (SDAR, Fast-dLLM v2): buffer slot ``i`` lies
in attention block ``i // block_size`` and a query attends to the keys of its own block and
of every earlier one; the mask ``(B, 1, S, T)`` is built from the slots of the queries and
keys, with or without a KV buffer. ``qk_norm`` adds Qwen3's per-head RMSNorm of queries and
keys (before RoPE); ``head_dim`` may be set apart from ``d_model / n_heads`` (Qwen3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dlm_decode.interfaces import KVBuffer

__all__ = [
    "ArchSpec",
    "Attention",
    "Block",
    "RMSNorm",
    "SwiGLU",
    "Transformer",
    "apply_rope",
    "block_causal_mask",
    "rope_cos_sin",
]


@dataclass(frozen=True)
class ArchSpec:
    """Shapes and numerics of a native transformer.

    Attributes:
        d_model: hidden size.
        n_heads: query heads.
        n_kv_heads: key/value heads (``n_heads`` for multi-head attention; a divisor of it
            for grouped-query attention).
        n_layers: transformer blocks.
        d_ff: hidden size of the SwiGLU MLP.
        vocab_size: rows of the embedding and of the LM head (the logits width).
        max_length: longest sequence the model accepts.
        rope_theta: RoPE base.
        rms_norm_eps: epsilon of every RMSNorm.
        qkv_bias: whether the q/k/v projections have biases (the output projection never
            does).
        tie_embeddings: the LM head reuses the embedding matrix.
        rope_full_precision: apply the rotation in float32 (at least) and cast back, as
            LLaDA does; otherwise rotate in the model dtype, as Qwen2/Dream does.
        qk_norm: per-head RMSNorm of queries and keys before RoPE (Qwen3/SDAR), with
            weights ``attn.q_norm`` / ``attn.k_norm`` of size ``head_dim``.
        explicit_head_dim: the head dimension when it is not ``d_model // n_heads``
            (Qwen3 configs set ``head_dim``); ``None`` derives it.
        block_size: attention block of a block-causal model (see
            [`AttentionPattern`][dlm_decode.interfaces.AttentionPattern]); ``None`` for full
            bidirectional attention.
    """

    d_model: int
    n_heads: int
    n_kv_heads: int
    n_layers: int
    d_ff: int
    vocab_size: int
    max_length: int
    rope_theta: float
    rms_norm_eps: float
    qkv_bias: bool = False
    tie_embeddings: bool = False
    rope_full_precision: bool = False
    qk_norm: bool = False
    explicit_head_dim: int | None = None
    block_size: int | None = None

    def __post_init__(self) -> None:
        for field in ("d_model", "n_heads", "n_kv_heads", "n_layers", "d_ff", "vocab_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ArchSpec.{field} must be an integer ≥ 1, got {value!r}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int):
            raise ValueError(f"ArchSpec.max_length must be an integer, got {self.max_length!r}")
        if self.max_length < 1:
            raise ValueError(f"ArchSpec.max_length must be ≥ 1, got {self.max_length}")
        for field in ("explicit_head_dim", "block_size"):
            value = getattr(self, field)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"ArchSpec.{field} must be None or an integer ≥ 1, got {value!r}")
        if self.explicit_head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        """Dimension of one attention head (``explicit_head_dim``, else
        ``d_model // n_heads``)."""
        if self.explicit_head_dim is not None:
            return self.explicit_head_dim
        return self.d_model // self.n_heads

    @property
    def rope_dim(self) -> int:
        """Dimensions of a head that RoPE rotates: all of them here (a partial-rotary
        family's spec overrides it)."""
        return self.head_dim


def block_causal_mask(
    query_slots: torch.Tensor,
    total: int,
    block_size: int,
    key_mask: torch.Tensor | None,
    batch_size: int,
) -> torch.Tensor:
    """The block-causal attention mask of a span: query slot ``q`` attends to key slot ``k``
    when ``k // block_size ≤ q // block_size`` (its own block and every earlier one) and
    the key is not padding.

    A query always attends to its own slot, so that no row is fully masked (a padding
    query in an all-padding block would otherwise give NaN, which the next layer's
    ``0 × NaN`` would spread); its own key is a real token's for every real query.

    Args:
        query_slots: ``(S,)`` or ``(B, S)`` long buffer slots of the queries.
        total: ``T``, the key slots ``[0, T)``.
        block_size: positions per attention block.
        key_mask: ``(B, 1, 1, T)`` bool key mask (false = padding), or ``None``.
        batch_size: ``B``.

    Returns:
        ``(B, 1, S, T)`` bool, true = attend.
    """
    keys = torch.arange(total, device=query_slots.device)  # (T,)
    q = query_slots if query_slots.dim() == 2 else query_slots.expand(batch_size, -1)  # (B, S)
    q = q[:, None, :, None]  # (B, 1, S, 1)
    allowed = (keys // block_size) <= (q // block_size)  # (B, 1, S, T)
    if key_mask is not None:
        allowed = allowed & key_mask
    return allowed | (keys == q)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32 (at least), scaled in the input dtype.

    Args:
        dim: normalised dimension.
        eps: added to the mean square.
        dtype: dtype of the weight.
    """

    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary cosines and sines for each position.

    Computed in float32 (float64 when ``dtype`` is float64) and cast to ``dtype``.

    Args:
        position_ids: ``(B, S)`` long positions.
        head_dim: attention head dimension (even).
        theta: RoPE base.
        dtype: dtype of the result.

    Returns:
        ``cos`` and ``sin``, each ``(B, 1, S, head_dim)``.
    """
    work = torch.promote_types(dtype, torch.float32)
    dev = position_ids.device
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=dev, dtype=work) / head_dim)
    )  # (hd/2,)
    freqs = position_ids.to(work).unsqueeze(-1) * inv_freq  # (B, S, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)  # (B, 1, S, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` by the half-split convention: ``x·cos + rotate_half(x)·sin``.

    Args:
        x: ``(B, H, S, hd)``.
        cos: ``(B, 1, S, hd)``, same dtype as ``x``.
        sin: ``(B, 1, S, hd)``, same dtype as ``x``.

    Returns:
        ``(B, H, S, hd)`` rotated.
    """
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, S, hd/2) ×2
    rotated = torch.cat([-x2, x1], dim=-1)  # (B, H, S, hd)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Bidirectional multi-head / grouped-query attention with RoPE and a KV buffer.

    Args:
        spec: the architecture.
        dtype: dtype of the weights.
    """

    def __init__(self, spec: ArchSpec, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.spec = spec
        hd = spec.head_dim
        self.q = nn.Linear(spec.d_model, spec.n_heads * hd, bias=spec.qkv_bias, dtype=dtype)
        self.k = nn.Linear(spec.d_model, spec.n_kv_heads * hd, bias=spec.qkv_bias, dtype=dtype)
        self.v = nn.Linear(spec.d_model, spec.n_kv_heads * hd, bias=spec.qkv_bias, dtype=dtype)
        self.o = nn.Linear(spec.n_heads * hd, spec.d_model, bias=False, dtype=dtype)
        self.q_norm = RMSNorm(hd, spec.rms_norm_eps, dtype) if spec.qk_norm else None
        self.k_norm = RMSNorm(hd, spec.rms_norm_eps, dtype) if spec.qk_norm else None

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # cos/sin are float32+ when the spec rotates in full precision, else x's dtype.
        return apply_rope(x.to(cos.dtype), cos, sin).to(x.dtype)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        kv: KVBuffer | None,
        layer: int,
        start: int,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from the span ``x`` to the span itself or to all cached positions.

        Args:
            x: ``(B, S, d_model)`` normed hidden states of the span.
            cos: ``(B, 1, S, hd)`` rotary cosines (see
                [`rope_cos_sin`][dlm_decode.models.transformer.rope_cos_sin]).
            sin: ``(B, 1, S, hd)`` rotary sines.
            mask: ``(B, 1, 1, T)`` bool key mask or ``(B, 1, S, T)`` query-key mask (true =
                attend), or ``None``.
            kv: buffer to write the span's K/V into and read all ``T`` positions from.
            layer: index of this layer in ``kv``.
            start: absolute position of the span's first row.
            positions: ``(B, S)`` long buffer slots of the rows when they are not the
                contiguous span at ``start`` (then K/V are scattered there).

        Returns:
            ``(B, S, d_model)``.
        """
        spec = self.spec
        b, s, _ = x.shape
        h, hkv, hd = spec.n_heads, spec.n_kv_heads, spec.head_dim
        q = self.q(x).view(b, s, h, hd).transpose(1, 2)  # (B, H, S, hd)
        k = self.k(x).view(b, s, hkv, hd).transpose(1, 2)  # (B, H_kv, S, hd)
        v = self.v(x).view(b, s, hkv, hd).transpose(1, 2)  # (B, H_kv, S, hd)
        if self.q_norm is not None and self.k_norm is not None:  # Qwen3: per head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        if kv is not None and positions is not None:
            idx = positions[:, None, :, None].expand(b, hkv, s, hd)  # (B, H_kv, S, hd)
            kv.k[layer].scatter_(2, idx, k)
            kv.v[layer].scatter_(2, idx, v)
            k, v = kv.k[layer], kv.v[layer]  # (B, H_kv, T, hd)
        elif kv is not None:
            kv.k[layer, :, :, start : start + s] = k
            kv.v[layer, :, :, start : start + s] = v
            k, v = kv.k[layer], kv.v[layer]  # (B, H_kv, T, hd)
        rep = h // hkv
        if rep > 1:  # query heads of one K/V group share it: fold them into the length
            q = q.reshape(b, hkv, rep * s, hd)  # (B, H_kv, rep·S, hd)
            if mask is not None and mask.shape[2] > 1:  # query-dependent: tile per folded head
                mask = mask.repeat(1, 1, rep, 1)  # (B, 1, rep·S, T)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
        out = out.reshape(b, h, s, hd).transpose(1, 2).reshape(b, s, h * hd)  # (B, S, H·hd)
        return self.o(out)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) · up(x))`` without biases.

    Args:
        spec: the architecture.
        dtype: dtype of the weights.
    """

    def __init__(self, spec: ArchSpec, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.gate = nn.Linear(spec.d_model, spec.d_ff, bias=False, dtype=dtype)
        self.up = nn.Linear(spec.d_model, spec.d_ff, bias=False, dtype=dtype)
        self.down = nn.Linear(spec.d_ff, spec.d_model, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

    Args:
        spec: the architecture.
        dtype: dtype of the weights.
    """

    def __init__(self, spec: ArchSpec, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(spec.d_model, spec.rms_norm_eps, dtype)
        self.attn = Attention(spec, dtype)
        self.mlp_norm = RMSNorm(spec.d_model, spec.rms_norm_eps, dtype)
        self.mlp = SwiGLU(spec, dtype)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        kv: KVBuffer | None,
        layer: int,
        start: int,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, kv, layer, start, positions)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Embedding, ``n_layers`` blocks, final RMSNorm and an LM head.

    Parameter names (the internal layout [`NativeModel`][dlm_decode.models.native.NativeModel] maps
    checkpoint names onto):
    ``embed.weight``, ``blocks.{i}.attn_norm.weight``, ``blocks.{i}.attn.{q,k,v,o}.weight``
    (``.bias`` for q/k/v when ``qkv_bias``), ``blocks.{i}.attn.{q,k}_norm.weight`` (when
    ``qk_norm``), ``blocks.{i}.mlp_norm.weight``,
    ``blocks.{i}.mlp.{gate,up,down}.weight``, ``norm.weight``, ``head.weight`` (absent when
    the embeddings are tied).

    Args:
        spec: the architecture.
        dtype: dtype of the weights.
    """

    def __init__(self, spec: ArchSpec, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab_size, spec.d_model, dtype=dtype)
        self.blocks = nn.ModuleList(self.make_block(spec, i, dtype) for i in range(spec.n_layers))
        self.norm = RMSNorm(spec.d_model, spec.rms_norm_eps, dtype)
        self.head = (
            None
            if spec.tie_embeddings
            else nn.Linear(spec.d_model, spec.vocab_size, bias=False, dtype=dtype)
        )

    def make_block(self, spec: ArchSpec, index: int, dtype: torch.dtype | None) -> nn.Module:
        """Block ``index`` of the stack: a [`Block`][dlm_decode.models.transformer.Block];
        a family with other blocks (mixture of experts) overrides it. A block is called as
        ``block(x, cos, sin, mask, kv, layer, start, positions)``."""
        return Block(spec, dtype)

    def forward(
        self,
        ids: torch.Tensor,
        *,
        start: int = 0,
        positions: torch.Tensor | None = None,
        kv: KVBuffer | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_rows: tuple[int, int] | None = None,
        hidden_layers: Sequence[int] | None = None,
        prompt_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The [`Model.forward`][dlm_decode.interfaces.Model.forward] contract.

        Args:
            ids: ``(B, S)`` token ids at positions ``[start, start + S)``, or at
                ``positions``.
            start: absolute position of ``ids[:, 0]`` (contiguous span).
            positions: ``(B, S)`` long buffer slots of the rows (any set, per row) instead
                of the contiguous span; needs ``kv``.
            kv: buffer to write the span's K/V into and attend over (all ``T`` positions);
                ``None`` to attend over the span only.
            attention_mask: ``(B, T)`` bool key mask, false at padding; or ``None``.
            position_ids: ``(B, S)`` RoPE positions; default ``start + arange(S)`` (or
                ``positions``).
            logits_rows: ``(lo, hi)`` rows of the span to run through the norm and head.
            hidden_layers: block indices (negative from the end) whose outputs to return.
            prompt_embeds: ``(B, P, d)`` input embeddings of a multimodal prompt: every row
                whose buffer slot is below ``P`` takes its embedding from here instead of
                the token embedding (see
                [`Model.embed_prompt`][dlm_decode.interfaces.Model.embed_prompt]).

        Returns:
            ``(B, hi - lo, V)`` logits; with ``hidden_layers``, ``(logits, hidden)`` where
            ``hidden[i]`` is block ``i``'s output ``(B, S, d)`` for every row of the span.

        Raises:
            ValueError: inconsistent span, buffer or mask shapes.
        """
        spec = self.spec
        b, s = ids.shape
        if positions is not None:
            if kv is None:
                raise ValueError("positions need a KV buffer to scatter into")
            if tuple(positions.shape) != (b, s):
                raise ValueError(
                    f"positions must be (B, S) = ({b}, {s}), got {tuple(positions.shape)}"
                )
            t = kv.max_length
            if position_ids is None:
                position_ids = positions
        elif kv is None:
            if start != 0:
                raise ValueError(f"start={start} needs a KV buffer; without one start must be 0")
            t = s
        else:
            t = kv.max_length
            if start < 0 or start + s > t:
                raise ValueError(f"span [{start}, {start + s}) outside the KV buffer of {t}")
        if position_ids is None:
            position_ids = (start + torch.arange(s, device=ids.device)).expand(b, s)
        mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (b, t):
                raise ValueError(
                    f"attention_mask must be (B, T) = ({b}, {t}), got {tuple(attention_mask.shape)}"
                )
            mask = attention_mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, T)
        if spec.block_size is not None:
            dev = ids.device
            q_slots = positions if positions is not None else start + torch.arange(s, device=dev)
            mask = block_causal_mask(q_slots, t, spec.block_size, mask, b)  # (B, 1, S, T)
        lo, hi = logits_rows if logits_rows is not None else (0, s)
        if not 0 <= lo <= hi <= s:
            raise ValueError(f"logits_rows ({lo}, {hi}) outside the span of {s} rows")
        wanted = {i % spec.n_layers for i in (hidden_layers or ())}
        hidden: dict[int, torch.Tensor] = {}
        x = self.embed(ids)  # (B, S, d)
        if prompt_embeds is not None:
            x = _with_prompt_embeds(x, prompt_embeds, start, positions)
        rope_dtype = x.dtype
        if spec.rope_full_precision:
            rope_dtype = torch.promote_types(x.dtype, torch.float32)
        cos, sin = rope_cos_sin(position_ids, spec.rope_dim, spec.rope_theta, rope_dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, kv, i, start, positions)  # (B, S, d)
            if i in wanted:
                hidden[i] = x
        if hidden_layers is not None:
            hidden = {i: hidden[i % spec.n_layers] for i in hidden_layers}
        x = self.norm(x[:, lo:hi])  # (B, hi-lo, d)
        head = self.embed.weight if self.head is None else self.head.weight
        logits = F.linear(x, head)  # (B, hi-lo, V)
        return logits if hidden_layers is None else (logits, hidden)


def _with_prompt_embeds(
    x: torch.Tensor, prompt_embeds: torch.Tensor, start: int, positions: torch.Tensor | None
) -> torch.Tensor:
    """The span's input with the rows at slots below ``P`` taken from ``prompt_embeds``
    (tensor-only: no host sync, so a captured graph replays it).

    Args:
        x: ``(B, S, d)`` token embeddings of the span.
        prompt_embeds: ``(B, P, d)`` the prompt's input embeddings.
        start: slot of the span's first row (contiguous span).
        positions: ``(B, S)`` slots of the rows, or ``None`` for the contiguous span.

    Returns:
        ``(B, S, d)``.
    """
    b, s, d = x.shape
    p = prompt_embeds.shape[1]
    if positions is None and start >= p:  # a span after the prompt: nothing to replace
        return x
    slots = positions if positions is not None else start + torch.arange(s, device=x.device)
    slots = slots.expand(b, s)  # (B, S)
    idx = slots.clamp(max=p - 1).unsqueeze(-1).expand(b, s, d)  # (B, S, d)
    prompt = prompt_embeds.to(x.dtype).gather(1, idx)  # (B, S, d)
    return torch.where((slots < p).unsqueeze(-1), prompt, x)
