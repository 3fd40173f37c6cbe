"""LLaDA-V: the native multimodal LLaDA (``model_type: llava_llada``).

A SigLIP vision tower (transformers'
[`SiglipVisionModel`](https://huggingface.co/docs/transformers/model_doc/siglip), its last
layer dropped: the features are the output of the second-to-last layer, before the final
LayerNorm), an ``mlp2x_gelu`` projector into the LLM's width, LLaVA's ``anyres`` tiling
with ``spatial_unpad`` merging and a learned image-newline embedding, and the LLaDA-8B
decoder under LLaMA-style weight names (``model.layers.{i}.self_attn.q_proj``, …,
``lm_head``).

An image prompt is a [`MultimodalPrompt`][dlm_decode.interfaces.MultimodalPrompt]: token
ids with [`IMAGE_PLACEHOLDER`][dlm_decode.interfaces.IMAGE_PLACEHOLDER] where each image
goes. [`embed_prompt`][dlm_decode.models.llada_v.LLaDAVModel.embed_prompt] turns a batch of
them into input embeddings once, before the first forward; the generated positions stay
token ids, so every cache and policy works unchanged.

The released checkpoint's ``config.json`` (with its ``mm_*`` keys) was not found anywhere
public: the config keys and weight names here are derived from the authors' LLaVA-style
code (``llava_arch.py``, ``siglip_encoder.py``, the projector builder) and their training
script (``siglip2-so400m-patch14-384``, select layer −2, ``mlp2x_gelu``, ``anyres_max_4``,
``spatial_unpad``, grid pinpoints ``(1x1),...,(6x6)``). The loader's errors list exactly
what it expected.

Like the authors' decode loops, the model never proposes ``<|endoftext|>``, BOS,
``<|start_header_id|>`` or ``<|end_header_id|>`` at a masked position (their logits are
pushed to the dtype's minimum there; config key ``suppress_token_ids``).
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from dlm_decode.interfaces import IMAGE_PLACEHOLDER, MultimodalPrompt, PromptEmbedding
from dlm_decode.models.checkpoint import (
    CheckpointError,
    ConfigError,
    load_tokenizer,
    read_config,
    read_weights,
    resolve_dtype,
)
from dlm_decode.models.native import (
    NativeModel,
    _meta_module,
    check_head_layout,
    check_token_ids,
    config_int,
    config_number,
)
from dlm_decode.models.transformer import ArchSpec, Transformer

__all__ = [
    "DEFAULT_IMAGE_PROCESSOR",
    "DEFAULT_SYSTEM_PROMPT",
    "LLADA_V_SUPPRESSED_IDS",
    "SIGLIP_SO400M_384",
    "ImageProcessor",
    "LLaDAVModel",
    "VisionEncoder",
    "grid_resolutions",
    "preset_tiny_config",
    "select_best_resolution",
    "split_image_tokens",
    "unpad_features",
]

LLADA_V_SUPPRESSED_IDS = (126081, 126080, 126346, 126347)
"""Token ids the authors' loops never let a masked position take: ``<|endoftext|>``
(126081), BOS (126080), ``<|start_header_id|>`` (126346), ``<|end_header_id|>`` (126347)."""

SIGLIP_SO400M_384: dict[str, Any] = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 384,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
"""The reference tower's SigLIP settings (``SigLipVisionConfig`` defaults of the authors'
``siglip_encoder.py``: so400m, patch 14, 384 px). ``num_hidden_layers`` counts the full
tower; the checkpoint holds one layer less (the last is dropped)."""

DEFAULT_IMAGE_PROCESSOR: dict[str, Any] = {
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "size": 384,
    "rescale_factor": 1 / 255,
    "resample": "bicubic",
}
"""The reference's ``SigLipImageProcessor`` settings (saved as ``preprocessor_config.json``)."""

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the "
    "visual content that the user provides, and assist the user with a variety of tasks "
    "using natural language."
)
"""The system turn of the authors' ``llava_llada`` conversation template."""


_ARCH = "LLaDA-V"
#: Checkpoint prefixes of the vision parts (``LlavaMetaModel`` under ``model.``).
_TOWER = "model.vision_tower.vision_tower."
_PROJECTOR = "model.mm_projector."
_NEWLINE = "model.image_newline"


# --------------------------------------------------------------------------------------
# Image processing (anyres tiling)
# --------------------------------------------------------------------------------------


def grid_resolutions(pinpoints: Any, tile: int) -> list[tuple[int, int]]:
    """The candidate ``(width, height)`` canvases of anyres tiling.

    Args:
        pinpoints: ``"(1x1),...,(6x6)"`` (every grid from the first to the last, in tiles),
            a list of ``[width, height]`` pixel sizes, or such a list as a string.
        tile: the tile size in pixels (the tower's image size).

    Returns:
        Pixel sizes, in the reference's order.
    """
    if isinstance(pinpoints, str) and "x" in pinpoints:
        found = re.findall(r"\((\d+)x(\d+)\)", pinpoints)
        (a0, b0), (a1, b1) = (tuple(map(int, found[0])), tuple(map(int, found[-1])))
        return [(i * tile, j * tile) for i in range(a0, a1 + 1) for j in range(b0, b1 + 1)]
    if isinstance(pinpoints, str):
        pinpoints = ast.literal_eval(pinpoints)
    return [(int(w), int(h)) for w, h in pinpoints]


