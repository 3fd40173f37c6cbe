"""[`NativeModel`][dlm_decode.models.native.NativeModel]: the
[`Model`][dlm_decode.interfaces.Model] plugin over the native
[`Transformer`][dlm_decode.models.transformer.Transformer].

It maps weight names between the internal layout and a checkpoint family's, loads
checkpoints, builds random weights on a device and fills in the special token ids.
Architectures (``llada``, ``dream``) subclass it with their name tables, ``config.json``
reader and presets.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from dlm_decode.interfaces import KVBuffer, Model
from dlm_decode.models.checkpoint import load_tokenizer, read_config, read_weights, resolve_dtype
from dlm_decode.models.transformer import ArchSpec, Transformer

__all__ = ["NativeModel", "require_key"]


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
        """Read the [`ArchSpec`][dlm_decode.models.transformer.ArchSpec] from a
        ``config.json`` dict.

        Raises:
            ValueError: a required key is missing or a feature is unsupported.
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
            module = _meta_module(spec)
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
    ) -> NativeModel:
        """Load a checkpoint folder in the Hugging Face layout.

        Args:
            path: folder with ``config.json`` and ``model.safetensors`` (or shards with
                ``model.safetensors.index.json``), optionally tokenizer files.
            device: where the weights go (loaded there directly, tensor by tensor).
            dtype: weight dtype or its name; default: ``torch_dtype`` of the config, else
                float32 on CPU and bfloat16 elsewhere.
            config: the folder's ``config.json`` when the caller has read it already.

        Returns:
            The model, parameters frozen, tokenizer attached when the folder has one.

        Raises:
            FileNotFoundError: no config or weights in the folder.
            ValueError: missing, unexpected or wrong-shaped weights (names listed).
        """
        folder = Path(path)
        config = dict(config) if config is not None else read_config(folder)
        spec = cls.spec_from_config(config)
        device = torch.device(device)
        dtype = resolve_dtype(dtype, config, device)
        module = _meta_module(spec, dtype)  # the one module of this load
        names = cls.weight_name_map(spec, module)
        shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        tensors = read_weights(
            folder,
            {names[k]: shapes[k] for k in names},
            device,
            dtype,
            what=f"the {cls.name} architecture",
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
        module = _meta_module(spec, dtype)
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


def _meta_module(spec: ArchSpec, dtype: torch.dtype | None = None) -> Transformer:
    """A [`Transformer`][dlm_decode.models.transformer.Transformer] of ``spec`` on the
    ``meta`` device (shapes, no storage)."""
    with torch.device("meta"):
        return Transformer(spec, dtype)
