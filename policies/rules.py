"""The built-in commit rules: ``fixed``, ``threshold``, ``factor``, ``frechet``,
``frechet_robust``.

Every rule works on the sorted profile of a row's masked confidences
(``c(1) ≥ c(2) ≥ …``) and commits the ``n`` most confident positions; see
``docs/concepts/rules.md`` for the formulas and a worked example.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from dlm_decode.frechet import count_true_prefix, frechet_gap, masked_ranks
from dlm_decode.interfaces import CountPolicy, NoParams, ProfileCriterion, StepState

__all__ = [
    "FactorParams",
    "FactorPolicy",
    "FixedParams",
    "FixedPolicy",
    "FixedScoredPolicy",
    "FrechetParams",
    "FrechetPolicy",
    "FrechetRobustParams",
    "FrechetRobustPolicy",
    "ThresholdParams",
    "ThresholdPolicy",
]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ThresholdParams(_Params):
    """Params of ``threshold``."""

    threshold: float = Field(0.9, gt=0.0, le=1.0, description="τ in (0, 1].")


class FactorParams(_Params):
    """Params of ``factor``."""

    factor: float = Field(0.75, gt=0.0, description="f > 0.")


class FrechetParams(_Params):
    """Params of ``frechet``."""

    margin: float = Field(0.25, ge=0.0, description="δ ≥ 0, the required margin.")


class FrechetRobustParams(_Params):
    """Params of ``frechet_robust``."""

    margin: float = Field(0.25, ge=0.0, description="δ ≥ 0, the required margin.")
    eta: float = Field(0.05, ge=0.0, lt=1.0, description="η in [0, 1), calibration slack.")


class FixedPolicy(CountPolicy):
    """LLaDA's schedule: the block's masked count split evenly over its steps.

    With ``M`` masked positions at block start and ``s`` steps per block, step ``i`` commits
    ``M // s`` tokens plus one more for the first ``M % s`` steps (LLaDA's
    ``get_num_transfer_tokens``), always at least one. Needs the decode config's ``steps``.
    """

    name: ClassVar[str] = "fixed"
    Params: ClassVar[type[BaseModel]] = NoParams
    requires: ClassVar[tuple[str, ...]] = ("steps",)

    def commit_count(
        self, sorted_conf: torch.Tensor, valid: torch.Tensor, state: StepState
    ) -> torch.Tensor:
        if state.steps_per_block is None:
            raise ValueError(
                "policy 'fixed' needs a step budget: set steps (total over all blocks), "
                "e.g. steps=gen_length for one token per step"
            )
        s = state.steps_per_block
        m0 = state.block_masked_at_start.to(valid.device)  # (B,)
        base, rem = m0 // s, m0 % s
        n = base + (state.step < rem).long()
        if state.step >= s - 1:  # the last scheduled step finishes the block
            n = valid.sum(-1)
        return n


class FixedParams(_Params):
    """Params of ``fixed`` (version 2)."""

    score: Literal["confidence", "margin", "entropy", "random"] = Field(
        "confidence",
        description="what orders the positions: p(x0) (LLaDA low_confidence), top-1 − top-2 "
        "(Dream topk_margin), lowest entropy (Dream entropy), or uniform noise (LLaDA random)",
    )


class FixedScoredPolicy(FixedPolicy):
    """LLaDA's schedule with a choice of what orders the positions: ``fixed`` version 2.

    The count per step is ``fixed``'s (the block's masked count split evenly over its
    steps); the positions are the best by ``score``: ``confidence`` (LLaDA
    ``low_confidence``, identical to ``fixed.v1``), ``margin`` (top-1 − top-2, Dream
    ``topk_margin``), ``entropy`` (lowest entropy first, Dream ``entropy``) or ``random``
    (LLaDA ``random``: uniform noise from the decode's seeded generator, so a batched row
    differs from the row decoded alone, as with sampling).
    """

    version: ClassVar[int] = 2
    Params: ClassVar[type[BaseModel]] = FixedParams

    @property
    def needs(self) -> tuple[str, ...]:  # type: ignore[override]
        """The signal the score reads (none for ``confidence``)."""
        return {"confidence": (), "margin": ("topk:2",), "entropy": ("entropy",)}.get(
            self.params.score, ("uniform",)
        )

    def select(
        self, confidence: torch.Tensor, masked: torch.Tensor, state: StepState
    ) -> torch.Tensor:
        score = self.params.score
        if score == "confidence":
            return super().select(confidence, masked, state)
        sig = state.signals
        if score == "margin":
            key = sig.topk_probs[..., 0] - sig.topk_probs[..., 1]
        elif score == "entropy":
            key = -sig.entropy
        else:
            key = sig.uniform
        ranks = masked_ranks(key, masked)  # (B, L)
        m = masked.sum(-1)  # (B,)
        n = self.commit_count(torch.zeros_like(confidence), ranks < m.unsqueeze(-1), state)
        n = torch.minimum(n.clamp(min=1), m)  # (B,)
        return (ranks < n.unsqueeze(-1)) & masked


class ThresholdPolicy(CountPolicy):
    """Commit every masked position with ``c ≥ τ``; if none, the single most confident."""

    name: ClassVar[str] = "threshold"
    Params: ClassVar[type[BaseModel]] = ThresholdParams
    capturable: ClassVar[bool] = True

    def criterion(self, sorted_conf: torch.Tensor) -> ProfileCriterion:
        """``c(n) ≥ τ``."""
        return ProfileCriterion("c(n)", sorted_conf, self.params.threshold, "τ", "at_least")

    def commit_count(
        self, sorted_conf: torch.Tensor, valid: torch.Tensor, state: StepState
    ) -> torch.Tensor:
        return count_true_prefix(sorted_conf >= self.params.threshold, valid)


class FactorPolicy(CountPolicy):
    """The largest ``n`` with ``(n + 1)(1 − c(n)) < f``; at least one.

    This is the rule as the Fast-dLLM paper writes it. (The public Fast-dLLM code commits
    all ``n`` positions when only the ``n``-th fails; that is not reproduced here.)
    """

    name: ClassVar[str] = "factor"
    Params: ClassVar[type[BaseModel]] = FactorParams
    capturable: ClassVar[bool] = True

    @classmethod
    def params_for_margin(cls, margin: float) -> dict[str, Any]:
        """``f = 1 − δ``: with equal confidences ``factor(1 − δ)`` is ``frechet(δ)``."""
        return {"factor": round(1.0 - margin, 12)}

    def criterion(self, sorted_conf: torch.Tensor) -> ProfileCriterion:
        """``(n + 1)(1 − c(n)) < f``."""
        n = torch.arange(1, sorted_conf.shape[-1] + 1, device=sorted_conf.device)
        values = (n + 1) * (1 - sorted_conf)  # (..., L)
        return ProfileCriterion("(n+1)(1−c(n))", values, self.params.factor, "f", "below")

    def commit_count(
        self, sorted_conf: torch.Tensor, valid: torch.Tensor, state: StepState
    ) -> torch.Tensor:
        return count_true_prefix(self.criterion(sorted_conf).passing(), valid)


class FrechetPolicy(CountPolicy):
    """Fast-dLLM++ Fréchet profile decoding: the largest ``n`` with ``G_n > δ``; at least one.

    ``G_n = max(0, Σ_{j≤n} c(j) − (n − 1)) − (1 − c(n))`` never increases in ``n``, so the
    count of prefixes that pass is the largest passing prefix.
    """

    name: ClassVar[str] = "frechet"
    Params: ClassVar[type[BaseModel]] = FrechetParams
    capturable: ClassVar[bool] = True

    @classmethod
    def params_for_margin(cls, margin: float) -> dict[str, Any]:
        """The margin itself: ``{"margin": δ}``."""
        return {"margin": float(margin)}

    def _margin_eta(self) -> tuple[float, float]:
        return self.params.margin, 0.0

    def criterion(self, sorted_conf: torch.Tensor) -> ProfileCriterion:
        """``G_n > δ`` (on ``max(0, c − η)`` for ``frechet_robust``)."""
        margin, eta = self._margin_eta()
        c = (sorted_conf - eta).clamp(min=0) if eta > 0 else sorted_conf
        return ProfileCriterion("G_n (Fréchet score)", frechet_gap(c), margin, "δ", "above")

    def commit_count(
        self, sorted_conf: torch.Tensor, valid: torch.Tensor, state: StepState
    ) -> torch.Tensor:
        return count_true_prefix(self.criterion(sorted_conf).passing(), valid)


class FrechetRobustPolicy(FrechetPolicy):
    """``frechet`` on calibration-discounted confidences ``max(0, c − η)``
    (Fast-dLLM++ appendix C); ``η = 0`` is ``frechet``."""

    name: ClassVar[str] = "frechet_robust"
    Params: ClassVar[type[BaseModel]] = FrechetRobustParams

    def _margin_eta(self) -> tuple[float, float]:
        return self.params.margin, self.params.eta


BUILTIN_POLICIES = (
    FixedPolicy,
    FixedScoredPolicy,
    ThresholdPolicy,
    FactorPolicy,
    FrechetPolicy,
    FrechetRobustPolicy,
)
