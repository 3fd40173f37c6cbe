"""LLaDA: the native LLaDA architecture (``model_type: llada``).

Llama-like blocks with bidirectional attention, RMSNorm, SwiGLU (``ff_proj`` = gate,
``up_proj`` = up, ``ff_out`` = down), RoPE in full precision, no biases, an untied output
head. Loads the Hugging Face checkpoint ``GSAI-ML/LLaDA-8B-Instruct`` (and ``-Base``) as
published: ``config.json`` in the OLMo naming (``d_model``, ``n_heads``, ``n_kv_heads``,
``n_layers``, ``mlp_hidden_size``, ``embedding_size``, …) and weights named
``model.transformer.*``. The shipped tiny model uses this same class.
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

__all__ = ["LLADA_BLOCK_CONFIG", "LLaDAModel"]

#: The block-level keys of a LLaDA ``config.json`` that the native model supports, with
#: LLaDA-8B's values except ``rope_theta`` (8B uses 500000; 10000 suits short contexts):
#: the base of the ``llada-8b`` / ``llada-tiny`` presets and the shipped tiny model's config.
LLADA_BLOCK_CONFIG: dict[str, Any] = {
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "weight_tying": False,
    "include_qkv_bias": False,
    "block_type": "llama",
    "layer_norm_type": "rms",
    "activation_type": "silu",
    "rope": True,
    "rope_full_precision": True,
}


class LLaDAModel(NativeModel):
    """Native LLaDA (bidirectional Llama-style mask predictor).

    EOS ids are the config's ``eos_token_id`` (126081, ``<|endoftext|>``) plus the
    tokenizer's ``<|eot_id|>`` when it has one. Without a tokenizer, a config EOS of 126081
    (the released LLaDA vocabulary) adds ``<|eot_id|>`` = 126348 as a documented fallback.
    The logits width is ``embedding_size`` (the embedding rows), which may exceed
    ``vocab_size``.
    """

    name: ClassVar[str] = "llada"
    config_model_types: ClassVar[tuple[str, ...]] = ("llada",)
    logits_shift = 0

    global_names: ClassVar[Mapping[str, str]] = {
        "embed": "model.transformer.wte",
        "norm": "model.transformer.ln_f",
        "head": "model.transformer.ff_out",
    }
    layer_prefix: ClassVar[str] = "model.transformer.blocks.{i}."
    layer_names: ClassVar[Mapping[str, str]] = {
        "attn_norm": "attn_norm",
        "attn.q": "q_proj",
        "attn.k": "k_proj",
        "attn.v": "v_proj",
        "attn.o": "attn_out",
        "mlp_norm": "ff_norm",
        "mlp.gate": "ff_proj",
        "mlp.up": "up_proj",
        "mlp.down": "ff_out",
    }
    end_of_turn_tokens: ClassVar[tuple[str, ...]] = ("<|eot_id|>",)
    known_end_of_turn_ids: ClassVar[Mapping[int, int]] = {126081: 126348}
    #: ``llada-8b``: the released LLaDA-8B shape (random weights for the GPU bench);
    #: ``llada-tiny``: a tiny random model for tests.
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "llada-8b": {
            "model_type": "llada",
            "d_model": 4096,
            "n_heads": 32,
            "n_kv_heads": 32,
            "n_layers": 32,
            "mlp_hidden_size": 12288,
            "mlp_ratio": 4,
            "vocab_size": 126464,
            "embedding_size": 126464,
            "max_sequence_length": 4096,
            "mask_token_id": 126336,
            "eos_token_id": 126081,
            "pad_token_id": 126081,
            **LLADA_BLOCK_CONFIG,
            "rope_theta": 500000.0,
            "include_bias": False,
            "alibi": False,
        },
        "llada-tiny": {
            "model_type": "llada",
            "d_model": 32,
            "n_heads": 4,
            "n_kv_heads": 4,
            "n_layers": 2,
            "mlp_hidden_size": 64,
            "vocab_size": 128,
            "embedding_size": 128,
            "max_sequence_length": 512,
            "mask_token_id": 127,
            "eos_token_id": 1,
            "pad_token_id": 1,
            **LLADA_BLOCK_CONFIG,
        },
    }

    @classmethod
    def spec_from_config(cls, config: Mapping[str, Any]) -> ArchSpec:
        """Read LLaDA's OLMo-style ``config.json``.

        Every size is checked to be a positive integer (``d_model``, ``n_heads``,
        ``n_kv_heads``, ``n_layers``, ``mlp_hidden_size``, ``vocab_size`` /
        ``embedding_size``, ``max_sequence_length``), ``d_model`` to divide by ``n_heads``
        into an even head dim and ``n_heads`` by ``n_kv_heads``, and the special token ids
        to lie in ``[0, embedding_size)``.

        Raises:
            ConfigError: a required key is missing, a value has the wrong type or is out
                of range, or sizes do not fit together (one line naming the key, the value
                and the fix).
            ValueError: the config asks for a feature this implementation does not have
                (ALiBi, no RoPE, non-Llama blocks, LayerNorm, QK norm, biases outside
                q/k/v, logit scaling).
        """
        arch = "LLaDA"
        unsupported = {
            "alibi": bool(config.get("alibi", False)),
            "rope": not config.get("rope", True),
            "block_type": config.get("block_type", "llama") != "llama",
            "layer_norm_type": config.get("layer_norm_type", "rms") != "rms",
            "attention_layer_norm": bool(config.get("attention_layer_norm", False)),
            "include_bias": bool(config.get("include_bias", False)),
            "input_emb_norm": bool(config.get("input_emb_norm", False)),
            "scale_logits": bool(config.get("scale_logits", False)),
            "activation_type": config.get("activation_type", "silu") not in ("silu", "swiglu"),
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(
                f"{arch} config.json sets unsupported options: "
                + ", ".join(f"{k}={config.get(k)!r}" for k in bad)
            )
        d_model = config_int(config, "d_model", arch)
        n_heads = config_int(config, "n_heads", arch)
        kv_key = "n_kv_heads"
        n_kv = config_int(config, kv_key, arch, default=n_heads)
        if config.get("multi_query_attention"):
            kv_key, n_kv = "multi_query_attention", 1
        check_head_layout(arch, ("d_model", d_model), ("n_heads", n_heads), (kv_key, n_kv))
        d_ff = config_int(config, "mlp_hidden_size", arch, default=None)
        if d_ff is None:
            d_ff = config_int(config, "mlp_ratio", arch, default=4) * d_model
        # the logits width is the embedding rows (may exceed vocab_size); either key will do
        config_int(config, "vocab_size", arch, default=None)
        vocab_key = "embedding_size" if config.get("embedding_size") is not None else "vocab_size"
        vocab = config_int(config, vocab_key, arch)
        check_token_ids(config, arch, vocab, vocab_key)
        return ArchSpec(
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            n_layers=config_int(config, "n_layers", arch),
            d_ff=d_ff,
            vocab_size=vocab,
            max_length=config_int(config, "max_sequence_length", arch, default=4096),
            rope_theta=config_number(config, "rope_theta", arch, 10000.0),
            rms_norm_eps=config_number(config, "rms_norm_eps", arch, 1e-5),
            qkv_bias=bool(config.get("include_qkv_bias", False)),
            tie_embeddings=bool(config.get("weight_tying", False)),
            rope_full_precision=bool(config.get("rope_full_precision", True)),
        )
