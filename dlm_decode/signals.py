"""What a commit policy sees of a step (contract v2): the declared signals, the per-position
history of the active block, and the decision it returns.

A policy class declares the signals it reads in
[`needs`][dlm_decode.interfaces.CommitPolicy.needs]; the Decoder computes exactly those,
once per step, on the device, inside the select stage (so the fast path captures them), and
hands them over as [`StepSignals`][dlm_decode.signals.StepSignals] in
``state.signals``. Reading a signal that was not declared raises
[`UndeclaredSignalError`][dlm_decode.signals.UndeclaredSignalError], naming the declaration
to add.

Signal names (every tensor covers **every position of the active block**, committed ones
included; ``B`` rows, ``L`` block positions, ``V`` vocabulary):

* always: ``x0`` ``(B, L)`` long, the proposal at each position; ``confidence``
  ``(B, L)`` float32, ``p(x0)``; ``block`` ``(B, L)`` long, the tokens now at each position
  (the mask id where masked); ``mask_token_id``, the model's mask id;
* ``current``: ``current`` ``(B, L)`` float32, ``p`` of the token now at the position (0
  where masked);
* ``entropy``: ``entropy`` ``(B, L)`` float32, ``−Σ p ln p`` (natural log);
* ``top2``: ``top2`` ``(B, L)`` float32, the second-highest probability;
* ``topk:K``: ``topk_probs`` and ``topk_ids`` ``(B, L, K)``, the ``K`` highest
  probabilities and their ids;
* ``logits``: ``logits`` ``(B, L, V)`` in the model dtype, the block's raw logits;
* ``uniform``: ``uniform`` ``(B, L)`` float32, ``U(0, 1)`` noise from the decode's seeded
  generator;
* ``history``: ``history``, the block's [`History`][dlm_decode.signals.History].

``p`` is the distribution the confidence comes from: the softmax of the block's logits with
the mask token excluded (renormalised), in float32 at temperature 1 (sampling at
``temperature > 0`` changes which token is proposed, not ``p``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

__all__ = [
    "SIGNAL_NAMES",
    "Decision",
    "History",
    "SignalSpec",
    "StepSignals",
    "UndeclaredSignalError",
    "compute_signals",
    "parse_needs",
]

SIGNAL_NAMES = ("current", "entropy", "top2", "topk", "logits", "uniform", "history")
"""The signals a policy may declare (``topk`` as ``topk:K``)."""

_TOPK = re.compile(r"^topk:(\d+)$")


class UndeclaredSignalError(AttributeError):
    """A policy read a signal it did not declare in ``needs``."""


@dataclass(frozen=True)
class SignalSpec:
    """The parsed declaration: which signals to compute.

    Attributes:
        names: the declared names (``topk`` without its ``K``).
        topk: the largest ``K`` declared for ``topk`` (0: none).
    """

    names: frozenset[str] = frozenset()
    topk: int = 0

    def __or__(self, other: SignalSpec) -> SignalSpec:
        return SignalSpec(self.names | other.names, max(self.topk, other.topk))

    def __contains__(self, name: str) -> bool:
        return name in self.names


def parse_needs(needs: Iterable[str], owner: str = "the policy") -> SignalSpec:
    """Parse a ``needs`` declaration such as ``("entropy", "topk:4", "history")``.

    Raises:
        ValueError: an unknown name, or ``topk`` without a positive ``K``.
    """
    names: set[str] = set()
    k = 0
    for item in needs:
        m = _TOPK.match(item)
        if m:
            if int(m.group(1)) < 1:
                raise ValueError(f"{owner} declares {item!r}; K must be at least 1")
            names.add("topk")
            k = max(k, int(m.group(1)))
        elif item in SIGNAL_NAMES and item != "topk":
            names.add(item)
        else:
            raise ValueError(
                f"{owner} declares an unknown signal {item!r}; known: "
                + ", ".join("topk:K" if n == "topk" else n for n in SIGNAL_NAMES)
            )
    return SignalSpec(frozenset(names), k)


@dataclass
class History:
    """Per-position history of the active block, kept by the Decoder (reset at block start).

    Attributes:
        prev_confidence: ``(B, L)`` float32, the confidence of the previous step's proposal
            (0 at the first step of the block).
        prev_x0: ``(B, L)`` long, the previous step's proposal (``-1`` at the first step).
        committed_at: ``(B, L)`` long, the step (within the block) at which the position's
            current token was written; ``-1`` while it is masked, ``-2`` for a position
            that was already filled when the block started (never edited or remasked).
        revoked: ``(B, L)`` long, how often the position was remasked in this block.
        step: ``()`` long, the index of the current step within the block (a tensor, so a
            captured graph reads the live value).
        active: ``(B,)`` bool, rows that take part in the current step: rows with a masked
            position, and rows still refining (see
            [`refine_steps`][dlm_decode.interfaces.CommitPolicy.refine_steps]). A finished
            row is never changed again, so a batched row decodes as it would alone.
        post: ``(B,)`` long, steps each row has run since its block filled.
    """

    prev_confidence: torch.Tensor
    prev_x0: torch.Tensor
    committed_at: torch.Tensor
    revoked: torch.Tensor
    step: torch.Tensor
    active: torch.Tensor
    post: torch.Tensor

    @classmethod
    def empty(cls, batch_size: int, length: int, device: torch.device | str) -> History:
        """Fresh history buffers for ``(batch_size, length)`` on ``device``."""
        return cls(
            prev_confidence=torch.zeros((batch_size, length), device=device),
            prev_x0=torch.full((batch_size, length), -1, dtype=torch.long, device=device),
            committed_at=torch.full((batch_size, length), -1, dtype=torch.long, device=device),
            revoked=torch.zeros((batch_size, length), dtype=torch.long, device=device),
            step=torch.zeros((), dtype=torch.long, device=device),
            active=torch.zeros((batch_size,), dtype=torch.bool, device=device),
            post=torch.zeros((batch_size,), dtype=torch.long, device=device),
        )

    def reset(self, masked: torch.Tensor) -> None:
        """Start a block (in place).

        Args:
            masked: ``(B, L)`` bool, the block's masked positions at its start; the others
                were filled before the block and are marked ``-2`` in ``committed_at``.
        """
        self.prev_confidence.zero_()
        self.prev_x0.fill_(-1)
        self.committed_at.fill_(-1)
        self.committed_at.masked_fill_(~masked, -2)
        self.revoked.zero_()
        self.step.zero_()
        self.active.copy_(masked.any(-1))
        self.post.zero_()

    @property
    def editable(self) -> torch.Tensor:
        """``(B, L)`` bool, positions committed earlier in this block (``committed_at ≥ 0``):
        the only ones a decision may edit or remask."""
        return self.committed_at >= 0


#: Field of [`StepSignals`][dlm_decode.signals.StepSignals] → the signal that provides it.
_SIGNAL_FIELDS = {
    "current": "current",
    "entropy": "entropy",
    "top2": "top2",
    "topk_probs": "topk",
    "topk_ids": "topk",
    "logits": "logits",
    "uniform": "uniform",
    "history": "history",
}


@dataclass
class StepSignals:
    """The step's signals for the active block; only what the policy declared is present.

    ``x0``, ``confidence`` and ``block`` are always there; reading any other field that was not
    declared raises [`UndeclaredSignalError`][dlm_decode.signals.UndeclaredSignalError].
    See the module docstring for every field's shape and meaning.
    """

    x0: torch.Tensor
    confidence: torch.Tensor
    block: torch.Tensor
    mask_token_id: int
    declared: SignalSpec = field(default_factory=SignalSpec)
    owner: str = "the policy"
    _values: dict[str, Any] = field(default_factory=dict, repr=False)

    def __getattr__(self, name: str) -> Any:
        fields = _SIGNAL_FIELDS
        if name not in fields:
            raise AttributeError(name)
        signal = fields[name]
        if signal not in self.declared:
            decl = "topk:K" if signal == "topk" else signal
            raise UndeclaredSignalError(
                f"{self.owner} read the signal {name!r} but does not declare it; add "
                f"{decl!r} to its class attribute `needs`"
            )
        return self._values[name]

    def restricted(self, spec: SignalSpec, owner: str) -> StepSignals:
        """The same signals as seen by a policy that declared ``spec`` (for wrappers that
        compute the union for several policies)."""
        return StepSignals(
            self.x0, self.confidence, self.block, self.mask_token_id, spec, owner, self._values
        )


class Decision(NamedTuple):
    """What a v2 policy may return instead of a bare commit mask.

    The three sets are disjoint ``(B, L)`` bool masks over the active block:

    * ``commit``: masked positions to fill (with ``tokens``, default the proposals ``x0``);
    * ``edit``: positions committed earlier in this block to overwrite with ``tokens``;
    * ``remask``: positions committed earlier in this block to turn back into the mask.

    Prompt positions and earlier blocks are never touched. ``edit`` and ``remask`` need the
    policy to declare [`revokes`][dlm_decode.interfaces.CommitPolicy.revokes].

    Attributes:
        commit: ``(B, L)`` bool.
        edit: ``(B, L)`` bool, or ``None`` (nothing).
        remask: ``(B, L)`` bool, or ``None`` (nothing).
        tokens: ``(B, L)`` long tokens to write at ``commit`` and ``edit`` positions, or
            ``None`` for the proposals ``x0``.
    """

    commit: torch.Tensor
    edit: torch.Tensor | None = None
    remask: torch.Tensor | None = None
    tokens: torch.Tensor | None = None


def compute_signals(
    logits: torch.Tensor,
    block: torch.Tensor,
    mask_token_id: int,
    spec: SignalSpec,
    *,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    history: History | None = None,
    owner: str = "the policy",
) -> StepSignals:
    """Propose a token per position and compute the declared signals (tensor-only, no host
    sync).

    Args:
        logits: ``(B, L, V)`` the block's logits.
        block: ``(B, L)`` long, the block's tokens now (the mask id where masked).
        mask_token_id: the id excluded from proposals and from ``p``.
        spec: the declared signals.
        temperature: 0 → argmax; > 0 → Gumbel-max sampling at that temperature (float64
            noise); ``p`` and the confidences stay at temperature 1.
        generator: the random generator for sampling and ``uniform``.
        history: the block's history (handed over when ``history`` is declared).
        owner: the policy's name, for error messages.

    Returns:
        The [`StepSignals`][dlm_decode.signals.StepSignals].
    """
    lf = logits.float()  # (B, L, V)
    lf[..., mask_token_id] = float("-inf")
    lse = torch.logsumexp(lf, dim=-1, keepdim=True)  # (B, L, 1)
    if temperature > 0:
        u = torch.rand(lf.shape, dtype=torch.float64, device=lf.device, generator=generator)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))  # (B, L, V) float64
        x0 = (lf.double() / temperature + gumbel).argmax(-1)  # (B, L)
        top = lf.gather(-1, x0.unsqueeze(-1)).squeeze(-1)  # (B, L)
    else:
        top, x0 = lf.max(-1)  # (B, L)
    confidence = torch.exp(top - lse.squeeze(-1))  # (B, L) float32
    values: dict[str, Any] = {}
    if "current" in spec:
        cur = block.clamp(0, lf.shape[-1] - 1).unsqueeze(-1)  # (B, L, 1)
        p_cur = torch.exp(lf.gather(-1, cur).squeeze(-1) - lse.squeeze(-1))  # (B, L)
        values["current"] = torch.where(block == mask_token_id, 0.0, p_cur)
    if "entropy" in spec:
        logp = lf - lse  # (B, L, V), −inf at the mask id
        p = torch.exp(logp)
        values["entropy"] = -(p * torch.where(p > 0, logp, 0.0)).sum(-1)  # (B, L)
    if "top2" in spec or "topk" in spec:
        k = max(2 if "top2" in spec else 0, spec.topk)
        vals, ids = lf.topk(k, dim=-1)  # (B, L, k)
        probs = torch.exp(vals - lse)  # (B, L, k)
        if "top2" in spec:
            values["top2"] = probs[..., 1]
        if "topk" in spec:
            values["topk_probs"] = probs[..., : spec.topk]
            values["topk_ids"] = ids[..., : spec.topk]
    if "logits" in spec:
        values["logits"] = logits
    if "uniform" in spec:
        values["uniform"] = torch.rand(
            block.shape, dtype=torch.float32, device=block.device, generator=generator
        )
    if "history" in spec:
        values["history"] = history
    return StepSignals(x0, confidence, block.clone(), mask_token_id, spec, owner, values)
