"""LLaDA2.0 (``model_type: llada2_moe``): inclusionAI's block-diffusion mixture of experts.

LLaDA2.0-mini is a 20-layer model whose first ``first_k_dense_replace`` layers have a dense
SwiGLU MLP and whose others have a **mixture of experts**: 256 routed experts of which each
token uses 8, plus one always-on shared expert. Routing is DeepSeek-V3 style:

* sigmoid scores ``s = σ(x Wᵀ)`` of every expert, computed in float32;
* an ``expert_bias`` added for **selection only**: the experts are split into ``n_group``
  groups, each group is scored by the sum of its two best biased scores, the best
  ``topk_group`` groups are kept, and the ``num_experts_per_tok`` best biased scores in
  them are the chosen experts;
* the weights are the chosen *unbiased* scores, normalised to sum to 1 and multiplied by
  ``routed_scaling_factor``.

Attention has a fused ``query_key_value`` projection (grouped-query heads), a per-head
RMSNorm of queries and keys before RoPE, and **partial rotary** embeddings: only the first
``head_dim · partial_rotary_factor`` dimensions of each head are rotated (half-split
convention within them), the rest pass through. Attention is **block-causal**: bidirectional
inside blocks of ``block_size`` positions, causal across them; the authors' decode loop
builds this mask from its ``block_length`` (32 for LLaDA2.0-mini), so ``block_size``
defaults to 32 when the config does not set it. Logits are not shifted.

Weights load under the Hugging Face per-expert names (``model.word_embeddings``,
``model.layers.{i}.attention.query_key_value``, ``model.layers.{i}.mlp.experts.{e}.gate_proj``,
``model.layers.{i}.mlp.gate.expert_bias``, …, ``lm_head``). dFactory's training config
(``model_type: llada2_moe_veomni``) is read too, but its merged expert tensors are not: a
checkpoint must hold the per-expert names. The mask token is ``<|mask|>`` = 156895 and EOS
156892 (the authors' ``generate`` defaults) when neither the config nor the tokenizer says.

The mixture of experts runs each chosen expert on the tokens routed to it, which needs the
per-expert token counts on the host (one sync per MoE layer and forward): this family does
not take the CUDA-graph fast path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dlm_decode.interfaces import KVBuffer
from dlm_decode.models.checkpoint import ConfigError
from dlm_decode.models.native import (
    NativeModel,
    check_token_ids,
    config_int,
    config_number,
)
from dlm_decode.models.sdar import qwen_head_layout
from dlm_decode.models.transformer import (
    ArchSpec,
    RMSNorm,
    Transformer,
    apply_rope,
)

__all__ = [
    "LLADA2_BLOCK_CONFIG",
    "LLaDA2Attention",
    "LLaDA2Block",
    "LLaDA2MoE",
    "LLaDA2Model",
    "LLaDA2Router",
    "LLaDA2Spec",
    "LLaDA2Transformer",
    "SwiGLUExpert",
]

#: ``<|mask|>`` of the LLaDA2.0 tokenizer (the authors' ``generate`` default).
LLADA2_MASK_ID = 156895
#: ``<|endoftext|>`` of the LLaDA2.0 tokenizer (the authors' ``generate`` default EOS).
LLADA2_EOS_ID = 156892

#: The numerics keys of LLaDA2.0-mini's ``config.json`` that the presets share.
LLADA2_BLOCK_CONFIG: dict[str, Any] = {
    "hidden_act": "silu",
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "use_bias": False,
    "use_qkv_bias": False,
    "use_rmsnorm": True,
    "norm_head": False,
    "norm_topk_prob": True,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "score_function": "sigmoid",
    "router_dtype": "fp32",
    "moe_router_enable_expert_bias": True,
    "routed_scaling_factor": 2.5,
    "partial_rotary_factor": 0.5,
}


@dataclass(frozen=True)
class LLaDA2Spec(ArchSpec):
    """An [`ArchSpec`][dlm_decode.models.transformer.ArchSpec] with LLaDA2's mixture of
    experts and partial rotary embeddings (``d_ff`` is the dense layers' MLP size).

    Attributes:
        n_experts: routed experts per MoE layer.
        n_experts_per_token: experts each token is routed to (top-k).
        n_shared_experts: always-on experts, fused into one MLP of
            ``n_shared_experts · moe_d_ff`` (0: none).
        moe_d_ff: hidden size of one expert's SwiGLU MLP.
        n_dense_layers: leading layers with a dense MLP (``first_k_dense_replace``).
        n_groups: expert groups of the group-limited selection (``n_group``).
        topk_groups: groups kept per token (``topk_group``).
        routed_scaling: factor of the normalised routing weights.
        rotary_dim: leading dimensions of each head that RoPE rotates (even, ≤ head dim).
        out_bias: the attention output projection has a bias (``use_bias``).
    """

    n_experts: int = 1
    n_experts_per_token: int = 1
    n_shared_experts: int = 0
    moe_d_ff: int = 1
    n_dense_layers: int = 0
    n_groups: int = 1
    topk_groups: int = 1
    routed_scaling: float = 1.0
    rotary_dim: int | None = None
    out_bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_experts % self.n_groups or self.n_experts // self.n_groups < 2:
            raise ValueError(
                f"n_experts {self.n_experts} must split into n_groups {self.n_groups} groups "
                f"of at least 2 experts"
            )
        if not 1 <= self.topk_groups <= self.n_groups:
            raise ValueError(f"topk_groups {self.topk_groups} must be in [1, {self.n_groups}]")
        reachable = self.topk_groups * (self.n_experts // self.n_groups)
        if not 1 <= self.n_experts_per_token <= reachable:
            raise ValueError(
                f"n_experts_per_token {self.n_experts_per_token} must be in [1, {reachable}]"
            )
        rot = self.rope_dim
        if rot % 2 or not 2 <= rot <= self.head_dim:
            raise ValueError(f"rotary_dim {rot} must be even and in [2, {self.head_dim}]")

    @property
    def rope_dim(self) -> int:
        """Rotated dimensions of each head (``rotary_dim``, else the whole head)."""
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block ``layer`` has the mixture of experts (else a dense MLP)."""
        return layer >= self.n_dense_layers


class SwiGLUExpert(nn.Module):
    """``down(silu(gate(x)) · up(x))`` without biases, of any hidden size (one expert, the
    shared experts or a dense layer).

    Args:
        d_model: input and output size.
        d_ff: hidden size.
        dtype: dtype of the weights.
    """

    def __init__(self, d_model: int, d_ff: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=False, dtype=dtype)
        self.up = nn.Linear(d_model, d_ff, bias=False, dtype=dtype)
        self.down = nn.Linear(d_ff, d_model, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., d_model)`` → ``(..., d_model)``."""
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LLaDA2Router(nn.Module):
    """Sigmoid routing with an expert bias and group-limited top-k selection.

    Parameters: ``weight`` ``(E, d_model)`` and ``expert_bias`` ``(E,)`` (a parameter here,
    a buffer in the authors' code; both are checkpoint tensors).

    Args:
        spec: the architecture.
        dtype: dtype of the weights (the scores are computed in float32 regardless).
    """

    def __init__(self, spec: LLaDA2Spec, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(torch.empty(spec.n_experts, spec.d_model, dtype=dtype))
        self.expert_bias = nn.Parameter(torch.zeros(spec.n_experts, dtype=dtype))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose experts for each token.

        Args:
            x: ``(N, d_model)`` normed hidden states.

        Returns:
            ``(experts, weights)``: ``(N, k)`` long expert ids (best biased score first) and
            ``(N, k)`` float32 routing weights (sum ``routed_scaling`` per token when
            ``k > 1``).
        """
        spec = self.spec
        n = x.shape[0]
        g, per_group = spec.n_groups, spec.n_experts // spec.n_groups
        logits = F.linear(x.float(), self.weight.float())  # (N, E) float32
        scores = torch.sigmoid(logits)  # (N, E)
        biased = scores + self.expert_bias  # (N, E), float32 or wider: selection only
        top2 = biased.view(n, g, per_group).topk(2, dim=-1).values  # (N, G, 2)
        groups = top2.sum(-1).topk(spec.topk_groups, dim=-1, sorted=False).indices  # (N, g')
        keep = torch.zeros(n, g, dtype=torch.bool, device=x.device)
        keep.scatter_(1, groups, True)  # (N, G)
        keep = keep.repeat_interleave(per_group, dim=1)  # (N, E)
        chosen = biased.masked_fill(~keep, float("-inf")).topk(spec.n_experts_per_token).indices
        weights = scores.gather(1, chosen)  # (N, k) unbiased scores
        if spec.n_experts_per_token > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return chosen, weights * spec.routed_scaling


class LLaDA2MoE(nn.Module):
    """Routed experts plus the shared experts: ``Σ_k w_k · expert_k(x) + shared(x)``.

    Args:
        spec: the architecture.
        dtype: dtype of the weights.
    """

    def __init__(self, spec: LLaDA2Spec, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.router = LLaDA2Router(spec, dtype)
        self.experts = nn.ModuleList(
            SwiGLUExpert(spec.d_model, spec.moe_d_ff, dtype) for _ in range(spec.n_experts)
        )
        self.shared = (
            SwiGLUExpert(spec.d_model, spec.moe_d_ff * spec.n_shared_experts, dtype)
            if spec.n_shared_experts
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, S, d)`` → ``(B, S, d)``.

        Tokens are sorted by expert and each expert with tokens runs once on its slice (the
        per-expert counts are read on the host). The weighted sum is taken in float32 (at
        least), as the authors' code does.
        """
        b, s, d = x.shape
        flat = x.reshape(b * s, d)  # (N, d)
        chosen, weights = self.router(flat)  # (N, k) ×2
        k = chosen.shape[1]
        order = chosen.flatten().argsort(stable=True)  # (N·k,) assignments by expert
        counts = torch.bincount(chosen.flatten(), minlength=self.spec.n_experts).tolist()
        routed = flat[order // k]  # (N·k, d) token of each sorted assignment
        out = torch.empty_like(routed)
        lo = 0
        for expert, count in zip(self.experts, counts, strict=True):
            if count:
                out[lo : lo + count] = expert(routed[lo : lo + count])
                lo += count
        per_slot = torch.empty_like(out)
        per_slot[order] = out  # (N·k, d) back in (token, slot) order
        work = torch.promote_types(x.dtype, torch.float32)
        y = (per_slot.view(b * s, k, d).to(work) * weights.to(work).unsqueeze(-1)).sum(1)
        y = y.to(x.dtype).view(b, s, d)  # (B, S, d)
        if self.shared is not None:
            y = y + self.shared(x)
        return y


class LLaDA2Attention(nn.Module):
    """Grouped-query attention with a fused QKV projection, per-head q/k RMSNorm, partial
    RoPE, a block-causal mask and a KV buffer.

    Args:
        spec: the architecture.
        dtype: dtype of the weights.
    """

    def __init__(self, spec: LLaDA2Spec, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.spec = spec
        hd = spec.head_dim
        width = (spec.n_heads + 2 * spec.n_kv_heads) * hd
        self.qkv = nn.Linear(spec.d_model, width, bias=spec.qkv_bias, dtype=dtype)
        self.q_norm = RMSNorm(hd, spec.rms_norm_eps, dtype)
        self.k_norm = RMSNorm(hd, spec.rms_norm_eps, dtype)
        self.o = nn.Linear(spec.n_heads * hd, spec.d_model, bias=spec.out_bias, dtype=dtype)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot = self.spec.rope_dim
        turned = apply_rope(x[..., :rot], cos, sin)  # (B, H, S, rot)
        return torch.cat([turned, x[..., rot:]], dim=-1)  # (B, H, S, hd)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        kv: KVBuffer | None,
        layer: int,
        start: int,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from the span ``x`` to itself or to every slot of ``kv``.

        Args:
            x: ``(B, S, d_model)`` normed hidden states of the span.
            cos: ``(B, 1, S, rotary_dim)`` rotary cosines, in ``x``'s dtype.
            sin: ``(B, 1, S, rotary_dim)`` rotary sines.
            mask: ``(B, 1, S, T)`` bool block-causal mask (true = attend).
            kv: buffer to write the span's K/V into and read all ``T`` slots from.
            layer: index of this layer in ``kv``.
            start: buffer slot of the span's first row.
            positions: ``(B, S)`` slots of the rows when they are not the contiguous span.

        Returns:
            ``(B, S, d_model)``.
        """
        spec = self.spec
        b, s, _ = x.shape
        h, hkv, hd = spec.n_heads, spec.n_kv_heads, spec.head_dim
        qkv = self.qkv(x).view(b, s, h + 2 * hkv, hd)  # (B, S, H + 2·H_kv, hd)
        q, k, v = (t.transpose(1, 2) for t in qkv.split([h, hkv, hkv], dim=2))
        q, k = self.q_norm(q), self.k_norm(k)  # (B, H, S, hd), (B, H_kv, S, hd)
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
        if rep > 1:  # fold each K/V group's query heads into the length; tile the mask
            q = q.reshape(b, hkv, rep * s, hd)  # (B, H_kv, rep·S, hd)
            mask = mask.repeat(1, 1, rep, 1)  # (B, 1, rep·S, T)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H_kv, rep·S, hd)
        out = out.reshape(b, h, s, hd).transpose(1, 2).reshape(b, s, h * hd)  # (B, S, H·hd)
        return self.o(out)


class LLaDA2Block(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))`` where the MLP is
    dense (the first ``n_dense_layers`` blocks) or the mixture of experts.

    Args:
        spec: the architecture.
        layer: index of the block.
        dtype: dtype of the weights.
    """

    def __init__(self, spec: LLaDA2Spec, layer: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(spec.d_model, spec.rms_norm_eps, dtype)
        self.attn = LLaDA2Attention(spec, dtype)
        self.mlp_norm = RMSNorm(spec.d_model, spec.rms_norm_eps, dtype)
        self.mlp: nn.Module = (
            LLaDA2MoE(spec, dtype)
            if spec.is_moe_layer(layer)
            else SwiGLUExpert(spec.d_model, spec.d_ff, dtype)
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        kv: KVBuffer | None,
        layer: int,
        start: int,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(B, S, d)`` → ``(B, S, d)`` (arguments as for
        [`LLaDA2Attention.forward`][dlm_decode.models.llada2.LLaDA2Attention.forward])."""
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, kv, layer, start, positions)
        return x + self.mlp(self.mlp_norm(x))


class LLaDA2Transformer(Transformer):
    """Embedding, ``n_layers`` [`LLaDA2Block`][dlm_decode.models.llada2.LLaDA2Block]s,
    final RMSNorm and LM head, with the
    [`Model.forward`][dlm_decode.interfaces.Model.forward] contract of the shared
    [`Transformer`][dlm_decode.models.transformer.Transformer] (its forward, with the
    spec's partial ``rope_dim``).

    Internal parameter names: ``embed``, ``blocks.{i}.attn_norm``,
    ``blocks.{i}.attn.{qkv,q_norm,k_norm,o}``, ``blocks.{i}.mlp_norm``, then
    ``blocks.{i}.mlp.{gate,up,down}`` (dense) or ``blocks.{i}.mlp.router``,
    ``blocks.{i}.mlp.experts.{e}.{gate,up,down}``, ``blocks.{i}.mlp.shared.{gate,up,down}``;
    ``norm``, ``head`` (absent with tied embeddings).

    Args:
        spec: the architecture.
        dtype: dtype of the weights.
    """

    spec: LLaDA2Spec

    def make_block(self, spec: ArchSpec, index: int, dtype: torch.dtype | None) -> nn.Module:
        """A [`LLaDA2Block`][dlm_decode.models.llada2.LLaDA2Block]: dense MLP for the first
        ``n_dense_layers`` layers, the mixture of experts after."""
        assert isinstance(spec, LLaDA2Spec)
        return LLaDA2Block(spec, index, dtype)


#: Checkpoint names of a block's submodules (relative to ``model.layers.{i}.``); experts
#: are ``mlp.experts.{e}.{gate,up,down}_proj``.
LLADA2_LAYER_NAMES: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "attn.qkv": "attention.query_key_value",
    "attn.q_norm": "attention.query_layernorm",
    "attn.k_norm": "attention.key_layernorm",
    "attn.o": "attention.dense",
    "mlp_norm": "post_attention_layernorm",
    "mlp.gate": "mlp.gate_proj",
    "mlp.up": "mlp.up_proj",
    "mlp.down": "mlp.down_proj",
    "mlp.router": "mlp.gate",
    "mlp.shared.gate": "mlp.shared_experts.gate_proj",
    "mlp.shared.up": "mlp.shared_experts.up_proj",
    "mlp.shared.down": "mlp.shared_experts.down_proj",
}
_EXPERT_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def _config_bool(config: Mapping[str, Any], key: str, arch: str, default: bool) -> bool:
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(
            f"{arch} config.json: {key}={value!r} is not a boolean; write {key} as true or "
            f"false (no quotes) in config.json"
        )
    return value