def select_best_resolution(
    size: tuple[int, int], candidates: Sequence[tuple[int, int]]
) -> tuple[int, int]:
    """The canvas that keeps most of the image's pixels, then wastes least (LLaVA's rule).

    Args:
        size: the image's ``(width, height)``.
        candidates: ``(width, height)`` canvases.
    """
    w0, h0 = size
    best, best_eff, best_waste = candidates[0], -1, math.inf
    for w, h in candidates:
        scale = min(w / w0, h / h0)
        eff = min(int(w0 * scale) * int(h0 * scale), w0 * h0)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (w, h), eff, waste
    return best


def unpad_features(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Drop the feature rows or columns that cover the letterbox padding of a tiled image.

    Args:
        features: ``(d, H, W)`` the tiles' features on their grid.
        size: the original image's ``(width, height)``.

    Returns:
        ``(d, H', W')``.
    """
    w0, h0 = size
    h, w = features.shape[1:]
    if w0 / h0 > w / h:  # padded above and below
        pad = (h - int(h0 * (w / w0))) // 2
        return features[:, pad : h - pad, :]
    pad = (w - int(w0 * (h / h0))) // 2
    return features[:, :, pad : w - pad]


class ImageProcessor:
    """LLaDA-V's image preprocessing: RGB, resize to ``size × size`` (bicubic), scale to
    ``[0, 1]``, normalise; and anyres tiling (a resized overview plus the tiles of the
    image letterboxed onto the best grid canvas).

    Args:
        settings: ``preprocessor_config.json`` keys (``image_mean``, ``image_std``, ``size``,
            ``rescale_factor``, ``resample``); missing keys take
            [`DEFAULT_IMAGE_PROCESSOR`][dlm_decode.models.llada_v.DEFAULT_IMAGE_PROCESSOR].
    """

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        s = {**DEFAULT_IMAGE_PROCESSOR, **(settings or {})}
        size = s["size"]
        if isinstance(size, Mapping):
            size = size.get("shortest_edge", size.get("height"))
        elif isinstance(size, (list, tuple)):
            size = min(size)
        self.size = int(size)
        self.mean = [float(v) for v in s["image_mean"]]
        self.std = [float(v) for v in s["image_std"]]
        self.rescale_factor = float(s["rescale_factor"])
        self.resample = str(s["resample"])

    def to_dict(self) -> dict[str, Any]:
        """The settings, as saved in ``preprocessor_config.json``."""
        return {
            "image_processor_type": "LLaDAVImageProcessor",
            "image_mean": self.mean,
            "image_std": self.std,
            "size": self.size,
            "crop_size": {"height": self.size, "width": self.size},
            "rescale_factor": self.rescale_factor,
            "resample": self.resample,
        }

    def pixels(self, image: Any) -> torch.Tensor:
        """``(3, size, size)`` float32 pixel values of one square crop."""
        from PIL import Image

        filt = getattr(Image.Resampling, self.resample.upper())
        img = image.convert("RGB").resize((self.size, self.size), filt)
        arr = np.asarray(img).astype(np.float64) * self.rescale_factor  # (H, W, 3)
        arr = arr.astype(np.float32)
        arr = (arr - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    def crops(self, image: Any, pinpoints: Any) -> torch.Tensor:
        """``(1 + n, 3, size, size)``: the overview (the image resized to a square) then
        the ``n`` tiles, row by row, of the image letterboxed onto its best canvas."""
        from PIL import Image

        image = image.convert("RGB")
        t = self.size
        w, h = select_best_resolution(image.size, grid_resolutions(pinpoints, t))
        w0, h0 = image.size
        if w / w0 < h / h0:
            nw, nh = w, min(math.ceil(h0 * (w / w0)), h)
        else:
            nw, nh = min(math.ceil(w0 * (h / h0)), w), h
        canvas = Image.new("RGB", (w, h), (0, 0, 0))
        canvas.paste(image.resize((nw, nh)), ((w - nw) // 2, (h - nh) // 2))
        tiles = [canvas.crop((x, y, x + t, y + t)) for y in range(0, h, t) for x in range(0, w, t)]
        return torch.stack([self.pixels(c) for c in [image.resize((t, t)), *tiles]])


def _open_image(image: Any) -> Any:
    """A ``PIL.Image`` from an image or a path."""
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow ships with the vision extra
        raise ImportError("LLaDA-V image prompts need Pillow: pip install Pillow") from exc
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, Path)):
        with Image.open(image) as img:
            img.load()
            return img.copy()
    raise TypeError(
        f"an LLaDA-V image must be a PIL.Image or a path to an image file, got "
        f"{type(image).__name__}"
    )


# --------------------------------------------------------------------------------------
# Vision encoder: tower, projector, newline
# --------------------------------------------------------------------------------------


class VisionEncoder(nn.Module):
    """SigLIP tower (last layer dropped), projector and image-newline embedding.

    Parameter names (what the checkpoint holds under ``model.``): ``tower.*`` ↔
    ``vision_tower.vision_tower.*`` (transformers' ``SiglipVisionModel`` without its
    pooling head), ``projector.{0,2}.*`` ↔ ``mm_projector.{0,2}.*``, ``image_newline``.

    Args:
        vision: the SigLIP vision config (full tower; one layer fewer is built).
        projector_type: ``linear`` or ``mlp{N}x_gelu``.
        d_model: the LLM's hidden size.
        dtype: weight dtype.
    """

    def __init__(
        self,
        vision: Mapping[str, Any],
        projector_type: str,
        d_model: int,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        from transformers import SiglipVisionConfig, SiglipVisionModel

        cfg = SiglipVisionConfig(
            **{**vision, "num_hidden_layers": int(vision["num_hidden_layers"]) - 1},
            vision_use_head=False,
        )
        cfg._attn_implementation = "sdpa"
        self.tower = SiglipVisionModel(cfg).to(dtype)
        self.image_size = int(vision["image_size"])
        self.patches_per_side = self.image_size // int(vision["patch_size"])
        width = int(vision["hidden_size"])
        depth = _projector_depth(projector_type)
        layers: list[nn.Module] = [nn.Linear(width, d_model, dtype=dtype)]
        for _ in range(1, depth):
            layers += [nn.GELU(), nn.Linear(d_model, d_model, dtype=dtype)]
        self.projector = nn.Sequential(*layers)
        self.image_newline = nn.Parameter(torch.zeros(d_model, dtype=dtype))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected patch features of crops.

        Args:
            pixels: ``(N, 3, s, s)`` crops.

        Returns:
            ``(N, (s / patch)², d_model)``.
        """
        vm = getattr(self.tower, "vision_model", self.tower)  # transformers 4 nests it
        x = vm.embeddings(pixels.to(self.image_newline.dtype))  # (N, n_patches, d_vision)
        x = vm.encoder(inputs_embeds=x).last_hidden_state  # the kept layers, no post-norm
        return self.projector(x)


def _projector_depth(projector_type: str) -> int:
    if projector_type == "linear":
        return 1
    m = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if not m or int(m.group(1)) < 1:
        raise ValueError(
            f"{_ARCH} config.json: mm_projector_type={projector_type!r} is not supported; "
            f"use 'linear' or 'mlp<N>x_gelu' (LLaDA-V: 'mlp2x_gelu')"
        )
    return int(m.group(1))


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


class LLaDAVModel(NativeModel):
    """Native LLaDA-V: image prompts through the same Decoder, caches and policies.

    Config keys (LLaVA's, as the authors' code reads them, plus ours where the released
    config is unknown):

    * the LLM, LLaMA style: ``hidden_size``, ``num_attention_heads``,
      ``num_key_value_heads``, ``num_hidden_layers``, ``intermediate_size``,
      ``vocab_size``, ``max_position_embeddings``, ``rope_theta``, ``rms_norm_eps``,
      ``mask_token_id`` (default 126336), ``eos_token_id``, ``pad_token_id``;
    * the vision side: ``mm_projector_type`` (``mlp2x_gelu``), ``mm_hidden_size``,
      ``mm_vision_select_layer`` (−2 only), ``mm_vision_select_feature`` (``patch``),
      ``mm_patch_merge_type`` (``spatial_unpad`` or ``flat``), ``image_aspect_ratio``
      (``anyres_max_<N>`` or ``anyres``), ``image_grid_pinpoints``, ``mm_vision_tower``
      (a name, never downloaded);
    * ours: ``vision_config`` (the SigLIP settings; default
      [`SIGLIP_SO400M_384`][dlm_decode.models.llada_v.SIGLIP_SO400M_384]),
      ``suppress_token_ids`` (default
      [`LLADA_V_SUPPRESSED_IDS`][dlm_decode.models.llada_v.LLADA_V_SUPPRESSED_IDS]).

    Image settings come from ``preprocessor_config.json`` beside the weights (saved by
    [`save_pretrained`][dlm_decode.models.llada_v.LLaDAVModel.save_pretrained]).

    Attributes:
        vision: the [`VisionEncoder`][dlm_decode.models.llada_v.VisionEncoder].
        image_processor: the [`ImageProcessor`][dlm_decode.models.llada_v.ImageProcessor].
    """

    name: ClassVar[str] = "llada_v"
    config_model_types: ClassVar[tuple[str, ...]] = ("llava_llada",)
    accepts_images: ClassVar[bool] = True
    logits_shift = 0

    global_names: ClassVar[Mapping[str, str]] = {
        "embed": "model.embed_tokens",
        "norm": "model.norm",
        "head": "lm_head",
    }
    layer_prefix: ClassVar[str] = "model.layers.{i}."
    layer_names: ClassVar[Mapping[str, str]] = {
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
    end_of_turn_tokens: ClassVar[tuple[str, ...]] = ("<|eot_id|>",)
    known_end_of_turn_ids: ClassVar[Mapping[int, int]] = {126081: 126348}

    #: ``llada-v``: LLaDA-V's shape (LLaDA-8B + SigLIP so400m/14-384; random weights for the
    #: GPU bench); ``llada-v-tiny``: a tiny random model for tests (28-px tiles of 2×2
    #: patches).
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "llada-v": {
            "model_type": "llava_llada",
            "hidden_size": 4096,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "num_hidden_layers": 32,
            "intermediate_size": 12288,
            "vocab_size": 126464,
            "max_position_embeddings": 16384,
            "rope_theta": 500000.0,
            "rms_norm_eps": 1e-5,
            "mask_token_id": 126336,
            "eos_token_id": 126081,
            "pad_token_id": 126081,
            "mm_vision_tower": "google/siglip2-so400m-patch14-384",
            "mm_hidden_size": 1152,
            "mm_projector_type": "mlp2x_gelu",
            "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "patch",
            "mm_patch_merge_type": "spatial_unpad",
            "image_aspect_ratio": "anyres_max_4",
            "image_grid_pinpoints": "(1x1),...,(6x6)",
            "vision_config": SIGLIP_SO400M_384,
        },
        "llada-v-tiny": {
            "model_type": "llava_llada",
            "hidden_size": 32,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "num_hidden_layers": 2,
            "intermediate_size": 64,
            "vocab_size": 128,
            "max_position_embeddings": 1024,
            "rope_theta": 10000.0,
            "rms_norm_eps": 1e-5,
            "mask_token_id": 127,
            "eos_token_id": 1,
            "pad_token_id": 1,
            "suppress_token_ids": [],
            "mm_vision_tower": "random",
            "mm_hidden_size": 16,
            "mm_projector_type": "mlp2x_gelu",
            "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "patch",
            "mm_patch_merge_type": "spatial_unpad",
            "image_aspect_ratio": "anyres_max_4",
            "image_grid_pinpoints": "(1x1),...,(3x3)",
            "vision_config": {
                **SIGLIP_SO400M_384,
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 3,
                "num_attention_heads": 2,
                "image_size": 28,
            },
            "image_processor": {"size": 28},
        },
    }

    def __init__(
        self,
        module: Transformer,
        config: Mapping[str, Any],
        tokenizer: Any = None,
        vision: VisionEncoder | None = None,
        image_processor: ImageProcessor | None = None,
    ) -> None:
        config = dict(config)
        if config.get("mask_token_id") is None and module.spec.vocab_size > 126336:
            config["mask_token_id"] = 126336  # LLaDA's <|mdm_mask|>
        super().__init__(module, config, tokenizer)
        self.options = self.vision_options(config)
        if vision is None:
            vision = self._new_vision(module.embed.weight.device, module.embed.weight.dtype)
        self.vision = vision
        self.image_processor = image_processor or ImageProcessor(config.get("image_processor"))
        ids = self.options["suppress_token_ids"]
        self._suppress = torch.tensor(ids, dtype=torch.long, device=self.device)

    # -- config -----------------------------------------------------------------------
    @classmethod
    def spec_from_config(cls, config: Mapping[str, Any]) -> ArchSpec:
        """Read the LLM part (LLaMA-style keys) and check the vision keys.

        Raises:
            ConfigError: a required key is missing or has a wrong value (one line naming
                it and the fix).
            ValueError: an option this implementation does not have (attention biases,
                RoPE scaling, a select layer other than −2, another merge type).
        """
        arch = _ARCH
        if config.get("attention_bias"):
            raise ValueError(f"{arch} config.json: attention_bias=true is not supported")
        if config.get("rope_scaling"):
            raise ValueError(f"{arch} config.json: rope_scaling is not supported")
        if int(config.get("pretraining_tp", 1) or 1) != 1:
            raise ValueError(f"{arch} config.json: pretraining_tp must be 1")
        d = config_int(config, "hidden_size", arch)
        heads = config_int(config, "num_attention_heads", arch)
        kv = config_int(config, "num_key_value_heads", arch, default=heads)
        check_head_layout(
            arch,
            ("hidden_size", d),
            ("num_attention_heads", heads),
            ("num_key_value_heads", kv),
        )
        vocab = config_int(config, "vocab_size", arch)
        # the authors' LLM config carries Llama-3's bos_token_id 128000, outside the
        # vocabulary and unused; LLaDA's BOS is 126080
        check_token_ids(
            {k: v for k, v in config.items() if k != "bos_token_id"}, arch, vocab, "vocab_size"
        )
        cls.vision_options(config)
        return ArchSpec(
            d_model=d,
            n_heads=heads,
            n_kv_heads=kv,
            n_layers=config_int(config, "num_hidden_layers", arch),
            d_ff=config_int(config, "intermediate_size", arch),
            vocab_size=vocab,
            max_length=config_int(config, "max_position_embeddings", arch, default=4096),
            rope_theta=config_number(config, "rope_theta", arch, 500000.0),
            rms_norm_eps=config_number(config, "rms_norm_eps", arch, 1e-5),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            rope_full_precision=False,  # the reference rotates in the model dtype
        )

    @classmethod
    def vision_options(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """The vision settings of a ``config.json``, checked (see the class docstring).

        Raises:
            ConfigError: a wrong value; ValueError: an unsupported option.
        """
        arch = _ARCH
        vision = {**SIGLIP_SO400M_384, **(config.get("vision_config") or {})}
        for key in ("hidden_size", "num_hidden_layers", "image_size", "patch_size"):
            config_int(
                vision, key, f"{arch} vision_config", minimum=2 if key != "hidden_size" else 1
            )
        mm_hidden = config.get("mm_hidden_size", vision["hidden_size"])
        if mm_hidden != vision["hidden_size"]:
            raise ConfigError(
                f"{arch} config.json: mm_hidden_size={mm_hidden} != vision_config hidden_size="
                f"{vision['hidden_size']}; they are the same width"
            )
        select = config.get("mm_vision_select_layer", -2)
        if select != -2:
            raise ValueError(
                f"{arch} config.json: mm_vision_select_layer={select!r} is not supported; "
                f"LLaDA-V drops the tower's last layer and reads the one before (-2)"
            )
        feature = config.get("mm_vision_select_feature", "patch")
        if feature != "patch":
            raise ValueError(
                f"{arch} config.json: mm_vision_select_feature={feature!r}; use 'patch'"
            )
        merge = config.get("mm_patch_merge_type", "spatial_unpad")
        if merge not in ("spatial_unpad", "flat"):
            raise ValueError(
                f"{arch} config.json: mm_patch_merge_type={merge!r} is not supported; use "
                f"'spatial_unpad' (LLaDA-V) or 'flat'"
            )
        aspect = str(config.get("image_aspect_ratio", "anyres_max_4"))
        m = re.fullmatch(r"anyres(?:_max_(\d+))?", aspect)
        if m is None:
            raise ValueError(
                f"{arch} config.json: image_aspect_ratio={aspect!r} is not supported; use "
                f"'anyres_max_<N>' (LLaDA-V: anyres_max_4) or 'anyres'"
            )
        suppress = config.get("suppress_token_ids")
        suppress = list(LLADA_V_SUPPRESSED_IDS if suppress is None else suppress)
        vocab = config.get("vocab_size")
        bad = [t for t in suppress if not isinstance(t, int) or (vocab and not 0 <= t < vocab)]
        if bad:
            raise ConfigError(
                f"{arch} config.json: suppress_token_ids {bad} are not token ids below "
                f"vocab_size={vocab}; set suppress_token_ids to [] for a small vocabulary"
            )
        projector = str(config.get("mm_projector_type", "mlp2x_gelu"))
        _projector_depth(projector)
        return {
            "vision": vision,
            "projector_type": projector,
            "merge": merge,
            "max_tiles": None if m.group(1) is None else int(m.group(1)),
            "pinpoints": config.get("image_grid_pinpoints", "(1x1),...,(6x6)"),
            "suppress_token_ids": suppress,
        }

    def _new_vision(self, device: torch.device, dtype: torch.dtype) -> VisionEncoder:
        o = self.options
        with torch.device(device):
            return VisionEncoder(o["vision"], o["projector_type"], self.spec.d_model, dtype)

    # -- weights ----------------------------------------------------------------------
    @staticmethod
    def vision_weight_name_map(vision: VisionEncoder) -> dict[str, str]:
        """Internal vision parameter name → checkpoint name."""
        out = {}
        for name in vision.state_dict():
            if name.startswith("tower."):
                rest = name.removeprefix("tower.").removeprefix("vision_model.")
                out[name] = f"{_TOWER}vision_model.{rest}"
            elif name.startswith("projector."):
                out[name] = _PROJECTOR + name[len("projector.") :]
            else:
                out[name] = _NEWLINE
        return out

    @classmethod
    def expected_weight_names(cls, config: Mapping[str, Any]) -> list[str]:
        """Sorted checkpoint weight names (LLM and vision) this ``config.json`` needs."""
        spec = cls.spec_from_config(config)
        o = cls.vision_options(config)
        with torch.device("meta"):
            vision = VisionEncoder(o["vision"], o["projector_type"], spec.d_model)
        names = [*cls.weight_name_map(spec).values(), *cls.vision_weight_name_map(vision).values()]
        return sorted(names)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        config: Mapping[str, Any] | None = None,
        check_weights: bool = True,
    ) -> LLaDAVModel:
        """Load a LLaDA-V folder: ``config.json``, safetensors weights (LLM and vision under
        the names of the authors' code), optionally ``preprocessor_config.json`` and
        tokenizer files.

        Raises:
            CheckpointError: the weights differ from what the config implies; the message
                lists the expected name patterns, since the released checkpoint's layout
                is derived from the reference code, not read from a released config.
        """
        folder = Path(path)
        config = dict(config) if config is not None else read_config(folder)
        spec = cls.spec_from_config(config)
        o = cls.vision_options(config)
        device = torch.device(device)
        dtype = resolve_dtype(dtype, config, device)
        module = _meta_module(spec, dtype)
        with torch.device("meta"):
            vision = VisionEncoder(o["vision"], o["projector_type"], spec.d_model, dtype)
        llm_names = cls.weight_name_map(spec, module)
        vis_names = cls.vision_weight_name_map(vision)
        shapes = {
            **{v: tuple(module.state_dict()[k].shape) for k, v in llm_names.items()},
            **{v: tuple(vision.state_dict()[k].shape) for k, v in vis_names.items()},
        }
        try:
            tensors = read_weights(
                folder,
                shapes,
                device,
                dtype,
                what=f"the {cls.name} architecture",
                check_weights=check_weights,
            )
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}\n{_expected_layout(config, o, spec)}") from exc
        module.load_state_dict({k: tensors[v] for k, v in llm_names.items()}, assign=True)
        vision.load_state_dict({k: tensors[v] for k, v in vis_names.items()}, assign=True)
        getattr(vision.tower, "vision_model", vision.tower).embeddings.register_buffer(
            "position_ids",
            torch.arange(vision.patches_per_side**2, device=device).expand((1, -1)),
            persistent=False,
        )
        module.requires_grad_(False).eval()
        vision.requires_grad_(False).eval()
        proc_file = folder / "preprocessor_config.json"
        settings = json.loads(proc_file.read_text()) if proc_file.is_file() else None
        tokenizer = load_tokenizer(folder, cls.tokenizer_fallbacks)
        return cls(module, config, tokenizer, vision, ImageProcessor(settings))

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        seed: int = 0,
        norm_noise: float = 0.0,
    ) -> LLaDAVModel:
        """Random weights on ``device`` (see
        [`NativeModel.from_config`][dlm_decode.models.native.NativeModel.from_config]); the
        vision weights are drawn from ``N(0, 0.02²)`` too (LayerNorms: weight 1, bias 0;
        the image newline: ``N(0, 1/d)``), with a generator seeded ``seed + 1``."""
        model = super().from_config(
            config, device=device, dtype=dtype, seed=seed, norm_noise=norm_noise
        )
        assert isinstance(model, LLaDAVModel)
        dev = torch.device(device)
        if dev.type == "meta":
            return model
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.vision.named_parameters():
                if "layernorm" in name or "layer_norm" in name:
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
                elif name == "image_newline":
                    p.normal_(0.0, p.numel() ** -0.5, generator=gen)
                else:
                    p.normal_(0.0, 0.02, generator=gen)
        model.vision.requires_grad_(False).eval()
        return model

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight (LLM and vision) under its checkpoint name."""
        sd = self.vision.state_dict()
        vis = {v: sd[k] for k, v in self.vision_weight_name_map(self.vision).items()}
        return {**super().checkpoint_state_dict(), **vis}

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The live parameters (LLM and vision) under their checkpoint names."""
        yield from super().named_parameters()
        names = self.vision_weight_name_map(self.vision)
        for name, p in self.vision.named_parameters():
            yield names[name], p

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``config.json``, ``model.safetensors`` and ``preprocessor_config.json``
        (and the tokenizer, when attached) in the layout
        [`from_pretrained`][dlm_decode.models.llada_v.LLaDAVModel.from_pretrained] reads."""

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        cfg = {k: v for k, v in self.config.items() if k != "image_processor"}
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
        tensors = {
            k: v.detach().contiguous().cpu() for k, v in self.checkpoint_state_dict().items()
        }
        save_file(tensors, str(out / "model.safetensors"))
        proc = self.image_processor.to_dict()
        (out / "preprocessor_config.json").write_text(json.dumps(proc, indent=2))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(out))
        return out

    # -- the prompt -------------------------------------------------------------------
    @torch.no_grad()
    def image_features(self, images: Sequence[Any]) -> list[torch.Tensor]:
        """Each image's feature sequence, as LLaDA-V merges it into the prompt.

        ``spatial_unpad`` with anyres: the overview's ``p²`` features, then the tiles'
        features on their grid with the letterbox padding cut off, shrunk (bilinear) to
        about ``max_tiles`` tiles when larger than 1.1 times that, with the image-newline
        embedding after every row. All crops of all images go through the tower in one
        batch.

        Args:
            images: ``PIL.Image`` objects or paths.

        Returns:
            One ``(n_i, d)`` tensor per image.
        """
        opened = [_open_image(im) for im in images]
        if not opened:
            return []
        o = self.options
        crops = [self.image_processor.crops(im, o["pinpoints"]) for im in opened]
        pixels = torch.cat(crops).to(self.device)  # (N, 3, s, s)
        feats = self.vision(pixels).split([c.shape[0] for c in crops])  # (n_crops, p², d) each
        return [self._merge(f, im.size) for f, im in zip(feats, opened, strict=True)]

    def _merge(self, feat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """One image's crops' features ``(n, p², d)`` → its prompt sequence ``(m, d)``."""
        o, vis = self.options, self.vision
        newline = vis.image_newline  # (d,)
        if o["merge"] == "flat":
            return feat.flatten(0, 1)
        if feat.shape[0] == 1:  # a single crop: its features, then one newline
            return torch.cat([feat[0], newline[None]], dim=0)
        p = vis.patches_per_side
        base, tiles = feat[0], feat[1:]  # (p², d), (n - 1, p², d)
        w, h = select_best_resolution(size, grid_resolutions(o["pinpoints"], vis.image_size))
        gw, gh = w // vis.image_size, h // vis.image_size
        grid = tiles.view(gh, gw, p, p, -1).permute(4, 0, 2, 1, 3)  # (d, gh, p, gw, p)
        grid = grid.flatten(1, 2).flatten(2, 3)  # (d, gh·p, gw·p)
        grid = unpad_features(grid, size)  # (d, H, W)
        d, hh, ww = grid.shape
        if o["max_tiles"] is not None:
            times = math.sqrt(hh * ww / (o["max_tiles"] * p**2))
            if times > 1.1:
                grid = F.interpolate(
                    grid[None], [int(hh // times), int(ww // times)], mode="bilinear"
                )[0]
        nl = newline[:, None, None].expand(d, grid.shape[1], 1)  # (d, H, 1)
        grid = torch.cat([grid, nl.to(grid.dtype)], dim=-1)  # (d, H, W + 1)
        return torch.cat([base, grid.flatten(1, 2).transpose(0, 1)], dim=0)

    @torch.no_grad()
    def embed_prompt(self, prompts: Sequence[MultimodalPrompt]) -> PromptEmbedding:
        """Text embeddings with each image's features at its placeholder, left-padded.

        Args:
            prompts: ``B`` prompts, each with any number of images.

        Returns:
            The [`PromptEmbedding`][dlm_decode.interfaces.PromptEmbedding]: image positions
            hold the pad id in ``ids``; padding is zeros in ``embeds``.

        Raises:
            ValueError: an empty prompt, or a token id outside the vocabulary.
        """
        feats = iter(self.image_features([im for p in prompts for im in p.images]))
        embed = self.module.embed
        rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # (ids (n,), embeds (n, d))
        for r, prompt in enumerate(prompts):
            ids = torch.as_tensor(list(prompt.ids), dtype=torch.long)
            bad = (ids != IMAGE_PLACEHOLDER) & ((ids < 0) | (ids >= self.vocab_size))
            if bool(bad.any()):
                raise ValueError(
                    f"prompt {r} holds token id {int(ids[bad][0])}, outside the vocabulary "
                    f"[0, {self.vocab_size}) (images are {IMAGE_PLACEHOLDER})"
                )
            parts_ids, parts_emb = [], []
            cuts = [-1, *(ids == IMAGE_PLACEHOLDER).nonzero().flatten().tolist(), ids.numel()]
            for i in range(len(cuts) - 1):
                text = ids[cuts[i] + 1 : cuts[i + 1]].to(self.device)
                parts_ids.append(text)
                parts_emb.append(embed(text))  # (n_text, d)
                if i < len(cuts) - 2:
                    f = next(feats)  # (m, d)
                    parts_ids.append(
                        torch.full((f.shape[0],), self.pad_token_id, device=self.device)
                    )
                    parts_emb.append(f.to(self.dtype))
            row_ids, row_emb = torch.cat(parts_ids), torch.cat(parts_emb)
            limit = self.config.get("tokenizer_model_max_length")
            if limit:
                row_ids, row_emb = row_ids[:limit], row_emb[:limit]
            if row_ids.numel() == 0:
                raise ValueError(f"prompt {r} is empty")
            rows.append((row_ids, row_emb))
        p = max(i.numel() for i, _ in rows)
        b, d = len(rows), self.spec.d_model
        out_ids = torch.full((b, p), self.pad_token_id, dtype=torch.long, device=self.device)
        out_emb = torch.zeros((b, p, d), dtype=self.dtype, device=self.device)
        am = torch.zeros((b, p), dtype=torch.bool, device=self.device)
        for i, (ri, re_) in enumerate(rows):
            n = ri.numel()
            out_ids[i, p - n :], out_emb[i, p - n :], am[i, p - n :] = ri, re_, True
        return PromptEmbedding(out_ids, out_emb, None if bool(am.all()) else am)

    def chat_prompt(
        self,
        question: str,
        images: Sequence[Any] = (),
        *,
        system: str | None = None,
        tokenizer: Any = None,
    ) -> MultimodalPrompt:
        """The authors' chat prompt for a question about images, as a
        [`MultimodalPrompt`][dlm_decode.interfaces.MultimodalPrompt].

        The ``llava_llada`` conversation: a system turn, the user turn (``<image>\\n``
        before the question for each image it does not already mark), the assistant
        header; rendered by the tokenizer's chat template, then split at ``<image>``
        with each piece tokenised and the placeholders put between them (LLaVA's
        ``tokenizer_image_token``, BOS handling included).

        Args:
            question: the user's text, optionally with ``<image>`` markers.
            images: the images, one per marker.
            system: the system turn (default the authors' ``llava_llada`` system prompt).
            tokenizer: default the model's.
        """
        tok = tokenizer if tokenizer is not None else self.tokenizer
        if tok is None:
            raise ValueError("chat_prompt needs a tokenizer (the model has none attached)")
        missing = len(images) - question.count("<image>")
        if missing > 0:
            question = "<image>\n" * missing + question
        messages = [
            {"role": "system", "content": DEFAULT_SYSTEM_PROMPT if system is None else system},
            {"role": "user", "content": question},
        ]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return MultimodalPrompt(split_image_tokens(text, tok), tuple(images))

    def image_prompt(self, text: str, images: Sequence[Any] = ()) -> MultimodalPrompt:
        """[`Model.image_prompt`][dlm_decode.interfaces.Model.image_prompt]: the
        [`chat_prompt`][dlm_decode.models.llada_v.LLaDAVModel.chat_prompt] with its default
        system turn."""
        return self.chat_prompt(text, images)

    # -- the Model contract -----------------------------------------------------------
    def forward(self, ids: torch.Tensor, **kwargs: Any) -> Any:
        """[`Model.forward`][dlm_decode.interfaces.Model.forward] (with ``prompt_embeds``),
        then the suppressed ids pushed to the dtype's minimum at masked rows."""
        out = self.module(ids, **kwargs)
        if self._suppress.numel() == 0:
            return out
        logits = out[0] if isinstance(out, tuple) else out  # (B, R, V)
        lo, hi = kwargs.get("logits_rows") or (0, ids.shape[1])
        masked = (ids[:, lo:hi] == self.mask_token_id).unsqueeze(-1)  # (B, R, 1)
        sup = self._suppress
        low = torch.finfo(logits.dtype).min
        logits[:, :, sup] = torch.where(masked, low, logits[:, :, sup])
        return out


def preset_tiny_config(**overrides: Any) -> dict[str, Any]:
    """The ``llada-v-tiny`` config with ``overrides`` (a ``None`` value removes the key, so
    that its default applies).

    Example:
        >>> cfg = preset_tiny_config(vocab_size=256, mask_token_id=255)
        >>> cfg["vocab_size"], cfg.get("mm_projector_type")
        (256, 'mlp2x_gelu')
    """
    cfg = json.loads(json.dumps(LLaDAVModel.presets["llada-v-tiny"]))
    for key, value in overrides.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    return cfg


def split_image_tokens(text: str, tokenizer: Any) -> list[int]:
    """Tokenise ``text`` with
    [`IMAGE_PLACEHOLDER`][dlm_decode.interfaces.IMAGE_PLACEHOLDER] at each ``<image>``
    (LLaVA's rule: when the first piece starts with BOS, BOS is kept once and the first id
    of every piece is dropped).

    Args:
        text: the rendered prompt.
        tokenizer: a transformers tokenizer.
    """
    pieces = [tokenizer(p).input_ids for p in text.split("<image>")]
    bos = getattr(tokenizer, "bos_token_id", None)
    offset = int(bool(pieces and pieces[0] and bos is not None and pieces[0][0] == bos))
    out: list[int] = [pieces[0][0]] if offset else []
    for i, piece in enumerate(pieces):
        if i:
            out.append(IMAGE_PLACEHOLDER)
        out.extend(piece[offset:])
    return out


def _expected_layout(config: Mapping[str, Any], o: Mapping[str, Any], spec: ArchSpec) -> str:
    """What a LLaDA-V checkpoint must hold for ``config``, for error messages."""
    v = o["vision"]
    kept = int(v["num_hidden_layers"]) - 1
    depth = _projector_depth(o["projector_type"])
    proj = ", ".join(f"{_PROJECTOR}{2 * i}.{{weight,bias}}" for i in range(depth))
    return (
        "LLaDA-V weight names are derived from the authors' code (the released config.json "
        "was not found); this config expects exactly:\n"
        f"  LLM ({spec.n_layers} layers, d={spec.d_model}, vocab={spec.vocab_size}): "
        "model.embed_tokens.weight, model.norm.weight, lm_head.weight, "
        "model.layers.{i}.{input_layernorm,post_attention_layernorm}.weight, "
        "model.layers.{i}.self_attn.{q,k,v,o}_proj.weight, "
        "model.layers.{i}.mlp.{gate,up,down}_proj.weight "
        f"for i in 0..{spec.n_layers - 1}\n"
        f"  vision tower (SigLIP, {kept} of {v['num_hidden_layers']} layers kept, no head): "
        f"{_TOWER}vision_model.embeddings.patch_embedding.{{weight,bias}}, "
        f"{_TOWER}vision_model.embeddings.position_embedding.weight, "
        f"{_TOWER}vision_model.encoder.layers.{{j}}.{{self_attn.{{q,k,v,out}}_proj,"
        f"layer_norm1,layer_norm2,mlp.fc1,mlp.fc2}}.{{weight,bias}} for j in 0..{kept - 1}, "
        f"{_TOWER}vision_model.post_layernorm.{{weight,bias}}\n"
        f"  projector ({o['projector_type']}): {proj}\n"
        f"  {_NEWLINE} ({spec.d_model},)\n"
        "  config keys read: hidden_size, num_attention_heads, num_key_value_heads, "
        "num_hidden_layers, intermediate_size, vocab_size, max_position_embeddings, "
        "rope_theta, rms_norm_eps, mask_token_id, eos_token_id, pad_token_id, "
        "mm_projector_type, mm_hidden_size, mm_vision_select_layer, "
        "mm_vision_select_feature, mm_patch_merge_type, image_aspect_ratio, "
        "image_grid_pinpoints, vision_config, suppress_token_ids; "
        "preprocessor_config.json: image_mean, image_std, size, rescale_factor, resample"
    )
