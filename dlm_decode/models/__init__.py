"""Built-in model architectures and the model loader.

* [`LLaDAModel`][dlm_decode.models.llada.LLaDAModel] (``llada``),
  [`DreamModel`][dlm_decode.models.dream.DreamModel] (``dream``) and the block-diffusion
  [`SDARModel`][dlm_decode.models.sdar.SDARModel] (``sdar``) and
  [`FastDLLMv2Model`][dlm_decode.models.fast_dllm_v2.FastDLLMv2Model] (``fast_dllm_v2``):
  native PyTorch
  implementations over one shared transformer
  ([`dlm_decode.models.transformer`][dlm_decode.models.transformer], pure ``nn`` code)
  wrapped by [`NativeModel`][dlm_decode.models.native.NativeModel] (checkpoints);
* [`load_model`][dlm_decode.models.loading.load_model]: ``"tiny"``, a local folder or a hub
  id, architecture detected through the plugin registry;
* [`build_model`][dlm_decode.models.loading.build_model]: random weights built on a device;
* [`check_memory`][dlm_decode.models.memory.check_memory] /
  [`decode_memory_bytes`][dlm_decode.models.memory.decode_memory_bytes]: whether a decode fits
  in the device's memory, checked before anything is allocated;
* [`CheckpointError`][dlm_decode.models.checkpoint.CheckpointError] /
  [`ConfigError`][dlm_decode.models.checkpoint.ConfigError]: a broken checkpoint or config;
* [`dlm_decode.models.testing`][dlm_decode.models.testing]: tiny random checkpoints for tests.
"""

from __future__ import annotations

from collections.abc import Callable

from dlm_decode.hookspecs import hookimpl
from dlm_decode.models.checkpoint import CheckpointError, ConfigError
from dlm_decode.models.dream import DreamModel
from dlm_decode.models.fast_dllm_v2 import FastDLLMv2Model
from dlm_decode.models.llada import LLaDAModel
from dlm_decode.models.llada2 import LLaDA2Model
from dlm_decode.models.llada_v import LLaDAVModel
from dlm_decode.models.loading import build_model, load_model, presets
from dlm_decode.models.memory import (
    DecodeMemoryError,
    available_memory_bytes,
    check_memory,
    decode_memory_bytes,
)
from dlm_decode.models.native import NativeModel
from dlm_decode.models.sdar import SDARModel

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DecodeMemoryError",
    "DreamModel",
    "FastDLLMv2Model",
    "LLaDA2Model",
    "LLaDAModel",
    "LLaDAVModel",
    "NativeModel",
    "SDARModel",
    "available_memory_bytes",
    "build_model",
    "check_memory",
    "decode_memory_bytes",
    "load_model",
    "presets",
    "register_models",
]


@hookimpl
def register_models(register: Callable[[type], None]) -> None:
    """Register the built-in architectures ``llada``, ``dream``, ``sdar``, ``llada_v`` and
    ``fast_dllm_v2``."""
    register(LLaDAModel)
    register(DreamModel)
    register(SDARModel)
    register(LLaDA2Model)  # llada2_moe
    register(LLaDAVModel)
    register(FastDLLMv2Model)
