"""The three plugin interfaces: :class:`Model`, :class:`Cache` and :class:`CommitPolicy`.

Everything the Decoder composes is one of these. Plugins subclass them and register the
subclass through a hook in [`dlm_decode.hookspecs`][dlm_decode.hookspecs].

Shapes used throughout (written once here, as transformers does for its logits processors):

* ``B`` — batch size (rows);
* ``T`` — total sequence length, prompt plus generation;
* ``S`` — length of the span a forward pass recomputes;
* ``L`` — length of the active block (``block_length``);
* ``V`` — vocabulary size.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

__all__ = [
    "Cache",
    "CacheContext",
    "CommitPolicy",
    "CountPolicy",
    "KVBuffer",
    "Model",
    "NoParams",
    "StepState",
]


class NoParams(BaseModel):
    """Params model for plugins that take no parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------
# Commit policies
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepState:
    """What a policy may know about the step besides the confidences.

    Attributes:
        step: index of this denoising step within the active block (0 at block start).
        block_index: index of the active block.
        num_blocks: number of blocks in the generation.
        steps_per_block: steps the decode config allots per block (``steps // num_blocks``),
            or ``None`` when the config sets no step budget.
        block_masked_at_start: ``(B,)`` long tensor, masked positions in each row's block
            when the block started (LLaDA's schedule divides this count over the steps).
    """

    step: int
    block_index: int
    num_blocks: int
    steps_per_block: int | None
    block_masked_at_start: torch.Tensor


