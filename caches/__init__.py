"""Built-in KV-cache strategies, registered through the ``dlm_decode`` entry point like any
plugin.

* [`dlm_decode.caches.fastdllm`][dlm_decode.caches.fastdllm]: ``none``, ``prefix`` and
  ``dual`` (Fast-dLLM), with ``refresh_every``;
* [`dlm_decode.caches.refresh`][dlm_decode.caches.refresh]: ``vicinity`` (dInfer), ``dkv``
  (dKV-Cache) and ``drift`` (hidden-state drift), on cache contract v2;
* [`dlm_decode.caches.block`][dlm_decode.caches.block]: ``block``, the exact cache of
  block-causal models (SDAR, Fast-dLLM v2), and ``subblock``, with Fast-dLLM v2's
  approximate sub-block cache on top.
"""

from __future__ import annotations

from collections.abc import Callable

from dlm_decode.caches.block import BlockCache, SubBlockCache
from dlm_decode.caches.fastdllm import DualCache, NoCache, PrefixCache
from dlm_decode.caches.refresh import DKVCache, DriftCache, VicinityCache
from dlm_decode.hookspecs import hookimpl

__all__ = [
    "BlockCache",
    "DKVCache",
    "DriftCache",
    "DualCache",
    "NoCache",
    "PrefixCache",
    "SubBlockCache",
    "VicinityCache",
    "register_caches",
]

BUILTIN_CACHES = (
    NoCache,
    PrefixCache,
    DualCache,
    VicinityCache,
    DKVCache,
    DriftCache,
    BlockCache,
    SubBlockCache,
)
"""The built-in caches, in registration order."""


@hookimpl
def register_caches(register: Callable[[type], None]) -> None:
    """Register the built-in caches."""
    for cls in BUILTIN_CACHES:
        register(cls)
