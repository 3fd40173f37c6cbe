"""SDAR: the native SDAR architecture (``model_type: sdar``), a block-diffusion model.

Qwen3-shaped blocks (grouped-query attention, a per-head RMSNorm of queries and keys before
RoPE, ``head_dim`` set apart from ``hidden_size / num_attention_heads``, no q/k/v biases,
RMSNorm, SwiGLU) with **block-causal** attention: bidirectional inside blocks of
``block_size`` positions (4 for SDAR-4B/8B-Chat), causal across them. The logits are not
shifted: output row ``i`` predicts position ``i``. Loads ``JetLM/SDAR-4B-Chat`` /
``-8B-Chat`` as published (``model.layers.*`` weights, ``lm_head.weight``, mask token
``<|MASK|>`` = 151669).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from dlm_decode.models.checkpoint import ConfigError
from dlm_decode.models.dream import QWEN2_LAYER_NAMES, QwenNativeModel
from dlm_decode.models.native import (
    check_token_ids,
    config_int,
    config_number,
)
from dlm_decode.models.transformer import ArchSpec

__all__ = ["QWEN_LAYER_NAMES", "SDAR_BLOCK_CONFIG", "SDARModel", "qwen_head_layout"]

#: The block-level keys of an SDAR ``config.json`` the native model supports, with
#: SDAR-4B-Chat's values: shared by the ``sdar-4b``, ``sdar-8b`` and ``sdar-tiny`` presets.
SDAR_BLOCK_CONFIG: dict[str, Any] = {
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06,
    "hidden_act": "silu",
    "attention_bias": False,
    "tie_word_embeddings": False,
    "rope_scaling": None,
    "use_sliding_window": False,
}

#: Checkpoint names of a block's submodules in the Qwen3 layout: Qwen2's plus the
#: per-head q/k norms.
QWEN_LAYER_NAMES: dict[str, str] = {
    **QWEN2_LAYER_NAMES,
    "attn.q_norm": "self_attn.q_norm",
    "attn.k_norm": "self_attn.k_norm",
}


def qwen_head_layout(config: Mapping[str, Any], arch: str) -> tuple[int, int, int, int]:
    """``(hidden, heads, kv_heads, head_dim)`` of a Qwen-style ``config.json``.

    ``head_dim`` defaults to ``hidden_size / num_attention_heads`` (which must then
    divide); the heads must be a multiple of the key/value heads and the head dim even.

    Raises:
        ConfigError: a missing or ill-typed size, or sizes that do not fit together.
    """
    hidden = config_int(config, "hidden_size", arch)
    n_heads = config_int(config, "num_attention_heads", arch)
    n_kv = config_int(config, "num_key_value_heads", arch, default=n_heads)
    head_dim = config_int(config, "head_dim", arch, default=None)
    if head_dim is None:
        if hidden % n_heads:
            raise ConfigError(
                f"{arch} config.json: hidden_size={hidden} is not divisible by "
                f"num_attention_heads={n_heads} and no head_dim is set; set head_dim in "
                f"config.json"
            )
        head_dim = hidden // n_heads
    if n_heads % n_kv:
        raise ConfigError(
            f"{arch} config.json: num_attention_heads={n_heads} is not a multiple of "
            f"num_key_value_heads={n_kv}; set num_key_value_heads to a divisor of "
            f"num_attention_heads in config.json"
        )
    if head_dim % 2:
        raise ConfigError(
            f"{arch} config.json: head dim {head_dim} is odd and RoPE needs it even; fix "
            f"head_dim (or hidden_size / num_attention_heads) in config.json"
        )
    return hidden, n_heads, n_kv, head_dim


class SDARModel(QwenNativeModel):
    """Native SDAR (block-causal Qwen3-style mask predictor, unshifted logits).

    ``attention`` is block-causal with the config's ``block_size``; decode with a
    ``block_length`` that is a multiple of it, and the ``block`` cache for exact reuse of
    finished blocks. EOS ids are the config's ``eos_token_id`` (151643,
    ``<|endoftext|>``) plus the tokenizer's ``<|im_end|>`` when it has one; without a
    tokenizer a config EOS of 151643 adds ``<|im_end|>`` = 151645 (the generation config's
    second EOS). The tokenizer config names transformers' ``Qwen2Tokenizer``, loaded with
    no remote code.
    """

    name: ClassVar[str] = "sdar"
    config_model_types: ClassVar[tuple[str, ...]] = ("sdar",)
    logits_shift = 0
    preferred_cache: ClassVar[str | None] = "block"

    layer_names: ClassVar[Mapping[str, str]] = QWEN_LAYER_NAMES
    #: ``sdar-4b`` / ``sdar-8b``: the released SDAR-4B/8B-Chat shapes (random weights for the
    #: GPU bench); ``sdar-tiny``: a tiny random model for tests (``head_dim`` 16, not
    #: ``hidden / heads`` = 8, as in Qwen3).
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "sdar-4b": {
            "model_type": "sdar",
            "hidden_size": 2560,
            "intermediate_size": 9728,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "num_hidden_layers": 36,
            "vocab_size": 151936,
            "max_position_embeddings": 32768,
            "block_size": 4,
            "mask_token_id": 151669,
            "bos_token_id": 151643,
            "eos_token_id": 151643,
            "pad_token_id": 151643,
            **SDAR_BLOCK_CONFIG,
            "torch_dtype": "bfloat16",
        },
        "sdar-8b": {
            "model_type": "sdar",
            "hidden_size": 4096,
            "intermediate_size": 12288,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "num_hidden_layers": 36,
            "vocab_size": 151936,
            "max_position_embeddings": 32768,
            "block_size": 4,
            "mask_token_id": 151669,
            "bos_token_id": 151643,
            "eos_token_id": 151643,
            "pad_token_id": 151643,
            **SDAR_BLOCK_CONFIG,
            "torch_dtype": "bfloat16",
        },
        "sdar-tiny": {
            "model_type": "sdar",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "num_hidden_layers": 2,
            "vocab_size": 128,
            "max_position_embeddings": 512,
            "block_size": 4,
            "mask_token_id": 127,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
            **SDAR_BLOCK_CONFIG,
        },
    }

    @classmethod
    def spec_from_config(cls, config: Mapping[str, Any]) -> ArchSpec:
        """Read SDAR's Qwen3-style ``config.json``.

        Sizes as for Dream (``hidden_size``, ``num_attention_heads``,
        ``num_key_value_heads``, ``num_hidden_layers``, ``intermediate_size``,
        ``vocab_size``, ``max_position_embeddings``), plus ``head_dim`` (default
        ``hidden_size / num_attention_heads``) and the required ``block_size`` of the
        block-causal attention.

        Raises:
            ConfigError: a required key is missing, a value has the wrong type or is out
                of range, or sizes do not fit together (one line naming the key, the value
                and the fix).
            ValueError: RoPE scaling, sliding-window attention, attention biases or an
                activation other than SiLU is requested (not implemented).
        """
        arch = "SDAR"
        if config.get("rope_scaling"):
            raise ValueError(f"{arch}: rope_scaling={config['rope_scaling']!r} is unsupported")
        if config.get("use_sliding_window"):
            raise ValueError(f"{arch}: use_sliding_window=true is unsupported")
        if config.get("attention_bias"):
            raise ValueError(f"{arch}: attention_bias=true is unsupported")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{arch}: hidden_act={config['hidden_act']!r} is unsupported")
        hidden, n_heads, n_kv, head_dim = qwen_head_layout(config, arch)
        vocab = config_int(config, "vocab_size", arch)
        check_token_ids(config, arch, vocab, "vocab_size")
        return ArchSpec(
            d_model=hidden,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            n_layers=config_int(config, "num_hidden_layers", arch),
            d_ff=config_int(config, "intermediate_size", arch),
            vocab_size=vocab,
            max_length=config_int(config, "max_position_embeddings", arch, default=32768),
            rope_theta=config_number(config, "rope_theta", arch, 1e6),
            rms_norm_eps=config_number(config, "rms_norm_eps", arch, 1e-6),
            qkv_bias=False,
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            rope_full_precision=False,
            qk_norm=True,
            explicit_head_dim=head_dim,
            block_size=config_int(config, "block_size", arch),
        )
