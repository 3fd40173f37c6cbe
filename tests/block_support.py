"""Helpers shared by the block-diffusion parity tests (SDAR, Fast-dLLM v2, LLaDA2)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch

__all__ = ["block_mask", "install_stub_modules", "random_ids", "sharpen"]


def random_ids(n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """``(batch, n)`` seeded token ids in ``[2, 126)`` (never a tiny model's special ids)."""
    return torch.randint(2, 126, (batch, n), generator=torch.Generator().manual_seed(seed))


def block_mask(t: int, size: int) -> torch.Tensor:
    """``(T, T)`` bool block-causal mask (query × key) for blocks of ``size``."""
    blk = torch.arange(t) // size
    return blk[None, :] <= blk[:, None]


def sharpen(model: Any, factor: float = 10.0, keep: Collection[str] = ("norm",)) -> Any:
    """Scale every parameter whose name holds none of ``keep`` by ``factor`` (in place),
    so that tiny random models do not decode one repeated token; returns ``model``."""
    with torch.no_grad():
        for name, weight in model.module.named_parameters():
            if not any(k in name for k in keep):
                weight.mul_(factor)
    return model


def install_stub_modules(
    mods: Mapping[str, types.ModuleType],
    packages: Collection[str],
    undo: list[Callable[[], Any]],
    prefer_real: Collection[str] = (),
) -> None:
    """Put stand-in modules into ``sys.modules`` for a reference's imports.

    Args:
        mods: module name → stand-in.
        packages: the names that are packages.
        undo: receives one callable per module installed, removing it again.
        prefer_real: names left to the real module when it is installed.
    """
    for name, mod in mods.items():
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=name in packages)
        if name in prefer_real and importlib.util.find_spec(name):
            continue
        if name not in sys.modules:
            sys.modules[name] = mod
            undo.append(lambda name=name: sys.modules.pop(name, None))