class CommitPolicy(ABC):
    """Chooses which masked positions of the active block to commit this step.

    Contract (checked for every registered policy by ``tests/test_policy_contract.py``):

    * tensors in, a bool tensor out, on the same device; no Python loop over rows and no
      host sync (``.item()``, ``.tolist()``) inside :meth:`select`;
    * commits only positions where ``masked`` is true;
    * commits at least one position in every row that still has a masked position, and
      none in a row that has none.

    Subclasses set :attr:`name`, :attr:`version` and :attr:`Params` (a pydantic model with
    ``extra="forbid"``), and implement :meth:`select`.
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1
    Params: ClassVar[type[BaseModel]] = NoParams
    #: Decode-config fields the policy needs (``fixed`` needs ``steps``).
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: BaseModel | None = None) -> None:
        self.params = params if params is not None else self.Params()

    @property
    def key(self) -> str:
        """Versioned registry name, e.g. ``"frechet.v1"``."""
        return f"{self.name}.v{self.version}"

    @abstractmethod
    def select(
        self, confidence: torch.Tensor, masked: torch.Tensor, state: StepState
    ) -> torch.Tensor:
        """Choose the positions to commit.

        Args:
            confidence: ``(B, L)`` float32 or float64, probability of each proposed token;
                values at unmasked positions are meaningless and must be ignored.
            masked: ``(B, L)`` bool, true where the position is still masked.
            state: step information (see :class:`StepState`).

        Returns:
            ``(B, L)`` bool commit mask on the same device.
        """

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump().items())
        return f"{type(self).__name__}[{self.key}]({args})"


class CountPolicy(CommitPolicy):
    """A policy that commits the ``n`` most confident masked positions of each row.

    Subclasses implement :meth:`commit_count` on the sorted confidence profile; this class
    sorts, clamps the count to ``[1, masked count]`` and builds the mask. The same
    :meth:`commit_count` serves counterfactual traces ("how many would each rule commit?").
    """

    @abstractmethod
    def commit_count(
        self, sorted_conf: torch.Tensor, valid: torch.Tensor, state: StepState
    ) -> torch.Tensor:
        """How many of the top positions to commit, per row.

        Args:
            sorted_conf: ``(B, L)`` confidences of masked positions sorted descending;
                entries past a row's masked count are 0 and must be ignored.
            valid: ``(B, L)`` bool, true for the first ``m_b`` entries of row ``b`` where
                ``m_b`` is the row's masked count.
            state: step information.

        Returns:
            ``(B,)`` long count; the caller clamps it to ``[1, m_b]`` (0 where ``m_b = 0``).
        """

    def select(
        self, confidence: torch.Tensor, masked: torch.Tensor, state: StepState
    ) -> torch.Tensor:
        from dlm_decode.frechet import commit_top_n, sorted_profile

        sorted_conf, valid, order = sorted_profile(confidence, masked)
        n = self.commit_count(sorted_conf, valid, state)
        return commit_top_n(n, masked, order)

    def counts(
        self, confidence: torch.Tensor, masked: torch.Tensor, state: StepState
    ) -> torch.Tensor:
        """``(B,)`` number of positions :meth:`select` would commit, without the mask."""
        from dlm_decode.frechet import sorted_profile

        sorted_conf, valid, _ = sorted_profile(confidence, masked)
        m = valid.sum(-1)
        n = self.commit_count(sorted_conf, valid, state)
        return torch.minimum(torch.clamp(n, min=1), m)


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


@dataclass
class KVBuffer:
    """Preallocated key/value storage for every layer.

    ``k`` and ``v`` are ``(n_layers, B, H_kv, T, hd)``; a forward over positions
    ``[start, start + S)`` writes its keys and values there, then attends over ``[0, T)``.
    Nothing grows during a decode.
    """

    k: torch.Tensor
    v: torch.Tensor

    @property
    def max_length(self) -> int:
        """Number of positions the buffer holds (``T``)."""
        return self.k.shape[3]


class Model(ABC):
    """A bidirectional mask predictor (LLaDA, Dream, the shipped tiny model, …).

    Subclasses set :attr:`name` (the registry name) and :attr:`config_model_types`
    (the ``model_type`` values of ``config.json`` they load), and implement
    :meth:`from_pretrained`, :meth:`new_kv` and :meth:`forward`.

    Attributes:
        mask_token_id: id of the mask token.
        eos_token_ids: ids that end a response (EOS and end-of-turn).
        pad_token_id: id used for left padding of batched prompts.
        vocab_size: size of the logits' last dimension.
        max_length: longest sequence the model accepts (prompt + generation).
        logits_shift: 0 when output row ``i`` predicts position ``i`` (LLaDA); 1 when it
            predicts position ``i + 1`` (Dream, whose logit for ``i`` comes from ``i - 1``).
        tokenizer: a transformers tokenizer, or ``None``.
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1
    config_model_types: ClassVar[tuple[str, ...]] = ()

    mask_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    vocab_size: int
    max_length: int
    logits_shift: int = 0
    tokenizer: Any = None

    @classmethod
    @abstractmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> Model:
        """Load a checkpoint folder in the Hugging Face layout."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Device of the weights."""

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """Floating dtype of the weights."""

    @abstractmethod
    def new_kv(self, batch_size: int, max_length: int) -> KVBuffer:
        """Allocate an empty :class:`KVBuffer` for ``batch_size`` rows of ``max_length``."""

    @abstractmethod
    def forward(
        self,
        ids: torch.Tensor,
        *,
        start: int = 0,
        kv: KVBuffer | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Run the transformer over a span and return logits for some of its rows.

        Args:
            ids: ``(B, S)`` token ids at absolute positions ``[start, start + S)``.
            start: absolute position of ``ids[:, 0]``.
            kv: when given, keys/values of the span are written to ``kv[..., start:start+S, :]``
                and attention reads all ``T = kv.max_length`` cached positions; when ``None``,
                the span attends to itself only (``start`` must then be 0 and ``S = T``).
            attention_mask: ``(B, T)`` bool key mask over all positions (false = padding),
                or ``None`` for no padding.
            position_ids: ``(B, S)`` RoPE positions of the span; default ``start + arange(S)``.
            logits_rows: ``(lo, hi)`` rows of the span (relative to ``start``) whose output
                goes through the final norm and LM head; default all rows. These are raw
                output rows: for a shifted model row ``r`` predicts position ``start + r + 1``.

        Returns:
            ``(B, hi - lo, V)`` logits in the model's dtype.
        """

    def logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One plain full forward, logits aligned so row ``i`` predicts position ``i``.

        For a shifted model (Dream) the outputs are shifted right by one and the first row is
        kept, as Dream's own generation code does.

        Args:
            input_ids: ``(B, T)`` token ids.
            attention_mask: ``(B, T)`` bool, false at padding; ``None`` for no padding.

        Returns:
            ``(B, T, V)`` logits.
        """
        position_ids = None
        if attention_mask is not None:
            position_ids = positions_from_mask(attention_mask)
        out = self.forward(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        if self.logits_shift:
            out = torch.cat([out[:, :1], out[:, :-1]], dim=1)
        return out


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions for left-padded rows: real tokens count from 0, padding gets 0.

    Args:
        attention_mask: ``(B, T)`` bool, false at padding.

    Returns:
        ``(B, T)`` long positions.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# --------------------------------------------------------------------------------------
# Caches
# --------------------------------------------------------------------------------------


@dataclass
class CacheContext:
    """Per-decode state a cache works with; the Decoder builds one per ``generate`` call.

    Attributes:
        model: the model.
        attention_mask: ``(B, T)`` bool key mask, or ``None`` when no row is padded.
        position_ids: ``(B, T)`` long RoPE positions.
        kv: the cache's preallocated buffer (allocated by :meth:`Cache.setup`), or ``None``.
        extra: free-form state for cache plugins.
    """

    model: Model
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor
    kv: KVBuffer | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Cache(ABC):
    """Decides what each forward recomputes and what it reuses.

    Both methods return logits for exactly the active block's positions
    ``[block_start, block_end)``, aligned (row ``j`` predicts position ``block_start + j``);
    each call is one model forward (one NFE).
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1
    Params: ClassVar[type[BaseModel]] = NoParams

    def __init__(self, params: BaseModel | None = None) -> None:
        self.params = params if params is not None else self.Params()

    @property
    def key(self) -> str:
        """Versioned registry name, e.g. ``"dual.v1"``."""
        return f"{self.name}.v{self.version}"

    def setup(self, ctx: CacheContext, batch_size: int, total_length: int) -> None:  # noqa: B027
        """Allocate buffers once per decode (default: nothing)."""

    @abstractmethod
    def refresh(
        self, ctx: CacheContext, x: torch.Tensor, block_start: int, block_end: int
    ) -> torch.Tensor:
        """First step of a block: ``x`` is ``(B, T)``; returns ``(B, L, V)`` logits."""

    @abstractmethod
    def step(
        self, ctx: CacheContext, x: torch.Tensor, block_start: int, block_end: int
    ) -> torch.Tensor:
        """A later step of the block: ``x`` is ``(B, T)``; returns ``(B, L, V)`` logits."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}[{self.key}]"
