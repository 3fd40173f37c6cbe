"""dlm_decode: fast, pluggable inference for masked diffusion language models."""

from __future__ import annotations

from dlm_decode.api import get_cache, get_policy, get_policy_class, list_plugins
from dlm_decode.config import CacheRef, DecodeConfig, PolicyRef
from dlm_decode.decoder import Decoder, GenerationResult, PolicyContractError, generate
from dlm_decode.frechet import frechet_scores
from dlm_decode.hookspecs import hookimpl
from dlm_decode.interfaces import Cache, CommitPolicy, CountPolicy, Model, StepState
from dlm_decode.models import load_model
from dlm_decode.settings import resolve

__version__ = "0.1.0"

__all__ = [
    "Cache",
    "CacheRef",
    "CommitPolicy",
    "CountPolicy",
    "DecodeConfig",
    "Decoder",
    "GenerationResult",
    "Model",
    "PolicyContractError",
    "PolicyRef",
    "StepState",
    "frechet_scores",
    "generate",
    "get_cache",
    "get_policy",
    "get_policy_class",
    "hookimpl",
    "list_plugins",
    "load_model",
    "resolve",
]
