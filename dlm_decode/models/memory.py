"""How much memory a decode needs, checked against what the device has before anything
is allocated.

A config may legally declare a huge ``max_sequence_length`` (``2**40``); a decode that
asks for such a length would then try to allocate hundreds of GiB and die deep inside
PyTorch. [`check_memory`][dlm_decode.models.memory.check_memory] turns that into one line
raised before the first buffer, with the estimate from
[`decode_memory_bytes`][dlm_decode.models.memory.decode_memory_bytes] broken down and the
fix. [`Decoder.generate`][dlm_decode.decoder.Decoder.generate] calls it.

The estimate counts the buffers a decode allocates (token ids, positions and masks; the
active block's logits in the model dtype plus their float32 working copies; the key/value
cache of every layer when the cache keeps one) and, roughly, the activations of one
full-sequence forward. It is an order of magnitude meant to catch requests that cannot
fit, not an allocator model: a decode that passes may still run out of memory at the edge.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dlm_decode.interfaces import Cache, Model

__all__ = [
    "DecodeMemoryError",
    "available_memory_bytes",
    "check_memory",
    "decode_memory_bytes",
]

_GIB = 1024**3
_LONG = 8  # bytes of a token id / position (torch.long)
#: (B, T) long buffers of a decode: the sequence, its copy before a step, the RoPE
#: positions, and the ids slice a full forward embeds.
_ID_BUFFERS = 4
#: (B, T) bool buffers: the key mask and the masked-position map.
_MASK_BUFFERS = 2
#: float32 working copies of the logits (the softmax / confidence pass).
_LOGIT_WORK_COPIES = 2
#: (B, T, d_model) activations alive at once in one block's forward (residual, norm
#: output, q, k, v, attention output).
_HIDDEN_COPIES = 6
#: (B, T, d_ff) activations of the SwiGLU MLP (gate, up, their product).
_MLP_COPIES = 3


class DecodeMemoryError(MemoryError, ValueError):
    """A decode that needs more memory than its device has; raised before any buffer is
    allocated. Both a ``MemoryError`` and a ``ValueError`` (a request that cannot be
    served as given); the message is one line with the estimate, its parts, what the
    device has and the fix."""


def _no_kv(cache: Cache | str | None) -> bool:
    """Whether ``cache`` keeps no key/value buffer (``None``, ``"none"``, or a cache whose
    ``setup`` is the no-op default)."""
    if cache is None:
        return True
    if isinstance(cache, str):
        return cache.split(".v", 1)[0] == "none"
    if getattr(cache, "name", None) == "none":
        return True
    return getattr(type(cache), "setup", None) is Cache.setup


def _spec_value(model: Model, name: str) -> int | None:
    spec = getattr(model, "spec", None)
    value = getattr(spec, name, None) if spec is not None else getattr(model, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _parts(
    model: Model,
    batch_size: int,
    total_length: int,
    cache: Cache | str | None,
    logits_length: int | None,
) -> dict[str, int]:
    """The estimate's parts in bytes: ``token ids``, ``logits``, ``KV cache``,
    ``activations`` (the last two only when the model exposes its shapes)."""
    b, t = int(batch_size), int(total_length)
    dsize = torch.empty((), dtype=model.dtype, device="meta").element_size()
    rows = t if logits_length is None else min(int(logits_length), t)
    parts = {
        "token ids": b * t * (_ID_BUFFERS * _LONG + _MASK_BUFFERS),
        "logits": b * rows * int(model.vocab_size) * (dsize + 4 * _LOGIT_WORK_COPIES),
    }
    layers, kv_heads, head_dim = (
        _spec_value(model, k) for k in ("n_layers", "n_kv_heads", "head_dim")
    )
    d_model, d_ff = _spec_value(model, "d_model"), _spec_value(model, "d_ff")
    if not _no_kv(cache) and layers and kv_heads and head_dim:
        # one scratch slot past the end (caches that pad rows of unequal size)
        parts["KV cache"] = 2 * b * (t + 1) * layers * kv_heads * head_dim * dsize
    if d_model:
        act = b * t * (_HIDDEN_COPIES * d_model + _MLP_COPIES * (d_ff or 4 * d_model)) * dsize
        if head_dim:  # RoPE cos and sin, float32 at least
            act += 2 * b * t * head_dim * max(dsize, 4)
        parts["activations"] = act
    return parts


def decode_memory_bytes(
    model: Model,
    batch_size: int,
    total_length: int,
    cache: Cache | str | None = None,
    *,
    logits_length: int | None = None,
) -> int:
    """Estimate the bytes a decode of ``batch_size`` rows of ``total_length`` allocates.

    The sum of: token ids, positions and masks ``(B, T)``; logits ``(B, rows, V)`` in the
    model dtype plus two float32 working copies; the key/value cache
    ``2 · B · (T + 1) · layers · kv_heads · head_dim`` in the model dtype when ``cache``
    keeps one; and, roughly, the activations of one full-sequence forward
    (``B · T · (6 · d_model + 3 · d_ff)`` plus the RoPE tables). KV and activations need
    the model's shapes (a native model's
    [`ArchSpec`][dlm_decode.models.transformer.ArchSpec], or ``n_layers``,
    ``n_kv_heads``, ``head_dim``, ``d_model``, ``d_ff`` attributes); a model without them
    counts ids and logits only.

    Args:
        model: the model (only its shapes, dtype and vocabulary are read).
        batch_size: rows decoded at once.
        total_length: prompt plus generated tokens per row.
        cache: the cache strategy or its name; ``None`` or ``"none"`` for no KV buffer.
        logits_length: rows of logits one forward returns (a block, plus the logits
            shift); default ``total_length``.

    Returns:
        The estimate in bytes.

    Examples:
        >>> from dlm_decode.models import build_model
        >>> model = build_model("llada-tiny")
        >>> decode_memory_bytes(model, 2, 64, "dual") > decode_memory_bytes(model, 2, 64)
        True
    """
    return sum(_parts(model, batch_size, total_length, cache, logits_length).values())


def _meminfo_available() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (Linux), or ``None``."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_memory_bytes(device: str | torch.device) -> int | None:
    """Bytes a decode on ``device`` can still allocate, or ``None`` when unknown.

    CUDA: the driver's free memory on that device (``torch.cuda.mem_get_info``) plus what
    PyTorch's allocator has reserved but not handed out. CPU: ``psutil``'s available
    memory when it is installed, else ``MemAvailable`` of ``/proc/meminfo``, else the
    free pages of ``os.sysconf``. Other devices (``mps``, ``meta``): ``None``.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return None
        free, _total = torch.cuda.mem_get_info(dev)
        cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        return int(free) + max(int(cached), 0)
    if dev.type != "cpu":
        return None
    try:
        import psutil
    except ImportError:
        pass
    else:
        return int(psutil.virtual_memory().available)
    found = _meminfo_available()
    if found is not None:
        return found
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def _gib(n: int | float) -> str:
    """``n`` bytes for a message: ``618 GiB``, ``1.5 GiB``, ``0.25 GiB``, ``46.1 KiB``."""
    g = n / _GIB
    if g >= 10:
        return f"{g:,.0f} GiB"
    if g >= 0.01:
        return f"{g:.3g} GiB"
    if n >= 1024**2:
        return f"{n / 1024**2:.3g} MiB"
    return f"{n / 1024:.3g} KiB"


