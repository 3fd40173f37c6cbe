"""Tiny random checkpoints in the exact Hugging Face layout, for tests across the project.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from dlm_decode.models import load_model
    >>> from dlm_decode.models.testing import write_random_checkpoint
    >>> folder = write_random_checkpoint(Path(tempfile.mkdtemp()) / "dream", "dream", shards=2)
    >>> model = load_model(folder, dtype=torch.float64)
    >>> type(model).__name__, model.logits_shift, model.dtype
    ('DreamModel', 1, torch.float64)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dlm_decode.models.loading import find_model_class, preset_config

__all__ = ["TOKENIZER_FILES", "tiny_config", "write_char_tokenizer", "write_random_checkpoint"]

#: Files copied when ``tokenizer`` is a folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)

# Architecture-neutral dimension names → each architecture's config.json keys.
_ALIASES: dict[str, dict[str, tuple[str, ...]]] = {
    "llada": {
        "vocab_size": ("vocab_size", "embedding_size"),
        "d_model": ("d_model",),
        "n_layers": ("n_layers",),
        "n_heads": ("n_heads",),
        "n_kv_heads": ("n_kv_heads",),
        "d_ff": ("mlp_hidden_size",),
        "max_length": ("max_sequence_length",),
    },
    "dream": {
        "vocab_size": ("vocab_size",),
        "d_model": ("hidden_size",),
        "n_layers": ("num_hidden_layers",),
        "n_heads": ("num_attention_heads",),
        "n_kv_heads": ("num_key_value_heads",),
        "d_ff": ("intermediate_size",),
        "max_length": ("max_position_embeddings",),
    },
    "sdar": {
        "vocab_size": ("vocab_size",),
        "d_model": ("hidden_size",),
        "n_layers": ("num_hidden_layers",),
        "n_heads": ("num_attention_heads",),
        "n_kv_heads": ("num_key_value_heads",),
        "head_dim": ("head_dim",),
        "d_ff": ("intermediate_size",),
        "max_length": ("max_position_embeddings",),
        "block_size": ("block_size",),
    },
    "fast_dllm_v2": {
        "vocab_size": ("vocab_size",),
        "d_model": ("hidden_size",),
        "n_layers": ("num_hidden_layers",),
        "n_heads": ("num_attention_heads",),
        "n_kv_heads": ("num_key_value_heads",),
        "d_ff": ("intermediate_size",),
        "max_length": ("max_position_embeddings",),
        "block_size": ("bd_size",),
    },
    "llada2_moe": {
        "vocab_size": ("vocab_size",),
        "d_model": ("hidden_size",),
        "n_layers": ("num_hidden_layers",),
        "n_heads": ("num_attention_heads",),
        "n_kv_heads": ("num_key_value_heads",),
        "head_dim": ("head_dim",),
        "d_ff": ("intermediate_size",),
        "max_length": ("max_position_embeddings",),
        "block_size": ("block_size",),
    },
}
#: The full-size preset of each architecture, whose keys ``tiny_config`` also accepts.
_FULL_PRESETS = {
    "llada": "llada-8b",
    "dream": "dream-7b",
    "sdar": "sdar-4b",
    "fast_dllm_v2": "fast-dllm-v2-7b",
    "llada2_moe": "llada2-mini",
}
#: Tiny presets whose name is not ``f"{arch}-tiny"``.
_TINY_PRESETS = {"fast_dllm_v2": "fast-dllm-v2-tiny", "llada2_moe": "llada2-tiny"}
_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float64: "float64",
}


def tiny_config(arch: str = "llada", **dims: Any) -> dict[str, Any]:
    """A tiny ``config.json`` dict for ``arch`` with the real key names.

    Defaults: vocabulary 128 (mask id 127, EOS = pad = 1), ``d_model`` 32, 2 layers, 4 heads
    (Dream, SDAR, Fast-dLLM v2: 2 key/value heads), MLP 64, max length 512; SDAR: head
    dim 16 and block size 4; Fast-dLLM v2: ``bd_size`` 32.

    Args:
        arch: ``"llada"``, ``"dream"``, ``"sdar"``, ``"fast_dllm_v2"`` or ``"llada2_moe"``
            (the ``llada2-tiny`` preset: 3 layers, 8 experts, block size 4).
        **dims: overrides, either architecture-neutral (``vocab_size``, ``d_model``,
            ``n_layers``, ``n_heads``, ``n_kv_heads``, ``d_ff``, ``max_length``; SDAR also
            ``head_dim`` and ``block_size``; Fast-dLLM v2 ``block_size``, its
            ``bd_size``) or any
            key of the architecture's ``config.json`` (``rope_theta``, ``mask_token_id``,
            ``num_hidden_layers``, …). Changing ``vocab_size`` moves the default mask id
            to ``vocab_size - 1`` unless ``mask_token_id`` is given.

    Raises:
        ValueError: unknown architecture or key.
    """
    if arch not in _ALIASES:
        raise ValueError(f"unknown arch {arch!r}; use one of {', '.join(sorted(_ALIASES))}")
    config = preset_config(_TINY_PRESETS.get(arch, f"{arch}-tiny"))
    aliases = _ALIASES[arch]
    if "vocab_size" in dims and "mask_token_id" not in dims:
        dims["mask_token_id"] = int(dims["vocab_size"]) - 1
    for key, value in dims.items():
        if key in aliases:
            for real in aliases[key]:
                config[real] = value
        elif key in config or key in _known_keys(arch):
            config[key] = value
        else:
            raise ValueError(
                f"unknown {arch} config key {key!r}; use one of "
                f"{', '.join(sorted({*aliases, *config}))}"
            )
    return config


def _known_keys(arch: str) -> set[str]:
    return set(preset_config(_FULL_PRESETS[arch]))


def _save_tokenizer(tokenizer: Any, folder: Path) -> None:
    if tokenizer is None:
        return
    if isinstance(tokenizer, (str, Path)):
        src = Path(tokenizer)
        copied = [f for f in TOKENIZER_FILES if (src / f).is_file()]
        if not copied:
            raise FileNotFoundError(f"no tokenizer files in {src}")
        for name in copied:
            shutil.copyfile(src / name, folder / name)
        return
    tokenizer.save_pretrained(str(folder))


def write_random_checkpoint(
    path: str | Path,
    arch: str = "llada",
    *,
    seed: int = 0,
    shards: int = 1,
    dtype: torch.dtype = torch.float32,
    tokenizer: Any = None,
    **dims: Any,
) -> Path:
    """Write a tiny random checkpoint folder in exactly the Hugging Face layout.

    ``config.json`` uses the architecture's real key names (with ``torch_dtype`` set to
    ``dtype``); weights use the real checkpoint names, in ``model.safetensors`` or, when
    ``shards > 1``, in ``model-0000i-of-0000n.safetensors`` files with a
    ``model.safetensors.index.json``. Norm weights are ``1 + N(0, 0.1²)`` so that every
    weight matters.

    Args:
        path: folder to create (may exist).
        arch: ``"llada"``, ``"dream"``, ``"sdar"``, ``"fast_dllm_v2"`` or ``"llada2_moe"``
            (the ``llada2-tiny`` preset: 3 layers, 8 experts, block size 4).
        seed: seed of the weights.
        shards: number of safetensors files.
        dtype: dtype the weights are stored in.
        tokenizer: ``None``; a folder whose tokenizer files are copied; or a transformers
            tokenizer (saved with ``save_pretrained``).
        **dims: config overrides (see [`tiny_config`][dlm_decode.models.testing.tiny_config]).

    Returns:
        The folder.
    """
    config = tiny_config(arch, **dims)
    config["torch_dtype"] = _DTYPE_NAMES[dtype]
    cls = find_model_class(config["model_type"])
    model = cls.from_config(config, dtype=dtype, seed=seed, norm_noise=0.1)  # type: ignore[attr-defined]
    weights = {k: v.contiguous() for k, v in model.checkpoint_state_dict().items()}
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    names = sorted(weights)
    if shards <= 1:
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        shards = min(shards, len(names))
        weight_map: dict[str, str] = {}
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = names[i::shards]
            save_file({n: weights[n] for n in part}, str(folder / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file))
        total = sum(t.numel() * t.element_size() for t in weights.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(folder / "model.safetensors.index.json", "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
    _save_tokenizer(tokenizer, folder)
    return folder


def write_char_tokenizer(folder: str | Path) -> Path:
    """Save a character-level tokenizer that fits
    [`tiny_config`][dlm_decode.models.testing.tiny_config]'s LLaDA ids.

    Printable ASCII and newline, one token per character, decoding concatenates; EOS/pad id
    1 (``<|endoftext|>``) and mask id 127 (``<|mdm_mask|>``), the ids of a default tiny
    LLaDA checkpoint. Tests use it to decode text with random checkpoints.

    Args:
        folder: a checkpoint folder (written into in place).

    Returns:
        ``folder``.
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<|endoftext|>": 1}
    for ch in "\n" + "".join(map(chr, range(32, 127))):
        vocab[ch] = len(vocab)
    while len(vocab) < 127:
        vocab[f"<unused{len(vocab)}>"] = len(vocab)
    vocab["<|mdm_mask|>"] = 127
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    raw.decoder = decoders.Fuse()
    raw.add_special_tokens(["<unk>", "<|endoftext|>", "<|mdm_mask|>"])
    PreTrainedTokenizerFast(
        tokenizer_object=raw,
        unk_token="<unk>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        mask_token="<|mdm_mask|>",
        clean_up_tokenization_spaces=False,
    ).save_pretrained(str(folder))
    return Path(folder)
