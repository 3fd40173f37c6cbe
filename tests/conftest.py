"""Shared pytest configuration: plugin isolation and the CUDA gate.

Sections are additive; several test modules contribute fixtures here.
"""

from __future__ import annotations

import os

# Tests never load third-party plugins that happen to be installed; the built-ins always
# load. Set before anything imports the registry.
os.environ["DLM_DECODE_PLUGINS"] = ""

import pytest
import torch

#: Skip a test (or a ``pytest.param``) on machines without a CUDA GPU.
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

#: Devices to parametrize device-agnostic tests over; ``cuda`` carries the
#: ``requires_cuda`` marker (select with ``-m requires_cuda``) and skips without a GPU.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=(pytest.mark.requires_cuda, requires_cuda), id="cuda"),
]


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a model loads: every command under test must refuse its input
    (or resolve its options) before that."""
    from dlm_decode import cli
    from dlm_decode.models import loading

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("the model must not load for a bad input")

    monkeypatch.setattr(cli, "load_model", boom)
    monkeypatch.setattr(loading, "load_model", boom)
