"""Counterfactual traces and commit audits: two views of a commit rule that only a
pluggable decoder can give.

* **Counterfactual trace.** One decode is driven by a real policy; at every step, every
  other policy is asked how many tokens *it* would commit on the very same confidences.
  One decode thus ranks every rule's aggressiveness on identical inputs.
  [`CounterfactualPolicy`][dlm_decode.ablate.counterfactual.CounterfactualPolicy] wraps the
  real policy (no change to the Decoder).
* **Commit audit.** At sampled steps, the set a policy commits in parallel is decoded again
  one token at a time from the same state (greedy, most confident first, a fresh full
  forward per token, no cache); the audit reports how often the parallel commit disagrees
  with the sequential one. That is a direct measurement of a rule's safety claim.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from dlm_decode.config import DecodeConfig
from dlm_decode.decoder import Decoder, GenerationResult, propose
from dlm_decode.interfaces import (
    Cache,
    CacheContext,
    CommitPolicy,
    CountPolicy,
    Model,
    StepState,
)

__all__ = [
    "AuditPolicy",
    "AuditResult",
    "CounterfactualPolicy",
    "CounterfactualTrace",
    "commit_audit",
    "counterfactual_trace",
    "resolve_policies",
]

PolicyArg = CommitPolicy | str | tuple[str, Mapping[str, Any]] | tuple[str, Mapping[str, Any], int]


def resolve_policies(
    policies: Mapping[str, PolicyArg] | Sequence[PolicyArg],
) -> dict[str, tuple[CommitPolicy, int | None]]:
    """Normalize policy arguments into ``label → (policy object, total steps or None)``.

    Args:
        policies: a mapping label → policy, or a sequence of policies; each policy is a
            ``CommitPolicy``, a name, ``(name, args)`` or ``(name, args, steps)``.

    Returns:
        Ordered ``label → (policy, steps)``.
    """
    from dlm_decode.ablate.config import policy_label
    from dlm_decode.api import get_policy

    def one(p: PolicyArg) -> tuple[str, CommitPolicy, int | None]:
        if isinstance(p, CommitPolicy):
            return policy_label(p.name, p.params.model_dump()), p, None
        if isinstance(p, str):
            return p, get_policy(p), None
        name, args = p[0], dict(p[1])
        steps = p[2] if len(p) > 2 else None  # type: ignore[misc]
        return policy_label(name, args, steps), get_policy(name, **args), steps

    out: dict[str, tuple[CommitPolicy, int | None]] = {}
    if isinstance(policies, Mapping):
        for label, p in policies.items():
            _, obj, steps = one(p)
            out[str(label)] = (obj, steps)
    else:
        for p in policies:
            label, obj, steps = one(p)
            out[label] = (obj, steps)
    return out


def _state_for(policy: CommitPolicy, state: StepState, steps: int | None, block: int) -> StepState:
    """The step state a policy sees: its own step budget when it needs one."""
    if "steps" not in getattr(policy, "requires", ()):
        return state
    if steps is not None:
        spb = steps // state.num_blocks
    elif state.steps_per_block is not None:
        spb = state.steps_per_block
    else:
        spb = block  # one token per step
    return dataclasses.replace(state, steps_per_block=spb)


def _count(
    policy: CommitPolicy, conf: torch.Tensor, masked: torch.Tensor, st: StepState
) -> torch.Tensor:
    """``(B,)`` tokens ``policy`` would commit; count policies skip building the mask."""
    if isinstance(policy, CountPolicy):
        return policy.counts(conf, masked, st)
    return (policy.select(conf, masked, st) & masked).sum(-1)


class _Delegating(CommitPolicy):
    """A policy wrapper that lets ``real`` decide and presents itself under ``real``'s key."""

    def __init__(self, real: CommitPolicy) -> None:
        super().__init__(real.params)
        self.real = real
        self.requires = tuple(getattr(real, "requires", ()))

    @property
    def key(self) -> str:
        """The real policy's key."""
        return self.real.key


