"""Dream: the native Dream architecture (``model_type: Dream``).

Qwen2-shaped blocks (q/k/v biases, grouped-query attention, RoPE θ = 10⁶, RMSNorm, SwiGLU)
with **bidirectional** attention. Dream keeps the autoregressive alignment of its Qwen2
initialisation: the logit for position ``i`` comes from output row ``i − 1``
(``logits_shift = 1``). Loads ``Dream-org/Dream-v0-Instruct-7B`` / ``-Base-7B`` as published
(``model.layers.*`` weights, ``lm_head.weight``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from dlm_decode.models.native import (
    NativeModel,
    check_head_layout,
    check_token_ids,
    config_int,
    config_number,
)
from dlm_decode.models.transformer import ArchSpec

__all__ = [
    "DREAM_BLOCK_CONFIG",
    "QWEN2_LAYER_NAMES",
    "DreamModel",
    "QwenNativeModel",
    "qwen2_spec",
]

#: The block-level keys of a Dream ``config.json`` the native model supports, with
#: Dream-7B's values: shared by the ``dream-7b`` and ``dream-tiny`` presets.
DREAM_BLOCK_CONFIG: dict[str, Any] = {
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "rope_scaling": None,
    "use_sliding_window": False,
}


def qwen2_spec(
    config: Mapping[str, Any], arch: str, *, max_length_default: int, **extra: Any
) -> ArchSpec:
    """The [`ArchSpec`][dlm_decode.models.transformer.ArchSpec] of a Qwen2-layout
    ``config.json`` (QKV bias, SiLU, GQA): Dream's, and Fast-dLLM v2's with its block size.

    Args:
        config: the ``config.json`` dict.
        arch: the family's name in messages.
        max_length_default: ``max_position_embeddings`` when the config has none.
        **extra: further ``ArchSpec`` fields (``block_size``).

    Raises:
        ConfigError: a missing or ill-typed size, a token id out of range, or sizes that
            do not fit together (one line naming the key, the value and the fix).
        ValueError: RoPE scaling, sliding-window attention or an activation other than
            SiLU is requested (not implemented).
    """
    if config.get("rope_scaling"):
        raise ValueError(f"{arch}: rope_scaling={config['rope_scaling']!r} is unsupported")
    if config.get("use_sliding_window"):
        raise ValueError(f"{arch}: use_sliding_window=true is unsupported")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{arch}: hidden_act={config['hidden_act']!r} is unsupported")
    hidden = config_int(config, "hidden_size", arch)
    n_heads = config_int(config, "num_attention_heads", arch)
    n_kv = config_int(config, "num_key_value_heads", arch, default=n_heads)
    check_head_layout(
        arch,
        ("hidden_size", hidden),
        ("num_attention_heads", n_heads),
        ("num_key_value_heads", n_kv),
    )
    vocab = config_int(config, "vocab_size", arch)
    check_token_ids(config, arch, vocab, "vocab_size")
    return ArchSpec(
        d_model=hidden,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        n_layers=config_int(config, "num_hidden_layers", arch),
        d_ff=config_int(config, "intermediate_size", arch),
        vocab_size=vocab,
        max_length=config_int(config, "max_position_embeddings", arch, default=max_length_default),
        rope_theta=config_number(config, "rope_theta", arch, 1e6),
        rms_norm_eps=config_number(config, "rms_norm_eps", arch, 1e-6),
        qkv_bias=True,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_full_precision=False,
        **extra,
    )


#: Checkpoint names of a block's submodules in the Qwen2 layout (Dream, Fast-dLLM v2;
#: SDAR's Qwen3 layout adds the per-head q/k norms).
QWEN2_LAYER_NAMES: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "attn.q": "self_attn.q_proj",
    "attn.k": "self_attn.k_proj",
    "attn.v": "self_attn.v_proj",
    "attn.o": "self_attn.o_proj",
    "mlp_norm": "post_attention_layernorm",
    "mlp.gate": "mlp.gate_proj",
    "mlp.up": "mlp.up_proj",
    "mlp.down": "mlp.down_proj",
}


class QwenNativeModel(NativeModel):
    """The checkpoint layout the Qwen-based families share (Dream, SDAR, Fast-dLLM v2).

    HF names under ``model.layers.{i}.`` with ``QWEN2_LAYER_NAMES``, ``<|im_end|>`` as
    end of turn (151645 beside ``<|endoftext|>`` 151643) and transformers'
    ``Qwen2Tokenizer`` classes. Subclasses add the config reader and presets.
    """

    global_names: ClassVar[Mapping[str, str]] = {
        "embed": "model.embed_tokens",
        "norm": "model.norm",
        "head": "lm_head",
    }
    layer_prefix: ClassVar[str] = "model.layers.{i}."
    layer_names: ClassVar[Mapping[str, str]] = QWEN2_LAYER_NAMES
    end_of_turn_tokens: ClassVar[tuple[str, ...]] = ("<|im_end|>",)
    known_end_of_turn_ids: ClassVar[Mapping[int, int]] = {151643: 151645}
    tokenizer_fallbacks: ClassVar[tuple[str, ...]] = ("Qwen2TokenizerFast", "Qwen2Tokenizer")


class DreamModel(QwenNativeModel):
    """Native Dream (bidirectional Qwen2-style mask predictor with shifted logits).

    EOS ids are the config's ``eos_token_id`` (151643, ``<|endoftext|>``) plus the
    tokenizer's ``<|im_end|>`` (end of a chat turn) when it has one; without a tokenizer a
    config EOS of 151643 adds ``<|im_end|>`` = 151645. Dream's tokenizer config names a
    remote-code class (``DreamTokenizer``, a Qwen2 byte-level BPE); it is loaded with
    transformers' ``Qwen2Tokenizer`` classes instead, with no remote code.
    """

    name: ClassVar[str] = "dream"
    config_model_types: ClassVar[tuple[str, ...]] = ("Dream", "dream")
    logits_shift = 1

    #: ``dream-7b``: the released Dream-7B shape; ``dream-tiny``: a tiny random model.
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "dream-7b": {
            "model_type": "Dream",
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "num_hidden_layers": 28,
            "vocab_size": 152064,
            "max_position_embeddings": 131072,
            "mask_token_id": 151666,
            "bos_token_id": 151643,
            "eos_token_id": 151643,
            "pad_token_id": 151643,
            **DREAM_BLOCK_CONFIG,
            "torch_dtype": "bfloat16",
        },
        "dream-tiny": {
            "model_type": "Dream",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_hidden_layers": 2,
            "vocab_size": 128,
            "max_position_embeddings": 512,
            "mask_token_id": 127,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
            **DREAM_BLOCK_CONFIG,
        },
    }

    @classmethod
    def spec_from_config(cls, config: Mapping[str, Any]) -> ArchSpec:
        """Read Dream's Qwen2-style ``config.json``.

        Every size is checked to be a positive integer (``hidden_size``,
        ``num_attention_heads``, ``num_key_value_heads``, ``num_hidden_layers``,
        ``intermediate_size``, ``vocab_size``, ``max_position_embeddings``),
        ``hidden_size`` to divide by ``num_attention_heads`` into an even head dim and the
        heads by ``num_key_value_heads``, and the special token ids to lie in
        ``[0, vocab_size)``.

        Raises:
            ConfigError: a required key is missing, a value has the wrong type or is out
                of range, or sizes do not fit together (one line naming the key, the value
                and the fix).
            ValueError: RoPE scaling / sliding-window attention is requested (not
                implemented).
        """
        return qwen2_spec(config, "Dream", max_length_default=131072)
