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

from dlm_decode.ablate.config import Setting, setting_label
from dlm_decode.config import DecodeConfig, PolicyRef
from dlm_decode.decoder import Decoder, GenerationResult, propose
from dlm_decode.interfaces import (
    Cache,
    CacheContext,
    CommitPolicy,
    CountPolicy,
    Model,
    StepState,
)
from dlm_decode.settings import resolve, resolve_plugin
from dlm_decode.signals import Decision, SignalSpec, parse_needs

__all__ = [
    "AuditPolicy",
    "AuditResult",
    "CounterfactualPolicy",
    "CounterfactualTrace",
    "PolicyArg",
    "commit_audit",
    "counterfactual_trace",
    "resolve_policies",
]

PolicyArg = str | PolicyRef | Setting | CommitPolicy
"""What names a counterfactual or audited policy: a name (``"frechet"``,
``"frechet:margin=0.2"``), a [`PolicyRef`][dlm_decode.config.PolicyRef], a
[`Setting`][dlm_decode.ablate.config.Setting] (a reference with a step budget) or a ready
[`CommitPolicy`][dlm_decode.interfaces.CommitPolicy]."""


def resolve_policies(
    policies: Mapping[str, PolicyArg] | Sequence[PolicyArg],
) -> dict[str, tuple[CommitPolicy, int | None]]:
    """Normalize policy arguments into ``label → (policy object, total steps or None)``.

    Every name goes through [`resolve_plugin`][dlm_decode.settings.resolve_plugin]; the
    default label is the resolved reference's label (every argument, plus ``steps``).

    Args:
        policies: a mapping label → policy, or a sequence of policies (see
            [`PolicyArg`][dlm_decode.ablate.counterfactual.PolicyArg]).

    Returns:
        Ordered ``label → (policy, steps)``.
    """

    def one(p: PolicyArg) -> tuple[str, CommitPolicy, int | None]:
        setting = p if isinstance(p, Setting) else None
        spec: Any = setting.policy if setting is not None else p
        ref, obj = resolve_plugin(spec, "policy")
        steps = setting.steps if setting is not None else None
        return setting_label(ref, steps), obj, steps

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


def _commits(out: torch.Tensor | Decision) -> torch.Tensor:
    """The commit mask of a v1 mask or a v2 decision."""
    return out.commit if isinstance(out, Decision) else out


def _count(
    policy: CommitPolicy, conf: torch.Tensor, masked: torch.Tensor, st: StepState
) -> torch.Tensor:
    """``(B,)`` tokens ``policy`` would commit; count policies skip building the mask."""
    if isinstance(policy, CountPolicy) and type(policy).select is CountPolicy.select:
        return policy.counts(conf, masked, st)
    return (_commits(policy.select(conf, masked, st)) & masked).sum(-1)


