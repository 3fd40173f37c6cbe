"""Built-in model architectures (filled in by the models module)."""

from __future__ import annotations

from collections.abc import Callable

from dlm_decode.hookspecs import hookimpl


@hookimpl
def register_models(register: Callable[[type], None]) -> None:
    """Register the built-in architectures."""
