"""The field's commit policies on contract v2: rules that read more than ``p(x0)``, keep
state across steps, or revoke what they committed.

* ``margin`` — commit where the top-1 − top-2 probability gap is at least τ;
* ``eb`` — the entropy-bounded sampler (Ben-Hamu et al. 2025, arXiv 2505.24857);
* ``klass`` — KL-adaptive stability sampling (Kim et al. 2025, arXiv 2511.05664);
* ``credit`` — dInfer's credit decoding (``CreditThresholdParallelDecoder``);
* ``wino`` — wide-in, narrow-out draft-and-verify (Hong et al. 2025, arXiv 2507.18578);
* ``joint_threshold`` — LLaDA 2.1's mask-to-token threshold with token editing
  (arXiv 2602.08676).

Each rule is written out with its formula in ``docs/concepts/rules-v2.md``. Every one is
tensor-only and declares ``capturable``: the fast path captures its select stage, signals
and state updates included.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from dlm_decode.frechet import commit_best_if_none, masked_ranks
from dlm_decode.interfaces import CommitPolicy, StepState
from dlm_decode.signals import Decision

__all__ = [
    "CreditParams",
    "CreditPolicy",
    "EBParams",
    "EBPolicy",
    "JointThresholdParams",
    "JointThresholdPolicy",
    "KLASSParams",
    "KLASSPolicy",
    "MarginParams",
    "MarginPolicy",
    "WinoParams",
    "WinoPolicy",
]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _log_probs(logits: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """``(B, L, V)`` float32 log-probabilities with the mask token excluded (as the
    Decoder's ``p``)."""
    lf = logits.float()
    lf[..., mask_token_id] = float("-inf")
    return torch.log_softmax(lf, dim=-1)


# --------------------------------------------------------------------------------------
# margin
# --------------------------------------------------------------------------------------


class MarginParams(_Params):
    """Params of ``margin``."""

    threshold: float = Field(0.8, ge=0.0, le=1.0, description="τ: the top-1 − top-2 gap.")


class MarginPolicy(CommitPolicy):
    """Commit every masked position whose top-1 − top-2 probability gap is at least τ; if
    none, the single position with the largest gap.

    The gap is Dream's ``topk_margin`` score (Dream uses it to rank positions under a step
    schedule, arXiv 2502.06768); this is its threshold form, by analogy with ``threshold``.
    """

    name: ClassVar[str] = "margin"
    Params: ClassVar[type[BaseModel]] = MarginParams
    needs: ClassVar[tuple[str, ...]] = ("topk:2",)
    capturable: ClassVar[bool] = True

    def select(
        self, confidence: torch.Tensor, masked: torch.Tensor, state: StepState
    ) -> torch.Tensor:
        probs = state.signals.topk_probs  # (B, L, 2)
        gap = probs[..., 0] - probs[..., 1]  # (B, L)
        return commit_best_if_none(gap >= self.params.threshold, gap, masked)


# --------------------------------------------------------------------------------------
# eb
# --------------------------------------------------------------------------------------


class EBParams(_Params):
    """Params of ``eb``."""

    gamma: float = Field(0.1, ge=0.0, description="γ ≥ 0: the entropy budget (nats).")
    proxy: Literal["entropy", "confidence", "margin"] = Field(
        "entropy", description="the error proxy that orders the positions"
    )


class EBPolicy(CommitPolicy):
    """The entropy-bounded sampler: order the masked positions by an error proxy (lowest
    entropy first, by default) and commit the largest prefix ``U`` with
    ``Σ_{j∈U} H_j − max_{j∈U} H_j ≤ γ``; at least one.

    Ben-Hamu, Gat, Severo, Nolte, Karrer (2025), "Accelerated Sampling from Masked Diffusion
    Models via Entropy Bounded Unmasking", arXiv 2505.24857. ``γ = 0`` commits one token
    per step (unless entropies are exactly 0).
    """

    name: ClassVar[str] = "eb"
    Params: ClassVar[type[BaseModel]] = EBParams
    capturable: ClassVar[bool] = True

    @property
    def needs(self) -> tuple[str, ...]:  # type: ignore[override]
        """``entropy``, plus ``topk:2`` for the margin proxy."""
        return ("entropy", "topk:2") if self.params.proxy == "margin" else ("entropy",)

    def select(
        self, confidence: torch.Tensor, masked: torch.Tensor, state: StepState
    ) -> torch.Tensor:
        sig = state.signals
        ent = sig.entropy  # (B, L)
        if self.params.proxy == "entropy":
            key = -ent
        elif self.params.proxy == "confidence":
            key = sig.confidence
        else:
            key = sig.topk_probs[..., 0] - sig.topk_probs[..., 1]
        ranks = masked_ranks(key, masked)  # (B, L), best first
        order = ranks.argsort(-1)  # (B, L) position of the rank-r element
        h = ent.gather(-1, order)  # (B, L) entropies in proxy order
        valid = torch.arange(h.shape[-1], device=h.device) < masked.sum(-1, keepdim=True)
        h = torch.where(valid, h, 0.0)
        bound = h.cumsum(-1) - h.cummax(-1).values  # (B, L), non-decreasing along the order
        n = ((bound <= self.params.gamma) & valid).sum(-1).clamp(min=1)  # (B,)
        return (ranks < n.unsqueeze(-1)) & masked


# --------------------------------------------------------------------------------------
# klass
# --------------------------------------------------------------------------------------


class KLASSParams(_Params):
    """Params of ``klass``."""

    conf_threshold: float = Field(0.9, ge=0.0, le=1.0, description="τ: confidence needed.")
    kl_threshold: float = Field(0.01, gt=0.0, description="ε: KL below which a position is stable.")
    history_length: int = Field(2, ge=1, description="h: consecutive stable steps needed.")


class KLASSPolicy(CommitPolicy):
    """KL-adaptive stability sampling: commit every masked position whose last ``h``
    step-to-step divergences ``KL(p_t ‖ p_{t−1})`` are all below ε and whose confidence
    exceeds τ; if none, the single most confident masked position.

    Kim, Hong, Jung, Park, Yun (2025), "KLASS", arXiv 2511.05664. The previous step's
    distribution and the KL history are the policy's own tensor state, reset at every block
    start (the authors' LLaDA code carries them across blocks); the first step of a block
    has no previous distribution, so no position is stable before step ``h``.
    """

    name: ClassVar[str] = "klass"
    Params: ClassVar[type[BaseModel]] = KLASSParams
    needs: ClassVar[tuple[str, ...]] = ("logits",)
    capturable: ClassVar[bool] = True

    def make_state(
        self, batch_size: int, block_length: int, vocab_size: int, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """``prev_logp`` ``(B, L, V)``, ``kl`` ``(B, L, h)`` and the step counter ``seen``."""
        b, n, h = batch_size, block_length, self.params.history_length
        return {
            "prev_logp": torch.zeros((b, n, vocab_size), device=device),
            "kl": torch.full((b, n, h), float("inf"), device=device),
            "seen": torch.zeros((), dtype=torch.long, device=device),
        }

    def reset_state(self, state: dict[str, torch.Tensor], masked: torch.Tensor) -> None:
        """No history at a block's start: every KL is infinite."""
        state["prev_logp"].zero_()
        state["kl"].fill_(float("inf"))
        state["seen"].zero_()

    def select(
        self, confidence: torch.Tensor, masked: torch.Tensor, state: StepState
    ) -> torch.Tensor:
        st, mask_id = state.policy_state, state.signals.mask_token_id
        logp = _log_probs(state.signals.logits, mask_id)  # (B, L, V)
        p = logp.exp()
        diff = torch.where(p > 0, logp - st["prev_logp"], 0.0)
        kl = (p * diff).sum(-1)  # (B, L)
        kl = torch.where(st["seen"] > 0, kl, float("inf"))
        st["kl"].copy_(torch.cat([st["kl"][..., 1:], kl.unsqueeze(-1)], dim=-1))
        st["prev_logp"].copy_(logp)
        st["seen"].add_(1)
        stable = (st["kl"] < self.params.kl_threshold).all(-1)  # (B, L)
        ready = stable & (confidence > self.params.conf_threshold)
        return commit_best_if_none(ready, confidence, masked)


# --------------------------------------------------------------------------------------
# credit
# --------------------------------------------------------------------------------------


class CreditParams(_Params):
    """Params of ``credit`` (dInfer's names and defaults)."""

    threshold: float = Field(0.9, gt=0.0, le=1.0, description="τ of the threshold rule.")
    credit_alpha: float = Field(0.7, ge=0.0, description="α: weight of the credit in logits.")
    boost_gamma: float = Field(0.2, gt=0.0, description="γ: credit added is p₁^γ.")
    decay_beta: float = Field(0.8, ge=0.0, le=1.0, description="β: per-step credit decay.")


class CreditPolicy(CommitPolicy):
    """dInfer's credit decoding: a running per-block credit ``C[i, v]`` for the token each
    position keeps predicting, fused into the logits before a threshold rule.

    Each step: ``C ← β·C`` (not at the block's first step); ``C[i, v₁(i)] += p₁(i)^γ`` at
    masked positions, with ``v₁, p₁`` the top-1 token and probability; fused logits
    ``l' = l + α·ln(1 + C)``; commit the masked positions whose fused confidence is at least
    ``min(τ, max c' − 10⁻⁵)`` (all above τ, else the best), writing the fused argmax.
    Source: inclusionAI/dInfer, ``CreditThresholdParallelDecoder`` in
    ``python/dinfer/decoding/parallel_strategy.py``.
    """

    name: ClassVar[str] = "credit"
    Params: ClassVar[type[BaseModel]] = CreditParams
    needs: ClassVar[tuple[str, ...]] = ("logits",)
    capturable: ClassVar[bool] = True

    def make_state(
        self, batch_size: int, block_length: int, vocab_size: int, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """The credit ``C`` ``(B, L, V)`` float32 and the step counter ``seen``."""
        return {
            "credit": torch.zeros((batch_size, block_length, vocab_size), device=device),
            "seen": torch.zeros((), dtype=torch.long, device=device),
        }

    def select(self, confidence: torch.Tensor, masked: torch.Tensor, state: StepState) -> Decision:
        prm, st, mask_id = self.params, state.policy_state, state.signals.mask_token_id
        credit = st["credit"]  # (B, L, V)
        credit.mul_(torch.where(st["seen"] > 0, prm.decay_beta, 1.0))
        st["seen"].add_(1)
        logp = _log_probs(state.signals.logits, mask_id)  # (B, L, V)
        p1, v1 = logp.max(-1)  # (B, L)
        boost = torch.where(masked, p1.exp().pow(prm.boost_gamma), 0.0)  # (B, L)
        credit.scatter_add_(-1, v1.unsqueeze(-1), boost.unsqueeze(-1))
        fused = state.signals.logits.float() + prm.credit_alpha * torch.log1p(credit)
        fused[..., mask_id] = float("-inf")
        top, tokens = fused.max(-1)  # (B, L)
        conf = torch.exp(top - torch.logsumexp(fused, dim=-1))  # (B, L)
        best = torch.where(masked, conf, float("-inf")).max(-1, keepdim=True).values  # (B, 1)
        thr = torch.clamp(best - 1e-5, max=prm.threshold)
        return Decision(commit=masked & (conf >= thr), tokens=tokens)


# --------------------------------------------------------------------------------------
# wino
# --------------------------------------------------------------------------------------


class WinoParams(_Params):
    """Params of ``wino``."""

    draft_threshold: float = Field(0.6, ge=0.0, le=1.0, description="τ₁: wide-in draft.")
    verify_threshold: float = Field(0.9, ge=0.0, le=1.0, description="τ₂: narrow-out check.")


class WinoPolicy(CommitPolicy):
    """Wide-in, narrow-out: draft generously, then revoke committed tokens of the block
    that the model no longer believes.

    Each step: draft the masked positions with ``c > τ₁`` (at most
    ``min(max(⌊0.7·m⌋, 5), 20)`` of the most confident, ``m`` masked; at least the best);
    when more than one is drafted, remask the tokens committed in earlier steps of the block
    whose current probability is below ``τ₂``, at most one fewer than the previous step
    accepted (the lowest first). Hong, Yu, Ye, Huang, Zheng, Zhang, Wang, Yao (2025), "Wide-In,
    Narrow-Out", arXiv 2507.18578, and its code (Feng-Hong/WINO-DLLM, ``decoding_wino``),
    whose caps (0.7, 5, 20, a first previous acceptance of 30) are kept. The authors read a
    committed token's probability from a shadow copy of the block with that token hidden;
    here it is the probability of the token at its own position in the same forward (the
    ``current`` signal).
    """

    name: ClassVar[str] = "wino"
    Params: ClassVar[type[BaseModel]] = WinoParams
    needs: ClassVar[tuple[str, ...]] = ("current", "history")
    revokes: ClassVar[bool] = True
    capturable: ClassVar[bool] = True

    def make_state(
        self, batch_size: int, block_length: int, vocab_size: int, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """``last_accept`` ``(B,)``: how many the previous step accepted."""
        return {"last_accept": torch.full((batch_size,), 30, dtype=torch.long, device=device)}

    def reset_state(self, state: dict[str, torch.Tensor], masked: torch.Tensor) -> None:
        """A block starts with the authors' first previous acceptance, 30."""
        state["last_accept"].fill_(30)

    def select(self, confidence: torch.Tensor, masked: torch.Tensor, state: StepState) -> Decision:
        sig, prm, st = state.signals, self.params, state.policy_state
        m = masked.sum(-1, keepdim=True)  # (B, 1)
        cap = torch.clamp((7 * m) // 10, min=5, max=20)  # (B, 1) ⌊0.7 m⌋ in [5, 20]
        ranks = masked_ranks(confidence, masked)  # (B, L)
        draft = masked & (confidence > prm.draft_threshold) & (ranks < cap)
        draft = commit_best_if_none(draft, confidence, masked)
        n_draft = draft.sum(-1, keepdim=True)  # (B, 1)
        editable = sig.history.editable
        low = editable & (sig.current < prm.verify_threshold) & (n_draft > 1)
        keep = st["last_accept"].unsqueeze(-1) - 1  # (B, 1)
        low_ranks = masked_ranks(sig.current, low, descending=False)
        n_low = low.sum(-1, keepdim=True)
        remask = low & ((n_low < keep + 1) | (low_ranks < keep))
        st["last_accept"].copy_(
            torch.where(m.squeeze(-1) > 0, n_draft.squeeze(-1), st["last_accept"])
        )
        return Decision(commit=draft, remask=remask)


# --------------------------------------------------------------------------------------
# joint_threshold
# --------------------------------------------------------------------------------------


class JointThresholdParams(_Params):
    """Params of ``joint_threshold`` (LLaDA 2.1's Q-mode values by default)."""

    threshold: float = Field(0.7, ge=0.0, le=1.0, description="τ_mask: mask → token.")
    edit_threshold: float = Field(0.5, ge=0.0, le=1.0, description="τ_edit: token → token.")
    max_post_steps: int = Field(16, ge=0, description="edit-only steps after a block fills.")


class JointThresholdPolicy(CommitPolicy):
    """LLaDA 2.1's joint threshold: mask-to-token commits plus token-to-token edits.

    With ``v_i = argmax p_i``: commit the masked positions with ``p(v_i) > τ_mask`` (at
    least the most confident one), and edit every position committed earlier in the block
    whose token differs from ``v_i`` while ``p(v_i) > τ_edit``. After the block fills, up
    to ``max_post_steps`` edit-only steps run while edits keep changing it. LLaDA 2.1
    technical report (arXiv 2602.08676), §2 eqs. 1–3; the defaults are its Q mode
    (τ_mask 0.7, τ_edit 0.5) as quoted from the model card.
    """

    name: ClassVar[str] = "joint_threshold"
    Params: ClassVar[type[BaseModel]] = JointThresholdParams
    needs: ClassVar[tuple[str, ...]] = ("history",)
    revokes: ClassVar[bool] = True
    capturable: ClassVar[bool] = True

    @property
    def refine_steps(self) -> int:  # type: ignore[override]
        """``max_post_steps``."""
        return self.params.max_post_steps

    def select(self, confidence: torch.Tensor, masked: torch.Tensor, state: StepState) -> Decision:
        sig, prm = state.signals, self.params
        commit = commit_best_if_none(confidence > prm.threshold, confidence, masked)
        edit = sig.history.editable & (sig.x0 != sig.block) & (confidence > prm.edit_threshold)
        return Decision(commit=commit, edit=edit)


FAMILY_POLICIES: tuple[type[CommitPolicy], ...] = (
    MarginPolicy,
    EBPolicy,
    KLASSPolicy,
    CreditPolicy,
    WinoPolicy,
    JointThresholdPolicy,
)
"""The contract-v2 built-ins, in registration order."""