def check_memory(
    model: Model,
    batch_size: int,
    total_length: int,
    cache: Cache | str | None = None,
    *,
    logits_length: int | None = None,
    device: str | torch.device | None = None,
) -> int:
    """Raise before allocating when a decode cannot fit in the device's memory.

    Compares [`decode_memory_bytes`][dlm_decode.models.memory.decode_memory_bytes] with
    [`available_memory_bytes`][dlm_decode.models.memory.available_memory_bytes]; nothing
    is allocated here. Where the available memory is unknown the check passes.

    Args:
        model: the model.
        batch_size: rows decoded at once.
        total_length: prompt plus generated tokens per row.
        cache: the cache strategy or its name (``None`` for no KV buffer).
        logits_length: rows of logits per forward (default ``total_length``).
        device: the device to check; default the model's.

    Returns:
        The estimate in bytes.

    Raises:
        DecodeMemoryError: the estimate exceeds the available memory; one line: "this
            decode needs ≈ N GiB (batch B × length L: parts) but DEVICE has M GiB
            available; lower --batch-size or --gen-length".
    """
    parts = _parts(model, batch_size, total_length, cache, logits_length)
    need = sum(parts.values())
    dev = torch.device(device) if device is not None else model.device
    have = available_memory_bytes(dev)
    if have is None or need <= have:
        return need
    detail = ", ".join(f"{k} {_gib(v)}" for k, v in parts.items() if v)
    raise DecodeMemoryError(
        f"this decode needs ≈ {_gib(need)} (batch {batch_size} × length {total_length}: "
        f"{detail}) but {dev} has {_gib(have)} available; lower --batch-size or "
        f"--gen-length (batch_size / gen_length: fewer rows or shorter prompt + generation)"
    )
