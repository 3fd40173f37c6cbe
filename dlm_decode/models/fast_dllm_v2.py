"""Fast-dLLM v2: the native Fast-dLLM v2 architecture (``model_type: Fast_dLLM_Qwen``).

NVlabs' block-diffusion adaptation of Qwen2.5-7B-Instruct: Qwen2-shaped blocks (q/k/v
biases, grouped-query attention, RoPE θ = 10⁶, RMSNorm, SwiGLU) with **block-causal**
attention over blocks of ``bd_size`` positions (32), bidirectional inside a block. The
model keeps the autoregressive alignment of its Qwen2.5 initialisation: the logit for
position ``i`` comes from output row ``i − 1`` (``logits_shift = 1``), so the first
position of an attention block is predicted by the last row of the block before it.
Loads ``Efficient-Large-Model/Fast_dLLM_v2_7B`` as published (``model.layers.*`` weights,
``lm_head.weight``; the mask token ``|<MASK>|`` = 151665, which the released
``config.json`` does not name).

Decoding as NVlabs' ``batch_sample`` does (the models guide has the details):
``block_length`` 8 on this model's attention block of 32 gives its sub-blocks, and
``block_head_greedy`` ([`FastDLLMv2Model`][dlm_decode.models.fast_dllm_v2.FastDLLMv2Model])
commits the first position of each new attention block greedily from the finished block's
last logit, in the forward that writes that block's K/V.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from dlm_decode.models.dream import QwenNativeModel, qwen2_spec
from dlm_decode.models.native import (
    config_int,
)
from dlm_decode.models.transformer import ArchSpec

__all__ = ["FAST_DLLM_V2_BLOCK_CONFIG", "FAST_DLLM_V2_MASK_ID", "FastDLLMv2Model"]

#: The released model's mask token id (``|<MASK>|``, an added token of its tokenizer;
#: ``batch_sample``'s default ``mask_id``).
FAST_DLLM_V2_MASK_ID = 151665
#: The mask token's text in the released tokenizer.
FAST_DLLM_V2_MASK_TOKEN = "|<MASK>|"

#: The block-level keys of a Fast-dLLM v2 ``config.json`` the native model supports, with
#: Fast_dLLM_v2_7B's values: shared by the ``fast-dllm-v2-7b`` and ``fast-dllm-v2-tiny``
#: presets.
FAST_DLLM_V2_BLOCK_CONFIG: dict[str, Any] = {
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "rope_scaling": None,
    "use_sliding_window": False,
    "bd_size": 32,
}

#: Qwen2 layout: the Qwen3 names without the per-head q/k norms.


class FastDLLMv2Model(QwenNativeModel):
    """Native Fast-dLLM v2 (block-causal Qwen2.5-style mask predictor, shifted logits).

    ``attention`` is block-causal with the config's ``bd_size``. Decode with
    ``block_length`` 8 (NVlabs' sub-blocks; any divisor or multiple of ``bd_size`` works)
    and the ``block`` cache for exact reuse of finished blocks. The mask id is the
    config's ``mask_token_id`` when set, else the tokenizer's ``|<MASK>|``, else 151665.
    EOS ids are the config's ``eos_token_id`` (151645, ``<|im_end|>``) plus the
    tokenizer's EOS and ``<|im_end|>``. The tokenizer config names transformers'
    ``Qwen2Tokenizer``, loaded with no remote code.

    Attributes:
        block_head_greedy: ``True``: when a block of the Decoder starts an attention block
            whose first position is still masked (every generated block but a first one
            that holds the prompt's end), the Decoder commits that position to the argmax
            of the previous attention block's last logit before the commit policy runs,
            in one forward of its own (the ``block`` cache fuses it with the write of the
            finished block's K/V), exactly as ``batch_sample`` does with the logits of its
            ``update_past_key_values`` forward.
    """

    name: ClassVar[str] = "fast_dllm_v2"
    config_model_types: ClassVar[tuple[str, ...]] = ("Fast_dLLM_Qwen", "fast_dllm_v2")
    logits_shift = 1
    preferred_cache: ClassVar[str | None] = "block"
    block_head_greedy: ClassVar[bool] = True

    #: ``fast-dllm-v2-7b``: the released Fast_dLLM_v2_7B shape (random weights for the GPU
    #: bench); ``fast-dllm-v2-tiny``: a tiny random model for tests (the released
    #: ``bd_size`` 32).
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "fast-dllm-v2-7b": {
            "model_type": "Fast_dLLM_Qwen",
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "num_hidden_layers": 28,
            "vocab_size": 152064,
            "max_position_embeddings": 32768,
            "mask_token_id": FAST_DLLM_V2_MASK_ID,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "pad_token_id": 151645,
            **FAST_DLLM_V2_BLOCK_CONFIG,
            "torch_dtype": "bfloat16",
        },
        "fast-dllm-v2-tiny": {
            "model_type": "Fast_dLLM_Qwen",
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
            **FAST_DLLM_V2_BLOCK_CONFIG,
        },
    }

    @classmethod
    def spec_from_config(cls, config: Mapping[str, Any]) -> ArchSpec:
        """Read Fast-dLLM v2's Qwen2-style ``config.json``.

        Sizes as for Dream (``hidden_size``, ``num_attention_heads``,
        ``num_key_value_heads``, ``num_hidden_layers``, ``intermediate_size``,
        ``vocab_size``, ``max_position_embeddings``), plus the block-causal attention's
        ``bd_size`` (default 32, the released value and the reference configuration's
        default).

        Raises:
            ConfigError: a missing or ill-typed size, a value out of range, or sizes that
                do not fit together (one line naming the key, the value and the fix).
            ValueError: RoPE scaling, sliding-window attention or an activation other
                than SiLU is requested (not implemented).
        """
        arch = "Fast-dLLM v2"
        return qwen2_spec(
            config,
            arch,
            max_length_default=32768,
            block_size=config_int(config, "bd_size", arch, default=32),
        )

    def _set_special_ids(self) -> None:
        """The released ``config.json`` names no mask id: take the tokenizer's
        ``|<MASK>|``, else 151665 (then the usual checks)."""
        if self.config.get("mask_token_id") is None:
            tid = self._token_id(FAST_DLLM_V2_MASK_TOKEN)
            self.config["mask_token_id"] = FAST_DLLM_V2_MASK_ID if tid is None else tid
        super()._set_special_ids()
