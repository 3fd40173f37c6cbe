"""``recheck``: commit the low-entropy masked positions, and send back to the mask the
tokens of this block that the model has come to doubt.

A complete contract-v2 plugin: it declares the signals it reads (``entropy``, ``current``,
``history``), keeps a tensor of its own (how often each position was sent back), and
returns a ``Decision`` with a remask set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from dlm_decode import CommitPolicy, StepState, hookimpl
from dlm_decode.frechet import commit_best_if_none
from dlm_decode.signals import Decision

__all__ = ["RecheckParams", "RecheckPolicy", "register_commit_policies"]


class RecheckParams(BaseModel):
    """Params of ``recheck``; unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_entropy: float = Field(
        0.5, ge=0.0, description="Commit masked positions below this entropy (nats)."
    )
    doubt: float = Field(
        0.3,
        ge=0.0,
        le=1.0,
        description="Remask committed tokens whose probability fell below this.",
    )
    max_rechecks: int = Field(1, ge=0, description="How often one position may be sent back.")


class RecheckPolicy(CommitPolicy):
    """Commit masked positions with entropy below ``max_entropy`` (at least the lowest);
    remask tokens committed earlier in the block whose current probability is below
    ``doubt``, each position at most ``max_rechecks`` times."""

    name: ClassVar[str] = "recheck"
    version: ClassVar[int] = 1
    Params: ClassVar[type[BaseModel]] = RecheckParams
    needs: ClassVar[tuple[str, ...]] = ("entropy", "current", "history")
    revokes: ClassVar[bool] = True
    capturable: ClassVar[bool] = True

    def make_state(self, batch_size, block_length, vocab_size, device):
        # (B, L) how often each position of the block was sent back.
        return {
            "sent_back": torch.zeros((batch_size, block_length), dtype=torch.long, device=device)
        }

    def select(self, confidence: torch.Tensor, masked: torch.Tensor, state: StepState) -> Decision:
        sig, sent = state.signals, state.policy_state["sent_back"]
        commit = commit_best_if_none(sig.entropy < self.params.max_entropy, -sig.entropy, masked)
        doubtful = sig.history.editable & (sig.current < self.params.doubt)
        remask = doubtful & (sent < self.params.max_rechecks)
        sent.add_(remask)
        return Decision(commit=commit, remask=remask)


@hookimpl
def register_commit_policies(register: Callable[[type], None]) -> None:
    """Register ``recheck`` with dlm_decode."""
    register(RecheckPolicy)
