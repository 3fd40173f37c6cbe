"""[`NativeModel`][dlm_decode.models.native.NativeModel]: the
[`Model`][dlm_decode.interfaces.Model] plugin over the native
[`Transformer`][dlm_decode.models.transformer.Transformer].

It maps weight names between the internal layout and a checkpoint family's, loads
checkpoints, builds random weights on a device and fills in the special token ids.
Architectures (``llada``, ``dream``) subclass it with their name tables, ``config.json``
reader and presets.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from dlm_decode.interfaces import AttentionPattern, KVBuffer, Model
from dlm_decode.models.checkpoint import (
    ConfigError,
    load_tokenizer,
    read_config,
    read_weights,
    resolve_dtype,
)
from dlm_decode.models.transformer import ArchSpec, Transformer

__all__ = [
    "NativeModel",
    "check_head_layout",
    "check_token_ids",
    "config_int",
    "config_number",
    "require_key",
]

_REQUIRED: Any = object()
#: The ``config.json`` keys of special token ids (each optional, ``eos_token_id`` may be a
#: list).
TOKEN_ID_KEYS = ("mask_token_id", "bos_token_id", "eos_token_id", "pad_token_id")


def _kind(value: Any) -> str:
    """How a JSON value reads in an error: ``a string``, ``a boolean``, ``a list``, …"""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, float):
        return "a fraction" if math.isfinite(value) else "not a finite number"
    return type(value).__name__


def require_key(config: Mapping[str, Any], key: str, arch: str) -> Any:
    """``config[key]``, or a [`ConfigError`][dlm_decode.models.checkpoint.ConfigError]
    naming the architecture and the missing key."""
    if config.get(key) is None:
        raise ConfigError(
            f"{arch} config.json is missing the required key {key!r}; add it to config.json"
        )
    return config[key]


def config_int(
    config: Mapping[str, Any],
    key: str,
    arch: str,
    *,
    default: int | None = _REQUIRED,
    minimum: int = 1,
) -> int:
    """``config[key]`` as an integer of at least ``minimum``.

    A JSON number with no fractional part (``4096`` or ``4096.0``) is accepted; a string
    (``"4096"``), a boolean, a fraction, a list or an object is not.

    Args:
        config: the ``config.json`` dict.
        key: the key to read.
        arch: the architecture, for the message (``LLaDA``, ``Dream``).
        default: returned when the key is absent or ``null``; without one the key is
            required.
        minimum: the smallest value accepted (``1`` for sizes).

    Raises:
        ConfigError: the key is missing (and required), not an integer, or too small; one
            line naming ``config.json``, the key, the value and the fix.
    """
    value = config.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(
                f"{arch} config.json is missing the required key {key!r}; add it to "
                f"config.json (an integer ≥ {minimum})"
            )
        return default  # type: ignore[return-value]
    integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral:
        raise ConfigError(
            f"{arch} config.json: {key}={value!r} is {_kind(value)}, not an integer; write "
            f"{key} as a JSON integer ≥ {minimum} (no quotes) in config.json"
        )
    if int(value) < minimum:
        raise ConfigError(
            f"{arch} config.json: {key}={int(value)} must be ≥ {minimum}; fix {key} in config.json"
        )
    return int(value)


def config_number(config: Mapping[str, Any], key: str, arch: str, default: float) -> float:
    """``config[key]`` as a positive finite number (``default`` when absent or ``null``).

    Raises:
        ConfigError: a string, boolean or other non-number, or a value that is not
            positive and finite; one line naming ``config.json``, the key and the value.
    """
    value = config.get(key)
    if value is None:
        return float(default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(
            f"{arch} config.json: {key}={value!r} is {_kind(value)}, not a number; write "
            f"{key} as a positive JSON number (no quotes) in config.json"
        )
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(
            f"{arch} config.json: {key}={value!r} must be a positive finite number; fix "
            f"{key} in config.json"
        )
    return float(value)


def check_head_layout(
    arch: str,
    hidden: tuple[str, int],
    heads: tuple[str, int],
    kv_heads: tuple[str, int],
) -> None:
    """Check that the attention sizes of a ``config.json`` fit together.

    Args:
        arch: the architecture, for the message.
        hidden: ``(key, value)`` of the hidden size.
        heads: ``(key, value)`` of the query heads.
        kv_heads: ``(key, value)`` of the key/value heads.

    Raises:
        ConfigError: the hidden size is not a multiple of the heads, the heads are not a
            multiple of the key/value heads, or the head dimension is odd (RoPE rotates
            pairs); one line naming both keys and their values.
    """
    (hk, h), (nk, n), (kk, kv) = hidden, heads, kv_heads
    if h % n:
        raise ConfigError(
            f"{arch} config.json: {hk}={h} is not divisible by {nk}={n}; set {hk} to a "
            f"multiple of {nk} (head dim = {hk} / {nk}) in config.json"
        )
    if n % kv:
        raise ConfigError(
            f"{arch} config.json: {nk}={n} is not a multiple of {kk}={kv}; set {kk} to a "
            f"divisor of {nk} in config.json"
        )
    if (h // n) % 2:
        raise ConfigError(
            f"{arch} config.json: head dim {hk}/{nk} = {h}/{n} = {h // n} is odd and RoPE "
            f"needs it even; fix {hk} or {nk} in config.json"
        )


def check_token_ids(config: Mapping[str, Any], arch: str, vocab: int, vocab_key: str) -> None:
    """Check that the special token ids of a ``config.json`` are token ids of the model.

    Each of ``mask_token_id``, ``bos_token_id``, ``eos_token_id`` (an id or a list of ids)
    and ``pad_token_id`` is optional; when present it must be an integer in
    ``[0, vocab)``.

    Args:
        config: the ``config.json`` dict.
        arch: the architecture, for the message.
        vocab: the number of token ids (the logits width).
        vocab_key: the key ``vocab`` was read from, for the message.

    Raises:
        ConfigError: an id that is not an integer or lies outside ``[0, vocab)``; one line
            naming the key, the value and the vocabulary size.
    """
    for key in TOKEN_ID_KEYS:
        value = config.get(key)
        if value is None:
            continue
        ids = value if key == "eos_token_id" and isinstance(value, list) else [value]
        for tid in ids:
            if isinstance(tid, bool) or not isinstance(tid, int):
                raise ConfigError(
                    f"{arch} config.json: {key}={value!r} is {_kind(tid)}, not a token id; "
                    f"write it as a JSON integer in [0, {vocab}) in config.json"
                )
            if not 0 <= tid < vocab:
                raise ConfigError(
                    f"{arch} config.json: {key}={value!r} is outside the vocabulary "
                    f"[0, {vocab}) of {vocab_key}={vocab}; set {key} to a token id below "
                    f"{vocab} (or fix {vocab_key}) in config.json"
                )


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


class NativeModel(Model):
    """A [`Model`][dlm_decode.interfaces.Model] backed by the native
    [`Transformer`][dlm_decode.models.transformer.Transformer].

    Subclasses describe one checkpoint family:
    [`spec_from_config`][dlm_decode.models.native.NativeModel.spec_from_config] reads its
    ``config.json``, the name tables map internal parameter names to checkpoint names, and
    the token tables say which end-of-turn token to add to the EOS ids.

    Attributes:
        module: the ``nn.Module`` (for training or inspection; parameters do not require
            grad after loading).
        config: the ``config.json`` dict.
        spec: the [`ArchSpec`][dlm_decode.models.transformer.ArchSpec].
    """

    #: Checkpoint name of each global submodule (``embed``, ``norm``, ``head``).
    global_names: ClassVar[Mapping[str, str]] = {}
    #: Checkpoint prefix of block ``i`` (``{i}`` is formatted in).
    layer_prefix: ClassVar[str] = ""
    #: Checkpoint name of each submodule of a block, relative to ``layer_prefix``.
    layer_names: ClassVar[Mapping[str, str]] = {}
    #: Tokens that end a chat turn; their ids join the EOS ids when the tokenizer has them.
    end_of_turn_tokens: ClassVar[tuple[str, ...]] = ()
    #: Without a tokenizer: config EOS id → end-of-turn id of the released tokenizer.
    known_end_of_turn_ids: ClassVar[Mapping[int, int]] = {}
    #: transformers tokenizer classes to try when ``AutoTokenizer`` cannot load the folder
    #: without remote code.
    tokenizer_fallbacks: ClassVar[tuple[str, ...]] = ()
    #: The ``nn.Module`` class built from the spec, ``module_class(spec, dtype)``; a family
    #: whose blocks differ from the shared ones (e.g. ``llada2_moe``'s mixture of experts)
    #: names its own.
    module_class: ClassVar[Callable[..., nn.Module]] = Transformer

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
        self.attention = AttentionPattern(self.spec.block_size)
        self._set_special_ids()

    # -- architecture description ----------------------------------------------------
    @classmethod
    @abstractmethod
    def spec_from_config(cls, config: Mapping[str, Any]) -> ArchSpec:
        """Read the [`ArchSpec`][dlm_decode.models.transformer.ArchSpec] from a
        ``config.json`` dict.

        Implementations validate the values against each other (with
        [`config_int`][dlm_decode.models.native.config_int],
        [`check_head_layout`][dlm_decode.models.native.check_head_layout] and
        [`check_token_ids`][dlm_decode.models.native.check_token_ids]) so that a bad
        config fails here, before anything is allocated.

        Raises:
            ConfigError: a required key is missing, a value has the wrong type or is out
                of range, or sizes do not fit together.
            ValueError: a feature is unsupported.
        """

    @classmethod
    def weight_name_map(cls, spec: ArchSpec, module: Transformer | None = None) -> dict[str, str]:
        """Internal parameter name → checkpoint name, for every parameter of ``spec``.

        Args:
            spec: the architecture.
            module: a module of that spec (any device, ``meta`` included) to read the
                parameter names from; default a fresh ``meta`` one.
        """
        if module is None:
            module = _meta_module(spec, None, cls.module_class)
        out = {}
        for name in module.state_dict():
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
        config: Mapping[str, Any] | None = None,
        check_weights: bool = True,
    ) -> NativeModel:
        """Load a checkpoint folder in the Hugging Face layout.

        ``config.json`` is validated first
        ([`spec_from_config`][dlm_decode.models.native.NativeModel.spec_from_config]), then
        the weight headers, all before a weight is read.

        Args:
            path: folder with ``config.json`` and ``model.safetensors`` (or shards with
                ``model.safetensors.index.json``), optionally tokenizer files.
            device: where the weights go (loaded there directly, tensor by tensor).
            dtype: weight dtype or its name; default: ``torch_dtype`` of the config, else
                float32 on CPU and bfloat16 elsewhere.
            config: the folder's ``config.json`` when the caller has read it already.
            check_weights: check that no weight holds NaN or inf (one reduction per
                tensor, see [`check_finite`][dlm_decode.models.checkpoint.check_finite]);
                ``False`` skips it.

        Returns:
            The model, parameters frozen, tokenizer attached when the folder has one.

        Raises:
            FileNotFoundError: no config or weights in the folder.
            CheckpointError: an invalid ``config.json`` (a
                [`ConfigError`][dlm_decode.models.checkpoint.ConfigError]), a truncated or
                corrupt weight file, missing, unexpected or wrong-shaped weights (names
                listed), or NaN/inf weights.
        """
        folder = Path(path)
        config = dict(config) if config is not None else read_config(folder)
        spec = cls.spec_from_config(config)
        device = torch.device(device)
        dtype = resolve_dtype(dtype, config, device)
        module = _meta_module(spec, dtype, cls.module_class)  # the one module of this load
        names = cls.weight_name_map(spec, module)
        shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        tensors = read_weights(
            folder,
            {names[k]: shapes[k] for k in names},
            device,
            dtype,
            what=f"the {cls.name} architecture",
            check_weights=check_weights,
        )
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
            dtype: weight dtype (as in
                [`from_pretrained`][dlm_decode.models.native.NativeModel.from_pretrained]).
            seed: seed of the device generator.
            norm_noise: standard deviation of noise added to norm weights (tests use it so
                that a loader which drops norm weights is caught).

        Returns:
            The model, parameters frozen. On the ``meta`` device nothing is allocated or
            initialised (shapes only).
        """
        spec = cls.spec_from_config(config)
        device = torch.device(device)
        dtype = resolve_dtype(dtype, config, device)
        module = _meta_module(spec, dtype, cls.module_class)
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
        """The weights under their checkpoint names (what
        [`from_pretrained`][dlm_decode.models.native.NativeModel.from_pretrained] reads)."""
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
        if isinstance(mask, bool) or not isinstance(mask, int) or not 0 <= mask < v:
            raise ConfigError(
                f"{type(self).__name__}: mask_token_id={mask!r} is not a token id in "
                f"[0, {v}); set mask_token_id in config.json to the mask token's id"
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
        if isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < v:
            raise ConfigError(
                f"{type(self).__name__}: pad_token_id={pad!r} is not a token id in "
                f"[0, {v}); set pad_token_id in config.json"
            )
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

    def forward(self, ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """See [`Model.forward`][dlm_decode.interfaces.Model.forward] (implemented by
        [`Transformer.forward`][dlm_decode.models.transformer.Transformer.forward])."""
        return self.module(ids, **kwargs)

    def __repr__(self) -> str:
        s = self.spec
        return (
            f"{type(self).__name__}(layers={s.n_layers}, d_model={s.d_model}, "
            f"heads={s.n_heads}/{s.n_kv_heads}, vocab={s.vocab_size}, dtype={self.dtype}, "
            f"device={self.device})"
        )


def _meta_module(
    spec: ArchSpec,
    dtype: torch.dtype | None = None,
    module_class: Callable[..., nn.Module] = Transformer,
) -> Transformer:
    """A [`Transformer`][dlm_decode.models.transformer.Transformer] (or ``module_class``)
    of ``spec`` on the ``meta`` device (shapes, no storage)."""
    with torch.device("meta"):
        return module_class(spec, dtype)