class CounterfactualPolicy(_Delegating):
    """Delegates ``select`` to a real policy and records what the others would commit.

    The records stay on the device until :meth:`table` (no host sync inside ``select``).

    Args:
        real: the policy that decides.
        others: ``label → (policy, steps)``; ``steps`` is a total step budget for policies
            that need one (``fixed``), ``None`` → the decode's, or one token per step.
        block_length: the decode's block length (fallback step budget).
    """

    name: ClassVar[str] = "counterfactual"

    def __init__(
        self,
        real: CommitPolicy,
        others: Mapping[str, tuple[CommitPolicy, int | None]],
        block_length: int,
    ) -> None:
        super().__init__(real)
        self.others = dict(others)
        self.block_length = block_length
        # (block, step, masked (B,), counts (B, 1 + K))
        self.records: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []

    def select(
        self, confidence: torch.Tensor, masked: torch.Tensor, state: StepState
    ) -> torch.Tensor:
        commit = self.real.select(confidence, masked, state)  # (B, L)
        cols = [(commit & masked).sum(-1)]  # (B,)
        for pol, steps in self.others.values():
            st = _state_for(pol, state, steps, self.block_length)
            cols.append(_count(pol, confidence, masked, st))
        self.records.append((state.block_index, state.step, masked.sum(-1), torch.stack(cols, -1)))
        return commit

    def table(self) -> list[dict[str, Any]]:
        """One dict per (step, row): ``step_index``, ``block``, ``step``, ``row``,
        ``masked``, ``actual`` and one count per recorded policy label."""
        labels = list(self.others)
        out: list[dict[str, Any]] = []
        for i, (blk, step, masked, counts) in enumerate(self.records):
            m = masked.cpu().tolist()
            c = counts.cpu().tolist()
            for r in range(len(m)):
                if m[r] == 0:
                    continue
                row = {
                    "step_index": i,
                    "block": blk,
                    "step": step,
                    "row": r,
                    "masked": m[r],
                    "actual": c[r][0],
                }
                row.update({lab: c[r][k + 1] for k, lab in enumerate(labels)})
                out.append(row)
        return out


@dataclass
class CounterfactualTrace:
    """What :func:`counterfactual_trace` returns.

    Attributes:
        driver: label of the policy that decoded.
        labels: labels of the counterfactual policies (table columns).
        rows: per (step, prompt row): ``step_index``, ``block``, ``step``, ``row``,
            ``masked`` (masked positions before the commit), ``actual`` (what the driver
            committed) and one count per label.
        result: the driver's ``GenerationResult``.
    """

    driver: str
    labels: list[str]
    rows: list[dict[str, Any]]
    result: GenerationResult

    def mean_counts(self) -> dict[str, float]:
        """Mean tokens per step each policy would commit (``actual`` included)."""
        if not self.rows:
            return {}
        keys = ["actual", *self.labels]
        return {k: sum(r[k] for r in self.rows) / len(self.rows) for k in keys}

    def write_csv(self, path: str | Path) -> None:
        """Write :attr:`rows` as CSV."""
        cols = ["step_index", "block", "step", "row", "masked", "actual", *self.labels]
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(self.rows)


def counterfactual_trace(
    model: Model,
    prompts: torch.Tensor | Sequence[Sequence[int] | torch.Tensor],
    config: DecodeConfig,
    policies: Mapping[str, PolicyArg] | Sequence[PolicyArg],
) -> CounterfactualTrace:
    """Decode with ``config``'s policy and record, at every step, how many tokens each of
    ``policies`` would have committed on the same confidences.

    Args:
        model: the model.
        prompts: ``(B, P)`` ids or a list of prompts.
        config: the decode config; its policy drives the decode.
        policies: the counterfactual policies (see :func:`resolve_policies`).

    Returns:
        A :class:`CounterfactualTrace`; its ``actual`` column equals the decode's
        ``commit_counts``.

    Example:
        >>> tr = counterfactual_trace(model, [[1, 5, 9]], DecodeConfig(policy="frechet"),
        ...                           [("factor", {"factor": 0.75}),
        ...                            ("threshold", {"threshold": 0.9})])  # doctest: +SKIP
        >>> tr.mean_counts()  # doctest: +SKIP
    """
    from dlm_decode.ablate.config import policy_label
    from dlm_decode.api import get_policy

    real = get_policy(config.policy, **config.policy_args)
    wrapper = CounterfactualPolicy(real, resolve_policies(policies), config.block_length)
    res = Decoder(model, config, policy=wrapper).generate(prompts)
    return CounterfactualTrace(
        driver=policy_label(real.name, config.policy_args, config.steps),
        labels=list(wrapper.others),
        rows=wrapper.table(),
        result=res,
    )


