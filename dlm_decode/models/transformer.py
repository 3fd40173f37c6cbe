"""The shared native transformer behind LLaDA, Dream and the shipped tiny model.

One implementation of RMSNorm, rotary embeddings, attention and the SwiGLU MLP,
parametrised by an :class:`ArchSpec`; the architectures differ only in their spec (biases,
head counts, RoPE theta and precision, logits shift) and in how their checkpoint names the
weights. :class:`NativeModel` turns the ``nn.Module`` into a
[`Model`][dlm_decode.interfaces.Model]: it maps weight names, loads checkpoints, builds
random weights on a device and fills in the special token ids.

Attention is always bidirectional (``is_causal=False``) and runs through
``torch.nn.functional.scaled_dot_product_attention`` with a boolean key mask ``(B, 1, 1, T)``.
Grouped-query attention folds the query heads of each key/value group into the query
length, so no key/value copy is made and every SDPA kernel applies (exact because the mask
depends on the key only).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dlm_decode.interfaces import KVBuffer, Model

__all__ = [
    "ArchSpec",
    "Attention",
    "Block",
    "NativeModel",
    "RMSNorm",
    "SwiGLU",
    "Transformer",
    "apply_rope",
    "require_key",
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

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head dim {self.d_model // self.n_heads} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        """Dimension of one attention head."""
        return self.d_model // self.n_heads


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
    ) -> torch.Tensor:
        """Attend from the span ``x`` to the span itself or to all cached positions.

        Args:
            x: ``(B, S, d_model)`` normed hidden states of the span.
            cos: ``(B, 1, S, hd)`` rotary cosines (see :func:`rope_cos_sin`).
            sin: ``(B, 1, S, hd)`` rotary sines.
            mask: ``(B, 1, 1, T)`` bool key mask (true = attend), or ``None``.
            kv: buffer to write the span's K/V into and read all ``T`` positions from.
            layer: index of this layer in ``kv``.
            start: absolute position of the span's first row.

        Returns:
            ``(B, S, d_model)``.
        """
        spec = self.spec
        b, s, _ = x.shape
        h, hkv, hd = spec.n_heads, spec.n_kv_heads, spec.head_dim
        q = self.q(x).view(b, s, h, hd).transpose(1, 2)  # (B, H, S, hd)
        k = self.k(x).view(b, s, hkv, hd).transpose(1, 2)  # (B, H_kv, S, hd)
        v = self.v(x).view(b, s, hkv, hd).transpose(1, 2)  # (B, H_kv, S, hd)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        if kv is not None:
            kv.k[layer, :, :, start : start + s] = k
            kv.v[layer, :, :, start : start + s] = v
            k, v = kv.k[layer], kv.v[layer]  # (B, H_kv, T, hd)
        rep = h // hkv
        if rep > 1:  # query heads of one K/V group share it: fold them into the length
            q = q.reshape(b, hkv, rep * s, hd)  # (B, H_kv, rep·S, hd)
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
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, kv, layer, start)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Embedding, ``n_layers`` blocks, final RMSNorm and an LM head.

    Parameter names (the internal layout :class:`NativeModel` maps checkpoint names onto):
    ``embed.weight``, ``blocks.{i}.attn_norm.weight``, ``blocks.{i}.attn.{q,k,v,o}.weight``
    (``.bias`` for q/k/v when ``qkv_bias``), ``blocks.{i}.mlp_norm.weight``,
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
        self.blocks = nn.ModuleList(Block(spec, dtype) for _ in range(spec.n_layers))
        self.norm = RMSNorm(spec.d_model, spec.rms_norm_eps, dtype)
        self.head = (
            None
            if spec.tie_embeddings
            else nn.Linear(spec.d_model, spec.vocab_size, bias=False, dtype=dtype)
        )

    def forward(
        self,
        ids: torch.Tensor,
        *,
        start: int = 0,
        kv: KVBuffer | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """The [`Model.forward`][dlm_decode.interfaces.Model.forward] contract.

        Args:
            ids: ``(B, S)`` token ids at positions ``[start, start + S)``.
            start: absolute position of ``ids[:, 0]``.
            kv: buffer to write the span's K/V into and attend over (all ``T`` positions);
                ``None`` to attend over the span only.
            attention_mask: ``(B, T)`` bool key mask, false at padding; or ``None``.
            position_ids: ``(B, S)`` RoPE positions; default ``start + arange(S)``.
            logits_rows: ``(lo, hi)`` rows of the span to run through the norm and head.

        Returns:
            ``(B, hi - lo, V)`` logits.

        Raises:
            ValueError: inconsistent span, buffer or mask shapes.
        """
        spec = self.spec
        b, s = ids.shape
        if kv is None:
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
        lo, hi = logits_rows if logits_rows is not None else (0, s)
        if not 0 <= lo <= hi <= s:
            raise ValueError(f"logits_rows ({lo}, {hi}) outside the span of {s} rows")
        x = self.embed(ids)  # (B, S, d)
        rope_dtype = x.dtype
        if spec.rope_full_precision:
            rope_dtype = torch.promote_types(x.dtype, torch.float32)
        cos, sin = rope_cos_sin(position_ids, spec.head_dim, spec.rope_theta, rope_dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, kv, i, start)  # (B, S, d)
        x = self.norm(x[:, lo:hi])  # (B, hi-lo, d)
        head = self.embed.weight if self.head is None else self.head.weight
        return F.linear(x, head)  # (B, hi-lo, V)


# --------------------------------------------------------------------------------------
# NativeModel: the Model plugin over Transformer
# --------------------------------------------------------------------------------------


def require_key(config: Mapping[str, Any], key: str, arch: str) -> Any:
    """``config[key]``, or a ``ValueError`` naming the architecture and the missing key."""
    if config.get(key) is None:
        raise ValueError(f"{arch} config.json is missing the required key {key!r}")
    return config[key]


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


class NativeModel(Model):
    """A [`Model`][dlm_decode.interfaces.Model] backed by the native :class:`Transformer`.

    Subclasses describe one checkpoint family: :meth:`spec_from_config` reads its
    ``config.json``, the name tables map internal parameter names to checkpoint names, and
    the token tables say which end-of-turn token to add to the EOS ids.

    Attributes:
        module: the ``nn.Module`` (for training or inspection; parameters do not require
            grad after loading).
        config: the ``config.json`` dict.
        spec: the :class:`ArchSpec`.
    """

    #: Checkpoint name of each global submodule (``embed``, ``norm``, ``head``).
    global_names: ClassVar[Mapping[str, str]] = {}
    #: Checkpoint prefix of block ``i`` (``{i}`` is formatted in).
    layer_prefix: ClassVar[str] = ""
    #: Checkpoint name of each submodule of a block, relative to :attr:`layer_prefix`.
    layer_names: ClassVar[Mapping[str, str]] = {}
    #: Tokens that end a chat turn; their ids join the EOS ids when the tokenizer has them.
    end_of_turn_tokens: ClassVar[tuple[str, ...]] = ()
    #: Without a tokenizer: config EOS id → end-of-turn id of the released tokenizer.
    known_end_of_turn_ids: ClassVar[Mapping[int, int]] = {}
    #: transformers tokenizer classes to try when ``AutoTokenizer`` cannot load the folder
    #: without remote code.
    tokenizer_fallbacks: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        module: Transformer,
        config: Mapping[str, Any],
        tokenizer: Any = None,
    ) -> None:
        self.module = module
        self.config = dict(config)
        self.spec = module.spec
        self.tokenizer = tokenizer
        self.vocab_size = self.spec.vocab_size
        self.max_length = self.spec.max_length
        self._set_special_ids()

    # -- architecture description ----------------------------------------------------
    @classmethod
    @abstractmethod
    def spec_from_config(cls, config: Mapping[str, Any]) -> ArchSpec:
        """Read the :class:`ArchSpec` from a ``config.json`` dict.

        Raises:
            ValueError: a required key is missing or a feature is unsupported.
        """

    @classmethod
    def weight_name_map(cls, spec: ArchSpec) -> dict[str, str]:
        """Internal parameter name → checkpoint name, for every parameter of ``spec``."""
        with torch.device("meta"):
            names = list(Transformer(spec).state_dict())
        out = {}
        for name in names:
            mod, param = name.rsplit(".", 1)
            if mod.startswith("blocks."):
                _, idx, sub = mod.split(".", 2)
                ckpt = cls.layer_prefix.format(i=int(idx)) + cls.layer_names[sub]
            else:
                ckpt = cls.global_names[mod]
            out[name] = f"{ckpt}.{param}"
        return out

    @classmethod
    def expected_weight_names(cls, config: Mapping[str, Any]) -> list[str]:
        """Sorted checkpoint weight names a checkpoint with this ``config.json`` must hold."""
        return sorted(cls.weight_name_map(cls.spec_from_config(config)).values())

    # -- construction ----------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
    ) -> NativeModel:
        """Load a checkpoint folder in the Hugging Face layout.

        Args:
            path: folder with ``config.json`` and ``model.safetensors`` (or shards with
                ``model.safetensors.index.json``), optionally tokenizer files.
            device: where the weights go (loaded there directly, tensor by tensor).
            dtype: weight dtype or its name; default: ``torch_dtype`` of the config, else
                float32 on CPU and bfloat16 elsewhere.

        Returns:
            The model, parameters frozen, tokenizer attached when the folder has one.

        Raises:
            FileNotFoundError: no config or weights in the folder.
            ValueError: missing, unexpected or wrong-shaped weights (names listed).
        """
        from dlm_decode.models.loading import load_tokenizer, read_config, read_weights

        folder = Path(path)
        config = read_config(folder)
        spec = cls.spec_from_config(config)
        device = torch.device(device)
        dtype = _resolve(dtype, config, device)
        names = cls.weight_name_map(spec)
        shapes = _shapes(spec)
        tensors = read_weights(
            folder,
            {names[k]: shapes[k] for k in names},
            device,
            dtype,
            what=f"the {cls.name} architecture",
        )
        with torch.device("meta"):
            module = Transformer(spec, dtype)
        module.load_state_dict({k: tensors[v] for k, v in names.items()}, assign=True)
        module.requires_grad_(False).eval()
        tokenizer = load_tokenizer(folder, cls.tokenizer_fallbacks)
        return cls(module, config, tokenizer)

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        seed: int = 0,
        norm_noise: float = 0.0,
    ) -> NativeModel:
        """Random weights built directly on ``device`` (no host copy of the weights).

        Linear, embedding and bias entries are drawn from ``N(0, 0.02²)`` with a generator on
        the device; norm weights are ``1`` (plus ``N(0, norm_noise²)`` when given).

        Args:
            config: a ``config.json`` dict of this architecture.
            device: target device.
            dtype: weight dtype (as in :meth:`from_pretrained`).
            seed: seed of the device generator.
            norm_noise: standard deviation of noise added to norm weights (tests use it so
                that a loader which drops norm weights is caught).

        Returns:
            The model, parameters frozen. On the ``meta`` device nothing is allocated or
            initialised (shapes only).
        """
        spec = cls.spec_from_config(config)
        device = torch.device(device)
        dtype = _resolve(dtype, config, device)
        with torch.device("meta"):
            module = Transformer(spec, dtype)
        module.requires_grad_(False).eval()
        if device.type == "meta":  # shapes only (planning, parameter counts)
            return cls(module, config)
        module.to_empty(device=device)
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                    if norm_noise:
                        p.add_(
                            torch.randn(p.shape, generator=gen, device=device, dtype=dtype),
                            alpha=norm_noise,
                        )
                else:
                    p.normal_(0.0, 0.02, generator=gen)
        return cls(module, config)

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under their checkpoint names (what :meth:`from_pretrained` reads)."""
        names = self.weight_name_map(self.spec)
        sd = self.module.state_dict()
        return {names[k]: sd[k] for k in names}

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The live parameters under their checkpoint names (e.g. ``lm_head.weight``)."""
        names = self.weight_name_map(self.spec)
        for name, p in self.module.named_parameters():
            yield names[name], p

    def parameters(self) -> Iterator[nn.Parameter]:
        """The live parameters (as ``nn.Module.parameters``)."""
        return self.module.parameters()

    # -- special tokens ---------------------------------------------------------------
    def _token_id(self, token: str) -> int | None:
        tok = self.tokenizer
        if tok is None:
            return None
        tid = tok.convert_tokens_to_ids(token)
        if tid is None or tid == getattr(tok, "unk_token_id", None):
            return None
        return int(tid)

    def _set_special_ids(self) -> None:
        cfg, tok, v = self.config, self.tokenizer, self.vocab_size
        mask = cfg.get("mask_token_id")
        if mask is None and tok is not None:
            mask = getattr(tok, "mask_token_id", None)
        if mask is None:
            raise ValueError(
                f"{type(self).__name__}: config.json has no mask_token_id and the tokenizer "
                f"has no mask token; add mask_token_id to config.json"
            )
        self.mask_token_id = int(mask)
        eos = _as_id_list(cfg.get("eos_token_id"))
        if tok is not None:
            eos += _as_id_list(getattr(tok, "eos_token_id", None))
            eos += [t for t in map(self._token_id, self.end_of_turn_tokens) if t is not None]
        else:
            eos += [self.known_end_of_turn_ids[e] for e in eos if e in self.known_end_of_turn_ids]
        self.eos_token_ids = tuple(dict.fromkeys(e for e in eos if 0 <= e < v))
        pad = cfg.get("pad_token_id")
        if pad is None and tok is not None:
            pad = getattr(tok, "pad_token_id", None)
        if pad is None:
            pad = self.eos_token_ids[0] if self.eos_token_ids else 0
        self.pad_token_id = int(pad)

    # -- the Model contract -----------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.module.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the weights."""
        return self.module.embed.weight.dtype

    def new_kv(self, batch_size: int, max_length: int) -> KVBuffer:
        """A zeroed ``(n_layers, B, H_kv, T, hd)`` buffer in the model dtype and device."""
        s = self.spec
        shape = (s.n_layers, batch_size, s.n_kv_heads, max_length, s.head_dim)
        return KVBuffer(
            k=torch.zeros(shape, dtype=self.dtype, device=self.device),
            v=torch.zeros(shape, dtype=self.dtype, device=self.device),
        )

    def forward(
        self,
        ids: torch.Tensor,
        *,
        start: int = 0,
        kv: KVBuffer | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """See [`Model.forward`][dlm_decode.interfaces.Model.forward]."""
        return self.module(
            ids,
            start=start,
            kv=kv,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_rows=logits_rows,
        )

    def __repr__(self) -> str:
        s = self.spec
        return (
            f"{type(self).__name__}(layers={s.n_layers}, d_model={s.d_model}, "
            f"heads={s.n_heads}/{s.n_kv_heads}, vocab={s.vocab_size}, dtype={self.dtype}, "
            f"device={self.device})"
        )


def _resolve(
    dtype: torch.dtype | str | None, config: Mapping[str, Any], device: torch.device
) -> torch.dtype:
    from dlm_decode.models.loading import resolve_dtype

    return resolve_dtype(dtype, config, device)


def _shapes(spec: ArchSpec) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Transformer(spec).state_dict().items()}