def _llada2_mini(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model_type": "llada2_moe",
        "architectures": ["LLaDA2MoeModelLM"],
        "vocab_size": 157184,
        "hidden_size": 2048,
        "intermediate_size": 5120,
        "moe_intermediate_size": 512,
        "num_hidden_layers": 20,
        "first_k_dense_replace": 1,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 256,
        "num_experts_per_tok": 8,
        "num_shared_experts": 1,
        "n_group": 8,
        "topk_group": 4,
        "rope_theta": 600000,
        "rotary_dim": 64,
        "max_position_embeddings": 16384,
        "block_size": 32,
        "mask_token_id": LLADA2_MASK_ID,
        "eos_token_id": LLADA2_EOS_ID,
        "pad_token_id": LLADA2_EOS_ID,
        **LLADA2_BLOCK_CONFIG,
        "torch_dtype": "bfloat16",
    }
    return base | overrides


class LLaDA2Model(NativeModel):
    """Native LLaDA2.0 MoE (block-causal mask predictor, unshifted logits).

    ``attention`` is block-causal with the config's ``block_size`` (default 32, the block
    of the authors' decode loop); decode with a ``block_length`` that is a multiple of it
    and the ``block`` cache for exact reuse of finished blocks. Weights use the Hugging
    Face per-expert names (see the module docstring); the routers' scores are computed in
    float32 whatever the model dtype.
    """

    name: ClassVar[str] = "llada2_moe"
    config_model_types: ClassVar[tuple[str, ...]] = ("llada2_moe", "llada2_moe_veomni")
    logits_shift = 0
    preferred_cache: ClassVar[str | None] = "block"
    module_class = LLaDA2Transformer

    global_names: ClassVar[Mapping[str, str]] = {
        "embed": "model.word_embeddings",
        "norm": "model.norm",
        "head": "lm_head",
    }
    layer_prefix: ClassVar[str] = "model.layers.{i}."
    layer_names: ClassVar[Mapping[str, str]] = LLADA2_LAYER_NAMES
    #: ``llada2-mini``: LLaDA2.0-mini's shapes (random weights for the GPU bench);
    #: ``llada2-tiny``: a tiny random model for tests (one dense layer, then two MoE layers
    #: of 8 experts in 4 groups, top-2 from 2 groups, one shared expert; head dim 16 with
    #: 8 rotated dimensions; attention blocks of 4).
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "llada2-mini": _llada2_mini(),
        "llada2-tiny": _llada2_mini(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            rope_theta=10000.0,
            rotary_dim=8,
            max_position_embeddings=512,
            block_size=4,
            mask_token_id=127,
            eos_token_id=1,
            pad_token_id=1,
            torch_dtype="float32",
        ),
    }

    def __init__(
        self,
        module: LLaDA2Transformer,  # type: ignore[override]
        config: Mapping[str, Any],
        tokenizer: Any = None,
    ) -> None:
        config = dict(config)
        if (
            config.get("mask_token_id") is None
            and getattr(tokenizer, "mask_token_id", None) is None
        ):
            config["mask_token_id"] = LLADA2_MASK_ID
        if config.get("eos_token_id") is None and getattr(tokenizer, "eos_token_id", None) is None:
            config["eos_token_id"] = LLADA2_EOS_ID
        super().__init__(module, config, tokenizer)  # type: ignore[arg-type]

    @classmethod
    def weight_name_map(
        cls,
        spec: ArchSpec,
        module: nn.Module | None = None,  # type: ignore[override]
    ) -> dict[str, str]:
        """Internal parameter name → Hugging Face name, experts one by one
        (``blocks.3.mlp.experts.7.up.weight`` → ``model.layers.3.mlp.experts.7.up_proj.weight``).

        Args:
            spec: the architecture.
            module: a module of that spec to read the names from; default a ``meta`` one.
        """
        if module is None:
            with torch.device("meta"):
                module = LLaDA2Transformer(spec)  # type: ignore[arg-type]
        out = {}
        for name in module.state_dict():
            mod, param = name.rsplit(".", 1)
            if mod.startswith("blocks."):
                _, idx, sub = mod.split(".", 2)
                if sub.startswith("mlp.experts."):
                    _, _, expert, proj = sub.split(".")
                    rel = f"mlp.experts.{expert}.{_EXPERT_NAMES[proj]}"
                else:
                    rel = cls.layer_names[sub]
                ckpt = cls.layer_prefix.format(i=int(idx)) + rel
            else:
                ckpt = cls.global_names[mod]
            out[name] = f"{ckpt}.{param}"
        return out

    @classmethod
    def spec_from_config(cls, config: Mapping[str, Any]) -> LLaDA2Spec:
        """Read LLaDA2's ``config.json``.

        Sizes: ``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``,
        ``head_dim`` (default ``hidden_size / num_attention_heads``),
        ``num_hidden_layers``, ``intermediate_size`` (the dense layers' MLP; required when
        ``first_k_dense_replace`` > 0), ``vocab_size``, ``max_position_embeddings``
        (default 16384). Experts: ``num_experts``, ``num_experts_per_tok``,
        ``moe_intermediate_size`` (required), ``num_shared_experts`` (default 0),
        ``first_k_dense_replace`` (default 0), ``n_group`` / ``topk_group`` (default 8 /
        4), ``routed_scaling_factor`` (default 2.5). RoPE: ``rope_theta`` (default 1e4),
        ``partial_rotary_factor`` (default 0.5; ``rotary_dim``, when present, must agree).
        ``block_size`` (default 32), biases ``use_qkv_bias`` (default false) and
        ``use_bias`` (the attention output's, default true as in the authors' config
        class), ``rms_norm_eps`` (default 1e-5), ``tie_word_embeddings``.

        Raises:
            ConfigError: a required key is missing, a value has the wrong type or is out
                of range, or sizes do not fit together (one line naming the key, the value
                and the fix).
            ValueError: RoPE scaling, sliding windows, a non-SiLU activation, a non-RMS
                norm, a normed head, a score function other than sigmoid or a router dtype
                other than fp32 (not implemented).
        """
        arch = "LLaDA2"
        unsupported = {
            "rope_scaling": bool(config.get("rope_scaling")),
            "use_sliding_window": bool(config.get("use_sliding_window")),
            "hidden_act": config.get("hidden_act", "silu") != "silu",
            "use_rmsnorm": config.get("use_rmsnorm", True) is not True,
            "norm_head": bool(config.get("norm_head")),
            "score_function": config.get("score_function", "sigmoid") != "sigmoid",
            "router_dtype": config.get("router_dtype", "fp32") not in ("fp32", None),
        }
        for key, bad in unsupported.items():
            if bad:
                raise ValueError(f"{arch}: {key}={config[key]!r} is unsupported")
        hidden, n_heads, n_kv, head_dim = qwen_head_layout(config, arch)
        vocab = config_int(config, "vocab_size", arch)
        check_token_ids(config, arch, vocab, "vocab_size")
        n_layers = config_int(config, "num_hidden_layers", arch)
        n_dense = config_int(config, "first_k_dense_replace", arch, default=0, minimum=0)
        if n_dense > n_layers:
            raise ConfigError(
                f"{arch} config.json: first_k_dense_replace={n_dense} exceeds "
                f"num_hidden_layers={n_layers}; set it to at most {n_layers} in config.json"
            )
        moe_d_ff = config_int(config, "moe_intermediate_size", arch)
        if n_dense:
            dense_d_ff = config_int(config, "intermediate_size", arch)
        else:  # no dense layer: the size is unused
            dense_d_ff = config_int(config, "intermediate_size", arch, default=moe_d_ff)
        n_experts = config_int(config, "num_experts", arch)
        top_k = config_int(config, "num_experts_per_tok", arch)
        n_groups = config_int(config, "n_group", arch, default=8)
        topk_groups = config_int(config, "topk_group", arch, default=4)
        if n_experts % n_groups or n_experts // n_groups < 2:
            raise ConfigError(
                f"{arch} config.json: num_experts={n_experts} does not split into n_group="
                f"{n_groups} groups of at least 2 experts; set n_group to a divisor of "
                f"num_experts / 2 in config.json"
            )
        if topk_groups > n_groups:
            raise ConfigError(
                f"{arch} config.json: topk_group={topk_groups} exceeds n_group={n_groups}; "
                f"set topk_group to at most {n_groups} in config.json"
            )
        reachable = topk_groups * (n_experts // n_groups)
        if top_k > reachable:
            raise ConfigError(
                f"{arch} config.json: num_experts_per_tok={top_k} exceeds the {reachable} "
                f"experts of topk_group={topk_groups} groups; lower num_experts_per_tok or "
                f"raise topk_group in config.json"
            )
        factor = config_number(config, "partial_rotary_factor", arch, 0.5)
        rot = int(head_dim * factor)
        if factor > 1 or rot < 2 or rot % 2:
            raise ConfigError(
                f"{arch} config.json: partial_rotary_factor={factor!r} rotates {rot} of the "
                f"{head_dim} head dimensions; RoPE needs an even number in [2, {head_dim}]: "
                f"fix partial_rotary_factor in config.json"
            )
        stated = config_int(config, "rotary_dim", arch, default=rot)
        if stated != rot:
            raise ConfigError(
                f"{arch} config.json: rotary_dim={stated} disagrees with head_dim × "
                f"partial_rotary_factor = {head_dim} × {factor} = {rot}; fix either in "
                f"config.json"
            )
        return LLaDA2Spec(
            d_model=hidden,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            n_layers=n_layers,
            d_ff=dense_d_ff,
            vocab_size=vocab,
            max_length=config_int(config, "max_position_embeddings", arch, default=16384),
            rope_theta=config_number(config, "rope_theta", arch, 10000.0),
            rms_norm_eps=config_number(config, "rms_norm_eps", arch, 1e-5),
            qkv_bias=_config_bool(config, "use_qkv_bias", arch, False),
            tie_embeddings=_config_bool(config, "tie_word_embeddings", arch, False),
            rope_full_precision=False,
            qk_norm=True,
            explicit_head_dim=head_dim,
            block_size=config_int(config, "block_size", arch, default=32),
            n_experts=n_experts,
            n_experts_per_token=top_k,
            n_shared_experts=config_int(config, "num_shared_experts", arch, default=0, minimum=0),
            moe_d_ff=moe_d_ff,
            n_dense_layers=n_dense,
            n_groups=n_groups,
            topk_groups=topk_groups,
            routed_scaling=config_number(config, "routed_scaling_factor", arch, 2.5),
            rotary_dim=rot,
            out_bias=_config_bool(config, "use_bias", arch, True),
        )