class _Delegating(CommitPolicy):
    """A policy wrapper that lets ``real`` decide and presents itself under ``real``'s key.

    It also runs ``others`` on every step (contract v2): the Decoder computes the union of
    every member's declared signals, and each member sees only its own declaration and its
    own tensor state.
    """

    def __init__(self, real: CommitPolicy, others: Sequence[CommitPolicy] = ()) -> None:
        super().__init__(real.params)
        self.real = real
        self.members = [real, *others]
        self.requires = tuple(getattr(real, "requires", ()))
        self.revokes = real.revokes  # type: ignore[misc]
        self.refine_steps = real.refine_steps
        self._specs = [parse_needs(p.needs, owner=f"policy {p.key}") for p in self.members]
        self._states: list[dict[str, torch.Tensor]] = []

    @property
    def key(self) -> str:
        """The real policy's key."""
        return self.real.key

    @property
    def needs(self) -> tuple[str, ...]:  # type: ignore[override]
        """The union of every member's declared signals."""
        spec = SignalSpec()
        for s in self._specs:
            spec = spec | s
        names = [n for n in spec.names if n != "topk"]
        return (*names, *([f"topk:{spec.topk}"] if spec.topk else []))

    def step_budget(self, block_length: int) -> int:
        """The real policy's budget."""
        return self.real.step_budget(block_length)

    def make_state(
        self, batch_size: int, block_length: int, vocab_size: int, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Every member's tensors, under ``"<member index>/<name>"``."""
        out: dict[str, torch.Tensor] = {}
        for i, p in enumerate(self.members):
            for k, t in p.make_state(batch_size, block_length, vocab_size, device).items():
                out[f"{i}/{k}"] = t
        return out

    def _member_state(self, i: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        prefix = f"{i}/"
        return {k[len(prefix) :]: t for k, t in state.items() if k.startswith(prefix)}

    def reset_state(self, state: dict[str, torch.Tensor], masked: torch.Tensor) -> None:
        """Each member resets its own tensors."""
        for i, p in enumerate(self.members):
            p.reset_state(self._member_state(i, state), masked)

    def _member_step(self, i: int, state: StepState) -> StepState:
        """The step state member ``i`` sees: its own signals and tensors."""
        sig = state.signals
        if sig is not None:
            sig = sig.restricted(self._specs[i], f"policy {self.members[i].key}")
        own = self._member_state(i, state.policy_state or {})
        return dataclasses.replace(state, signals=sig, policy_state=own)


class CounterfactualPolicy(_Delegating):
    """Delegates ``select`` to a real policy and records what the others would commit.

    The records stay on the device until
    [`table`][dlm_decode.ablate.counterfactual.CounterfactualPolicy.table] (no host sync inside
    ``select``).

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
        super().__init__(real, [p for p, _ in others.values()])
        self.others = dict(others)
        self.block_length = block_length
        # (block, step, masked (B,), counts (B, 1 + K))
        self.records: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []

    def select(
        self, confidence: torch.Tensor, masked: torch.Tensor, state: StepState
    ) -> torch.Tensor | Decision:
        out = self.real.select(confidence, masked, self._member_step(0, state))
        cols = [(_commits(out) & masked).sum(-1)]  # (B,)
        for i, (pol, steps) in enumerate(self.others.values(), start=1):
            st = _state_for(pol, self._member_step(i, state), steps, self.block_length)
            cols.append(_count(pol, confidence, masked, st))
        self.records.append((state.block_index, state.step, masked.sum(-1), torch.stack(cols, -1)))
        return out

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
    """What [`counterfactual_trace`][dlm_decode.ablate.counterfactual.counterfactual_trace] returns.

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
        """Write ``rows`` as CSV."""
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
        policies: the counterfactual policies (see
            [`resolve_policies`][dlm_decode.ablate.counterfactual.resolve_policies]).

    Returns:
        A [`CounterfactualTrace`][dlm_decode.ablate.counterfactual.CounterfactualTrace]; its
        ``actual`` column equals the decode's
        ``commit_counts``.

    Example:
        >>> import dlm_decode
        >>> model = dlm_decode.load_model("tiny")
        >>> ids = model.tokenizer("sort: 5143132214512231\\n")["input_ids"]
        >>> cfg = DecodeConfig(policy="frechet", gen_length=32, block_length=16)
        >>> tr = counterfactual_trace(model, [ids], cfg, ["factor", "threshold:threshold=0.5"])
        >>> sorted(tr.mean_counts())
        ['actual', 'factor(factor=0.75)', 'threshold(threshold=0.5)']
    """
    settings = resolve(config)
    wrapper = CounterfactualPolicy(settings.policy, resolve_policies(policies), config.block_length)
    res = Decoder(model, settings.config, policy=wrapper).generate(prompts)
    return CounterfactualTrace(
        driver=setting_label(settings.policy_ref, settings.config.steps),
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
    ) -> torch.Tensor | Decision:
        out = self.real.select(confidence, masked, self._member_step(0, state))
        commit = _commits(out) & masked  # (B, L)
        idx = self._seen
        self._seen += 1
        if idx % self.every or (self.max_steps is not None and self._audited >= self.max_steps):
            return out
        self._audited += 1
        self._audit(commit, state)
        return out

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
    """What [`commit_audit`][dlm_decode.ablate.counterfactual.commit_audit] returns.

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
        An [`AuditResult`][dlm_decode.ablate.counterfactual.AuditResult].
    """
    settings = resolve(config)
    recorder = _RecordingCache(settings.cache)
    pol = AuditPolicy(settings.policy, recorder, model, every=every, max_steps=max_steps)
    res = Decoder(model, settings.config, policy=pol, cache=recorder).generate(prompts)
    label = setting_label(settings.policy_ref, settings.config.steps)
    return AuditResult(policy=label, records=pol.records, result=res)