# --------------------------------------------------------------------------------------
# Commit audit
# --------------------------------------------------------------------------------------


class _RecordingCache(Cache):
    """Wraps a cache and keeps the context, the current sequence and the last logits."""

    name: ClassVar[str] = "recording"

    def __init__(self, inner: Cache) -> None:
        super().__init__(inner.params)
        self.inner = inner
        self.ctx: CacheContext | None = None
        self.x: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.span = (0, 0)

    @property
    def key(self) -> str:
        return self.inner.key

    def setup(self, ctx: CacheContext, batch_size: int, total_length: int) -> None:
        self.ctx = ctx
        self.inner.setup(ctx, batch_size, total_length)

    def _keep(self, x: torch.Tensor, bs: int, be: int, logits: torch.Tensor) -> torch.Tensor:
        self.x, self.logits, self.span = x, logits, (bs, be)
        return logits

    def refresh(self, ctx: CacheContext, x: torch.Tensor, block_start: int, block_end: int):
        out = self.inner.refresh(ctx, x, block_start, block_end)
        return self._keep(x, block_start, block_end, out)

    def step(self, ctx: CacheContext, x: torch.Tensor, block_start: int, block_end: int):
        out = self.inner.step(ctx, x, block_start, block_end)
        return self._keep(x, block_start, block_end, out)


class AuditPolicy(_Delegating):
    """Delegates to a real policy; at sampled steps re-decodes its commit set sequentially.

    Args:
        real: the audited policy.
        recorder: the recording cache of the same decode.
        model: the model (for the fresh forwards).
        every: audit every ``every``-th step.
        max_steps: stop auditing after this many audited steps (``None`` → never).
    """

    name: ClassVar[str] = "audit"

    def __init__(
        self,
        real: CommitPolicy,
        recorder: _RecordingCache,
        model: Model,
        every: int = 1,
        max_steps: int | None = None,
    ) -> None:
        super().__init__(real)
        self.recorder = recorder
        self.model = model
        self.every = every
        self.max_steps = max_steps
        self.records: list[dict[str, Any]] = []
        self._seen = 0
        self._audited = 0

    def select(
        self, confidence: torch.Tensor, masked: torch.Tensor, state: StepState
    ) -> torch.Tensor:
        commit = self.real.select(confidence, masked, state) & masked  # (B, L)
        idx = self._seen
        self._seen += 1
        if idx % self.every or (self.max_steps is not None and self._audited >= self.max_steps):
            return commit
        self._audited += 1
        self._audit(commit, state)
        return commit

    @torch.no_grad()
    def _audit(self, commit: torch.Tensor, state: StepState) -> None:
        rec = self.recorder
        assert rec.x is not None and rec.logits is not None and rec.ctx is not None
        bs, be = rec.span
        mask_id = self.model.mask_token_id
        x0_par, _ = propose(rec.logits, mask_id)  # (B, L) parallel (greedy) proposals
        x_seq = rec.x.clone()  # (B, T) state before the commit
        remaining = commit.clone()  # (B, L)
        seq_tok = torch.full_like(x0_par, -1)  # (B, L)
        rows = torch.arange(commit.shape[0], device=commit.device)  # (B,)
        n_max = int(commit.sum(-1).max())
        for _ in range(n_max):
            logits = self.model.logits(x_seq, rec.ctx.attention_mask)[:, bs:be]  # (B, L, V)
            x0, conf = propose(logits, mask_id)  # (B, L) ×2
            conf = torch.where(remaining, conf, torch.full_like(conf, -1.0))
            j = conf.argmax(-1)  # (B,)
            live = remaining.any(-1)  # (B,)
            tok = x0[rows, j]  # (B,)
            seq_tok[rows[live], j[live]] = tok[live]
            x_seq[rows[live], bs + j[live]] = tok[live]
            remaining[rows[live], j[live]] = False
        n = commit.sum(-1).tolist()
        bad = (commit & (seq_tok != x0_par)).sum(-1).tolist()
        for r in range(len(n)):
            if n[r]:
                self.records.append(
                    {
                        "block": state.block_index,
                        "step": state.step,
                        "row": r,
                        "committed": n[r],
                        "mismatched": bad[r],
                    }
                )


