"""Public helpers over the registry: ``get_policy``, ``get_cache``, ``list_plugins``.

Thin front doors to [`resolve_plugin`][dlm_decode.settings.resolve_plugin], the one place
that looks plugins up and validates their parameters.
"""

from __future__ import annotations

from typing import Any

from dlm_decode.interfaces import Cache, CommitPolicy
from dlm_decode.registry import get_registry
from dlm_decode.settings import plugin_class, resolve_plugin

__all__ = ["get_cache", "get_policy", "get_policy_class", "list_plugins"]


def get_policy_class(name: str) -> type[CommitPolicy]:
    """The registered policy class for ``name`` or ``name.vN``."""
    return plugin_class("policy", name)


def get_policy(name: str, **params: Any) -> CommitPolicy:
    """A ready commit policy with validated params.

    Args:
        name: ``frechet``, ``frechet.v1``, ``threshold``, … or a plugin's name.
        **params: the policy's parameters, e.g. ``margin=0.25``.

    Returns:
        The policy object.

    Raises:
        dlm_decode.registry.UnknownPluginError: unknown name (with "did you mean …").
        ValueError: invalid parameter, naming the field.

    Examples:
        >>> import torch, dlm_decode
        >>> pol = dlm_decode.get_policy("frechet", margin=0.30)
        >>> conf = torch.tensor([[0.99, 0.95, 0.82, 0.78, 0.74]])
        >>> masked = torch.ones_like(conf, dtype=torch.bool)
        >>> state = dlm_decode.StepState(0, 0, 1, None, masked.sum(-1))
        >>> int(pol.select(conf, masked, state).sum())
        4
    """
    return resolve_plugin(name, "policy", params)[1]


def get_cache(name: str, **params: Any) -> Cache:
    """A ready cache strategy (``none``, ``prefix``, ``dual`` or a plugin's) with validated
    params."""
    return resolve_plugin(name, "cache", params)[1]


def list_plugins(kind: str | None = None) -> list[dict[str, Any]]:
    """Every registered plugin: kind, name, version, versioned key, default params, source.

    Args:
        kind: ``policy``, ``cache``, ``model`` or ``task`` to filter; ``None`` for all.
    """
    rows = get_registry().listing()
    return [r for r in rows if kind is None or r["kind"] == kind]