@dataclass
class AuditResult:
    """What :func:`commit_audit` returns.

    Attributes:
        policy: label of the audited policy.
        records: per audited (step, row): ``block``, ``step``, ``row``, ``committed``
            (tokens committed in parallel) and ``mismatched`` (of those, how many differ from
            the one-at-a-time decode).
        result: the decode's ``GenerationResult``.
    """

    policy: str
    records: list[dict[str, Any]] = field(default_factory=list)
    result: GenerationResult | None = None

    def summary(self) -> dict[str, Any]:
        """Audited steps, parallel steps (≥ 2 tokens), disagreement rates.

        ``step_disagreement`` is the fraction of parallel steps where at least one token
        differs; ``token_disagreement`` the fraction of parallel-committed tokens that
        differ. Single-token steps are counted apart (``single_disagreement``): there the
        only difference is a fresh forward versus the decode's own.
        """
        par = [r for r in self.records if r["committed"] >= 2]
        single = [r for r in self.records if r["committed"] == 1]
        toks = sum(r["committed"] for r in par)
        return {
            "policy": self.policy,
            "audited_steps": len(self.records),
            "parallel_steps": len(par),
            "mean_parallel_commit": toks / len(par) if par else 0.0,
            "step_disagreement": sum(r["mismatched"] > 0 for r in par) / len(par) if par else 0.0,
            "token_disagreement": sum(r["mismatched"] for r in par) / toks if toks else 0.0,
            "single_disagreement": sum(r["mismatched"] > 0 for r in single) / len(single)
            if single
            else 0.0,
        }


def commit_audit(
    model: Model,
    prompts: torch.Tensor | Sequence[Sequence[int] | torch.Tensor],
    config: DecodeConfig,
    *,
    every: int = 1,
    max_steps: int | None = None,
) -> AuditResult:
    """Decode with ``config`` and audit its parallel commits against one-at-a-time decoding.

    For every audited step, the positions the policy commits are decoded again from the
    same state, one token per fresh full forward (no cache), most confident first, greedily;
    a parallel token that differs from its sequential counterpart is a disagreement. Meant
    for small models (each audited step costs as many full forwards as it commits tokens).

    Args:
        model: the model.
        prompts: ``(B, P)`` ids or a list of prompts.
        config: the decode config (greedy: the audit compares argmax proposals).
        every: audit every ``every``-th step.
        max_steps: at most this many audited steps.

    Returns:
        An :class:`AuditResult`.
    """
    from dlm_decode.ablate.config import policy_label
    from dlm_decode.api import get_cache, get_policy

    real = get_policy(config.policy, **config.policy_args)
    recorder = _RecordingCache(get_cache(config.cache, **config.cache_args))
    pol = AuditPolicy(real, recorder, model, every=every, max_steps=max_steps)
    res = Decoder(model, config, policy=pol, cache=recorder).generate(prompts)
    label = policy_label(real.name, config.policy_args, config.steps)
    return AuditResult(policy=label, records=pol.records, result=res)
