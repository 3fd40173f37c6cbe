"""Policy contract v2: signals, history, decisions (commit / edit / remask), policy state,
refinement and the step budget, and every v2 built-in against a slow per-row reference.

The references drive a scripted model (canned logits per block and step, as llm's
``MockModel`` does for text) through the real Decoder, and simulate the same decode one row
at a time in plain Python (float64 lists, no tensors). A comparison that lands within 1e-6
of a threshold or of another value (a tie included) is rejected by Hypothesis
(``assume``), so equality is exact on the inputs that are kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import dlm_decode
from dlm_decode.decoder import Decoder, PolicyContractError
from dlm_decode.fast import FastDecoder
from dlm_decode.interfaces import CommitPolicy, KVBuffer, Model, StepState
from dlm_decode.signals import Decision, UndeclaredSignalError, compute_signals, parse_needs

V = 6  # vocabulary of the scripted model; the mask id is the last one
MASK = V - 1
L = 6  # block length
BLOCKS = 2


class ScriptedModel(Model):
    """Returns canned logits: ``script[block][step]`` ``(B, L, V)`` for the block whose rows
    are asked for (the step is counted per block)."""

    name: ClassVar[str] = "scripted"

    def __init__(self, script: list[list[torch.Tensor]], prompt_length: int) -> None:
        self.script = script
        self.prompt_length = prompt_length
        self.mask_token_id = MASK
        self.eos_token_ids = ()
        self.pad_token_id = 0
        self.vocab_size = V
        self.max_length = 1024
        self.calls: dict[int, int] = {}

    @classmethod
    def from_pretrained(cls, path: str, **kw: Any) -> Model:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float64

    def new_kv(self, batch_size: int, max_length: int) -> KVBuffer:
        raise NotImplementedError("the scripted model runs with cache='none'")

    def forward(self, ids: torch.Tensor, *, logits_rows=None, **kw: Any) -> torch.Tensor:
        lo, _ = logits_rows
        block = (lo - self.prompt_length) // L
        k = self.calls.get(block, 0)
        self.calls[block] = k + 1
        steps = self.script[block]
        return steps[min(k, len(steps) - 1)].clone()


# --------------------------------------------------------------------------------------
# Plain-Python references
# --------------------------------------------------------------------------------------


class Gap:
    """Records how close every comparison came to flipping."""

    def __init__(self) -> None:
        self.min = math.inf

    def note(self, a: float, b: float) -> None:
        # Ties count too: values from permuted logits tie in float64 but not always in
        # float32 (the sums run in another order), so a tie is a near-flip.
        self.min = min(self.min, abs(a - b))

    def gt(self, a: float, b: float) -> bool:
        self.note(a, b)
        return a > b

    def ge(self, a: float, b: float) -> bool:
        self.note(a, b)
        return a >= b


def probs(logits: list[float]) -> list[float]:
    """Softmax with the mask token excluded, float64."""
    m = max(v for i, v in enumerate(logits) if i != MASK)
    e = [0.0 if i == MASK else math.exp(v - m) for i, v in enumerate(logits)]
    z = sum(e)
    return [x / z for x in e]


def argmax(xs: list[float], gap: Gap) -> int:
    """The first index of the largest value (as ``torch.max``); the logits are integers, so
    the float32 and float64 argmax agree exactly."""
    best = 0
    for i in range(1, len(xs)):
        if xs[i] > xs[best]:
            best = i
    return best


def best_of(score: list[float], pos: list[int], gap: Gap, high: bool = True) -> int:
    """The best-scoring position (ties: the lowest index)."""
    best = pos[0]
    for i in pos[1:]:
        if gap.gt(score[i], score[best]) if high else gap.gt(score[best], score[i]):
            best = i
    return best


def ranked(score: list[float], pos: list[int], gap: Gap, high: bool = True) -> list[int]:
    """Positions sorted best first, ties by index (comparisons recorded)."""
    for a in pos:
        for b in pos:
            if a < b:
                gap.note(score[a], score[b])
    return sorted(pos, key=lambda i: (-score[i] if high else score[i], i))


def entropy(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


class Row:
    """One row's block as the reference sees it."""

    def __init__(self) -> None:
        self.tok = [MASK] * L
        self.at = [-1] * L  # committed_at
        self.step = 0

    def masked(self) -> list[int]:
        return [i for i in range(L) if self.tok[i] == MASK]

    def editable(self) -> list[int]:
        return [i for i in range(L) if self.at[i] >= 0]


RefRule = Callable[[Row, list[list[float]], list[list[float]], dict, Gap], tuple]


def reference_decode(
    rule: RefRule, script: list[list[torch.Tensor]], row: int, refine: int, budget: int
) -> tuple[list[int], list[list[int]]] | None:
    """One row's decode; returns its tokens and per step (commits, edits, remasks), or
    ``None`` when the block runs past the budget."""
    out: list[int] = []
    steps: list[list[int]] = []
    gap = Gap()
    for b in range(BLOCKS):
        r, post, active, state = Row(), 0, True, {}
        while active:
            if r.step >= budget:
                return None
            logits = script[b][min(r.step, len(script[b]) - 1)][row].tolist()
            p = [probs(lv) for lv in logits]
            had_mask = bool(r.masked())
            if not had_mask:
                post += 1
            commit, edit, remask = rule(r, p, logits, state, gap)
            n_edit = 0
            for i, t in commit.items():
                assert r.tok[i] == MASK
                r.tok[i], r.at[i] = t, r.step
            for i, t in edit.items():
                if r.at[i] >= 0 and r.tok[i] != t:
                    r.tok[i], r.at[i] = t, r.step
                    n_edit += 1
            for i in remask:
                r.tok[i], r.at[i] = MASK, -1
            steps.append([len(commit), n_edit, len(remask)])
            r.step += 1
            changed = n_edit > 0 or bool(remask)
            active = bool(r.masked()) or ((had_mask or changed) and post < refine)
        out += r.tok
    assume(gap.min > 1e-6)
    return out, steps


def ref_margin(tau: float) -> RefRule:
    def rule(r: Row, p, logits, state, gap):
        m = r.masked()
        if not m:
            return {}, {}, set()
        x0 = [argmax(pi, gap) for pi in p]
        gaps = [sorted(pi)[-1] - sorted(pi)[-2] for pi in p]
        chosen = [i for i in m if gap.ge(gaps[i], tau)] or [best_of(gaps, m, gap)]
        return {i: x0[i] for i in chosen}, {}, set()

    return rule


def ref_eb(gamma: float) -> RefRule:
    def rule(r: Row, p, logits, state, gap):
        m = r.masked()
        if not m:
            return {}, {}, set()
        x0 = [argmax(pi, gap) for pi in p]
        h = [entropy(pi) for pi in p]
        order = ranked(h, m, gap, high=False)
        k = 1
        for n in range(2, len(order) + 1):
            hs = [h[i] for i in order[:n]]
            if not gap.ge(gamma, sum(hs) - max(hs)):
                break
            k = n
        return {i: x0[i] for i in order[:k]}, {}, set()

    return rule


def ref_klass(tau: float, eps: float, hist: int) -> RefRule:
    def rule(r: Row, p, logits, state, gap):
        prev = state.get("prev")
        kl = []
        for i in range(L):
            if prev is None:
                kl.append(math.inf)
            else:
                pairs = zip(p[i], prev[i], strict=True)
                kl.append(sum(a * (math.log(a) - math.log(b)) for a, b in pairs if a > 0))
        state["prev"] = p
        state.setdefault("kl", [[math.inf] * hist for _ in range(L)])
        state["kl"] = [[*h[1:], k] for h, k in zip(state["kl"], kl, strict=True)]
        m = r.masked()
        if not m:
            return {}, {}, set()
        x0 = [argmax(pi, gap) for pi in p]
        c = [pi[x] for pi, x in zip(p, x0, strict=True)]
        ready = [
            i
            for i in m
            if all(k != math.inf and gap.gt(eps, k) for k in state["kl"][i]) and gap.gt(c[i], tau)
        ]
        chosen = ready or [best_of(c, m, gap)]
        return {i: x0[i] for i in chosen}, {}, set()

    return rule


def ref_credit(tau: float, alpha: float, gam: float, beta: float) -> RefRule:
    def rule(r: Row, p, logits, state, gap):
        credit = state.setdefault("c", [[0.0] * V for _ in range(L)])
        if state.get("seen"):
            for i in range(L):
                credit[i] = [beta * v for v in credit[i]]
        state["seen"] = True
        m = r.masked()
        for i in m:
            v1 = argmax(p[i], gap)
            credit[i][v1] += p[i][v1] ** gam
        fused = [
            [lv + alpha * math.log1p(cv) for lv, cv in zip(logits[i], credit[i], strict=True)]
            for i in range(L)
        ]
        if not m:
            return {}, {}, set()
        tokens = {}
        conf = [0.0] * L
        for i in m:
            q = probs(fused[i])
            tokens[i] = argmax(q, gap)
            conf[i] = q[tokens[i]]
        thr = min(max(conf[i] for i in m) - 1e-5, tau)
        chosen = [i for i in m if gap.ge(conf[i], thr)]
        return {i: tokens[i] for i in chosen}, {}, set()

    return rule


def ref_wino(t1: float, t2: float) -> RefRule:
    def rule(r: Row, p, logits, state, gap):
        last = state.get("last", 30)
        m = r.masked()
        if not m:
            return {}, {}, set()
        x0 = [argmax(pi, gap) for pi in p]
        c = [pi[x] for pi, x in zip(p, x0, strict=True)]
        cap = min(max(7 * len(m) // 10, 5), 20)
        order = ranked(c, m, gap)
        draft = [i for i in order[:cap] if gap.gt(c[i], t1)] or [order[0]]
        remask: set[int] = set()
        if len(draft) > 1:
            cur = [p[i][r.tok[i]] if r.tok[i] != MASK else 0.0 for i in range(L)]
            low = [i for i in r.editable() if gap.gt(t2, cur[i])]
            if len(low) >= last:
                low = ranked(cur, low, gap, high=False)[: last - 1]
            remask = set(low)
        state["last"] = len(draft)
        return {i: x0[i] for i in draft}, {}, remask

    return rule


def ref_joint(tau: float, tau_edit: float) -> RefRule:
    def rule(r: Row, p, logits, state, gap):
        x0 = [argmax(pi, gap) for pi in p]
        c = [pi[x] for pi, x in zip(p, x0, strict=True)]
        m = r.masked()
        commit = {}
        if m:
            chosen = [i for i in m if gap.gt(c[i], tau)] or [best_of(c, m, gap)]
            commit = {i: x0[i] for i in chosen}
        edit = {i: x0[i] for i in r.editable() if x0[i] != r.tok[i] and gap.gt(c[i], tau_edit)}
        return commit, edit, set()

    return rule


def ref_fixed(score: str, steps_per_block: int) -> RefRule:
    def rule(r: Row, p, logits, state, gap):
        m = r.masked()
        if not m:
            return {}, {}, set()
        state.setdefault("m0", len(m))
        m0, s, k = state["m0"], steps_per_block, r.step
        n = m0 // s + (1 if k < m0 % s else 0)
        if k >= s - 1:
            n = len(m)
        n = min(max(n, 1), len(m))
        x0 = [argmax(pi, gap) for pi in p]
        if score == "margin":
            key = [sorted(pi)[-1] - sorted(pi)[-2] for pi in p]
            order = ranked(key, m, gap)
        elif score == "entropy":
            order = ranked([entropy(pi) for pi in p], m, gap, high=False)
        else:
            order = ranked([pi[x] for pi, x in zip(p, x0, strict=True)], m, gap)
        return {i: x0[i] for i in order[:n]}, {}, set()

    return rule


# (policy name, params, reference, steps)
CASES: list[tuple[str, dict[str, Any], RefRule, int | None]] = [
    ("margin", {"threshold": 0.25}, ref_margin(0.25), None),
    ("eb", {"gamma": 0.5}, ref_eb(0.5), None),
    (
        "klass",
        {"conf_threshold": 0.5, "kl_threshold": 0.05, "history_length": 2},
        ref_klass(0.5, 0.05, 2),
        None,
    ),
    ("credit", {"threshold": 0.6}, ref_credit(0.6, 0.7, 0.2, 0.8), None),
    ("wino", {"draft_threshold": 0.4, "verify_threshold": 0.6}, ref_wino(0.4, 0.6), None),
    (
        "joint_threshold",
        {"threshold": 0.5, "edit_threshold": 0.4, "max_post_steps": 3},
        ref_joint(0.5, 0.4),
        None,
    ),
    ("fixed", {"score": "margin"}, ref_fixed("margin", 3), BLOCKS * 3),
    ("fixed", {"score": "entropy"}, ref_fixed("entropy", 3), BLOCKS * 3),
    ("fixed", {"score": "confidence"}, ref_fixed("confidence", 3), BLOCKS * 3),
]


@st.composite
def scripts(draw: st.DrawFn, steps: int) -> tuple[list[list[torch.Tensor]], int]:
    """Integer-valued logits ``(B, L, V)`` per block and step, and the batch size."""
    bsz = draw(st.integers(1, 3))
    scale = draw(st.sampled_from([1.0, 2.0, 3.0]))
    out = []
    for _ in range(BLOCKS):
        block = []
        for _ in range(steps):
            vals = draw(st.lists(st.integers(-3, 3), min_size=bsz * L * V, max_size=bsz * L * V))
            block.append(torch.tensor(vals, dtype=torch.float64).view(bsz, L, V) * scale)
        out.append(block)
    return out, bsz


@pytest.mark.parametrize(
    ("name", "params", "ref", "steps"),
    CASES,
    ids=[f"{c[0]}-{next(iter(c[1].values()))}" for c in CASES],
)
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)
@given(data=st.data())
def test_builtin_equals_its_per_row_reference(name, params, ref, steps, data) -> None:
    policy = dlm_decode.get_policy(name, **params)
    budget = policy.step_budget(L)
    script, bsz = data.draw(scripts(min(budget, 8)))
    expected = [reference_decode(ref, script, r, policy.refine_steps, budget) for r in range(bsz)]
    model = ScriptedModel(script, prompt_length=1)
    dec = Decoder(
        model, policy=policy, cache="none", gen_length=BLOCKS * L, block_length=L, steps=steps
    )
    prompt = torch.zeros((bsz, 1), dtype=torch.long)
    if any(e is None for e in expected):
        with pytest.raises(PolicyContractError, match="step budget"):
            dec.generate(prompt)
        return
    out = dec.generate(prompt)
    for r, (tokens, _) in enumerate(expected):
        assert out.responses[r].tolist() == tokens, f"row {r}"
    # Per-step counts of each row, over the steps where the row took part.
    for r, (_, per_step) in enumerate(expected):
        got = []
        for s in range(out.commit_counts.shape[0]):
            c, e, m = (
                int(t[s, r]) for t in (out.commit_counts, out.edit_counts, out.remask_counts)
            )
            got.append([c, e, m])
        active = [g for g in got if any(g)]
        assert active == [x for x in per_step if any(x)], f"row {r}"


# --------------------------------------------------------------------------------------
# The contract's mechanics
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    m = dlm_decode.models.build_model("llada-tiny", dtype=torch.float64, seed=4)
    m.module.head.weight.mul_(12.0)
    return m


PROMPTS = [[5, 9, 11], [7, 3], [2, 8, 8, 1]]


def test_signals_are_what_the_docs_say() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn((2, 4, 7), generator=g, dtype=torch.float64) * 3
    block = torch.tensor([[6, 2, 6, 0], [1, 6, 6, 6]])
    spec = parse_needs(["current", "entropy", "top2", "topk:3", "logits", "uniform"])
    sig = compute_signals(logits, block, 6, spec, generator=g)
    p = torch.softmax(logits[..., :6].double(), -1)  # the mask id is the last one
    x0 = p.argmax(-1)
    assert torch.equal(sig.x0, x0)
    assert torch.allclose(sig.confidence.double(), p.max(-1).values, atol=1e-6)
    ent = -(p * p.log()).sum(-1)
    assert torch.allclose(sig.entropy.double(), ent, atol=1e-5)
    top = p.topk(3, -1)
    assert torch.allclose(sig.top2.double(), top.values[..., 1], atol=1e-6)
    assert torch.equal(sig.topk_ids, top.indices)
    cur = torch.where(block == 6, 0.0, p.gather(-1, block.clamp(max=5).unsqueeze(-1)).squeeze(-1))
    assert torch.allclose(sig.current.double(), cur, atol=1e-6)
    assert sig.logits is logits and sig.uniform.shape == (2, 4)
    assert torch.equal(sig.block, block) and sig.block is not block


def test_reading_an_undeclared_signal_names_the_declaration(tiny) -> None:
    class Sneaky(CommitPolicy):
        name: ClassVar[str] = "sneaky"

        def select(self, confidence, masked, state):
            state.signals.entropy  # noqa: B018
            return masked

    with pytest.raises(UndeclaredSignalError, match="add 'entropy' to its class attribute `needs`"):
        dlm_decode.generate(tiny, PROMPTS, policy=Sneaky(), gen_length=8, block_length=4)
    with pytest.raises(ValueError, match="unknown signal 'entropie'"):
        parse_needs(["entropie"])


def test_only_declared_signals_are_computed(tiny, monkeypatch) -> None:
    seen: list[frozenset[str]] = []
    import dlm_decode.decoder as decoder_mod

    real = decoder_mod.compute_signals

    def spy(*a, **k):
        seen.append(a[3].names)
        return real(*a, **k)

    monkeypatch.setattr(decoder_mod, "compute_signals", spy)
    dlm_decode.generate(tiny, PROMPTS, policy="threshold", gen_length=8, block_length=4)
    dlm_decode.generate(tiny, PROMPTS, policy="eb", gen_length=8, block_length=4)
    assert seen[0] == frozenset() and seen[-1] == frozenset({"entropy"})


class RemaskOnce(CommitPolicy):
    """Commits the best masked position; at step 2 of a block it also remasks what it
    committed at step 0 (a v2 test policy)."""

    name: ClassVar[str] = "remask_once"
    needs: ClassVar[tuple[str, ...]] = ("history",)
    revokes: ClassVar[bool] = True
    capturable: ClassVar[bool] = True

    def select(self, confidence, masked, state):
        h = state.signals.history
        from dlm_decode.frechet import commit_best_if_none

        commit = commit_best_if_none(torch.zeros_like(masked), confidence, masked)
        remask = (h.committed_at == 0) & (h.step == 2)
        return Decision(commit=commit, remask=remask)


def test_history_and_remasks_are_applied_counted_and_traced(tiny) -> None:
    out = dlm_decode.generate(
        tiny, PROMPTS, policy=RemaskOnce(), gen_length=8, block_length=4, trace=True
    )
    assert int(out.remask_counts.sum()) == 3 * 2  # one per row and block
    assert not (out.responses == tiny.mask_token_id).any()
    steps = [s for s in out.trace if any(s.remasked)]
    assert len(steps) == 2 and all(len(r) == 1 for s in steps for r in s.remasked)
    # 4 positions + 1 remasked = 5 steps per block
    assert out.nfe == 2 * 5


def test_a_policy_that_revokes_without_declaring_it_is_rejected(tiny) -> None:
    class Undeclared(RemaskOnce):
        name: ClassVar[str] = "undeclared"
        revokes: ClassVar[bool] = False

    with pytest.raises(PolicyContractError, match="does not declare `revokes = True`"):
        dlm_decode.generate(tiny, PROMPTS, policy=Undeclared(), gen_length=8, block_length=4)


def _one(masked: torch.Tensor) -> torch.Tensor:
    """Commit the first masked position of each row."""
    from dlm_decode.frechet import commit_best_if_none

    return commit_best_if_none(torch.zeros_like(masked), torch.ones(masked.shape), masked)


@pytest.mark.parametrize(
    ("decide", "message"),
    [
        (lambda m, h: Decision(torch.zeros_like(m), remask=m), "not committed earlier in this"),
        (
            lambda m, h: Decision(_one(m), edit=h.editable, remask=h.editable),
            "more than one of commit, edit and remask",
        ),
        (lambda m, h: Decision(m, tokens=torch.full(m.shape, 127)), "mask token or an id outside"),
        (lambda m, h: Decision(m[:, :1]), r"commit as \(3, 1\)"),
    ],
    ids=["remask-masked", "overlap", "mask-token", "shape"],
)
def test_bad_decisions_are_errors_naming_the_rule(tiny, decide, message) -> None:
    class Bad(CommitPolicy):
        name: ClassVar[str] = "bad"
        revokes: ClassVar[bool] = True
        needs: ClassVar[tuple[str, ...]] = ("history",)

        def select(self, confidence, masked, state):
            return decide(masked, state.signals.history)

    with pytest.raises(PolicyContractError, match=message):
        dlm_decode.generate(tiny, PROMPTS, policy=Bad(), gen_length=8, block_length=4)


def test_a_policy_that_keeps_revoking_stops_at_the_budget_with_its_own_message(tiny) -> None:
    class Flip(CommitPolicy):
        name: ClassVar[str] = "flip"
        revokes: ClassVar[bool] = True
        needs: ClassVar[tuple[str, ...]] = ("history",)

        def select(self, confidence, masked, state):
            h = state.signals.history
            from dlm_decode.frechet import commit_best_if_none

            commit = commit_best_if_none(torch.zeros_like(masked), confidence, masked)
            return Decision(commit=commit, remask=h.editable)

    with pytest.raises(PolicyContractError, match=r"step budget of 16 steps .* policy flip\.v1"):
        dlm_decode.generate(tiny, PROMPTS, policy=Flip(), gen_length=8, block_length=4)
    with pytest.raises(PolicyContractError, match="step budget of 5 steps"):
        dlm_decode.generate(
            tiny, PROMPTS, policy=Flip(), gen_length=8, block_length=4, max_steps_per_block=5
        )


def test_a_policy_writing_its_masked_argument_is_caught(tiny) -> None:
    class Writer(CommitPolicy):
        name: ClassVar[str] = "writer"

        def select(self, confidence, masked, state):
            out = masked.clone()
            masked.fill_(False)
            return out

    with pytest.raises(PolicyContractError, match="wrote into its `masked` argument"):
        dlm_decode.generate(tiny, PROMPTS, policy=Writer(), gen_length=8, block_length=4)


def test_policy_state_is_allocated_once_and_reset_per_block(tiny) -> None:
    calls = {"make": 0, "reset": 0}

    class Counting(CommitPolicy):
        name: ClassVar[str] = "counting"

        def make_state(self, b, n, v, device):
            calls["make"] += 1
            return {"n": torch.zeros((), dtype=torch.long)}

        def reset_state(self, state, masked):
            calls["reset"] += 1
            assert int(state["n"]) in (0, 4)  # 4 steps in the previous block
            state["n"].zero_()

        def select(self, confidence, masked, state):
            state.policy_state["n"].add_(1)
            from dlm_decode.frechet import commit_best_if_none

            return commit_best_if_none(torch.zeros_like(masked), confidence, masked)

    dlm_decode.generate(tiny, PROMPTS, policy=Counting(), gen_length=8, block_length=4)
    assert calls == {"make": 1, "reset": 2}


@pytest.mark.parametrize(
    "policy",
    ["margin", "eb", "klass", "credit", "wino", "joint_threshold", "fixed:score=entropy"],
)
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_batched_equals_alone_and_fast_equals_reference(tiny, policy, cache) -> None:
    kw = dict(policy=policy, cache=cache, gen_length=8, block_length=4)
    if policy.startswith("fixed"):
        kw["steps"] = 8
    batched = dlm_decode.generate(tiny, PROMPTS, **kw)
    for r, pr in enumerate(PROMPTS):
        alone = dlm_decode.generate(tiny, [pr], **kw)
        assert torch.equal(batched.responses[r], alone.responses[0])
    fast = FastDecoder(tiny, graphs=False, **kw)
    for _ in range(2):  # the static buffers are reused by the second decode
        got = fast.generate(PROMPTS)
        assert torch.equal(got.sequences, batched.sequences) and got.nfe == batched.nfe
        assert torch.equal(got.edit_counts, batched.edit_counts)
        assert torch.equal(got.remask_counts, batched.remask_counts)


def test_v1_policies_and_states_keep_working(tiny) -> None:
    class V1(CommitPolicy):
        name: ClassVar[str] = "v1"

        def select(self, confidence, masked, state):
            assert isinstance(state, StepState) and state.step >= 0
            from dlm_decode.frechet import commit_top_n, sorted_profile

            _, _, order = sorted_profile(confidence, masked)
            return commit_top_n(torch.ones(masked.shape[0], dtype=torch.long), masked, order)

    a = dlm_decode.generate(tiny, PROMPTS, policy=V1(), gen_length=8, block_length=4)
    b = dlm_decode.generate(tiny, PROMPTS, policy="fixed.v1", steps=8, gen_length=8, block_length=4)
    assert torch.equal(a.sequences, b.sequences)
    state = StepState(0, 0, 1, None, torch.tensor([3]))  # positional v1 construction
    assert state.signals is None and state.block_start == 0


def test_fixed_v2_confidence_is_fixed_v1_and_random_is_seeded(tiny) -> None:
    kw = dict(steps=8, gen_length=8, block_length=4)
    v1 = dlm_decode.generate(tiny, PROMPTS, policy="fixed.v1", **kw)
    v2 = dlm_decode.generate(tiny, PROMPTS, policy="fixed", **kw)
    assert v2.config.policy == "fixed.v2" and torch.equal(v1.sequences, v2.sequences)
    r1 = dlm_decode.generate(tiny, PROMPTS, policy="fixed:score=random", seed=3, **kw)
    r2 = dlm_decode.generate(tiny, PROMPTS, policy="fixed:score=random", seed=3, **kw)
    assert torch.equal(r1.sequences, r2.sequences)
    assert r1.commit_counts.tolist() == v1.commit_counts.tolist()  # the same schedule


def test_joint_threshold_refines_after_the_block_fills(tiny) -> None:
    kw = dict(gen_length=8, block_length=4)
    # With edits off, every block gets exactly one post step when post steps are allowed.
    off = "joint_threshold:edit_threshold=1.0,max_post_steps="
    none = dlm_decode.generate(tiny, PROMPTS, policy=off + "0", **kw)
    two = dlm_decode.generate(tiny, PROMPTS, policy=off + "2", **kw)
    assert two.nfe == none.nfe + 2 and torch.equal(two.sequences, none.sequences)
    assert int(two.edit_counts.sum()) == 0
    assert dlm_decode.get_policy("joint_threshold").step_budget(32) == 4 * 32 + 16


def _state(conf, masked, committed_at, current, policy, last_accept=None):
    """A hand-built v2 step state for one policy (signals from given values)."""
    from dlm_decode.signals import History, StepSignals

    conf, masked = torch.tensor(conf), torch.tensor(masked)
    hist = History.empty(1, conf.shape[-1], "cpu")
    hist.committed_at.copy_(torch.tensor(committed_at))
    spec = parse_needs(policy.needs)
    values = {"current": torch.tensor(current), "history": hist}
    block = torch.where(masked, MASK, 0)
    sig = StepSignals(torch.zeros_like(block), conf, block, MASK, spec, "test", values)
    st = policy.make_state(1, conf.shape[-1], V, torch.device("cpu"))
    if last_accept is not None:
        st["last_accept"].fill_(last_accept)
    return StepState(0, 0, 1, None, masked.sum(-1), sig, st)


def test_wino_drafts_above_tau1_and_remasks_below_tau2_within_its_caps() -> None:
    pol = dlm_decode.get_policy("wino", draft_threshold=0.5, verify_threshold=0.8)
    #          committed (low, low, high)   masked (draft 2, keep 1 below τ1)
    conf = [[0.0, 0.0, 0.0, 0.9, 0.7, 0.3]]
    masked = [[False, False, False, True, True, True]]
    at = [[0, 1, 1, -1, -1, -1]]
    cur = [[0.2, 0.5, 0.95, 0.0, 0.0, 0.0]]
    st = _state(conf, masked, at, cur, pol)
    dec = pol.select(st.signals.confidence, st.signals.block == MASK, st)
    assert dec.commit.tolist() == [[False, False, False, True, True, False]]
    assert dec.remask.tolist() == [[True, True, False, False, False, False]]
    assert st.policy_state["last_accept"].tolist() == [2]
    # The previous step accepted 2: at most one remask, the lowest current probability.
    st = _state(conf, masked, at, cur, pol, last_accept=2)
    dec = pol.select(st.signals.confidence, st.signals.block == MASK, st)
    assert dec.remask.tolist() == [[True, False, False, False, False, False]]
    # One draft: no verification this step.
    st = _state([[0.0, 0.0, 0.0, 0.9, 0.2, 0.3]], masked, at, cur, pol)
    dec = pol.select(st.signals.confidence, st.signals.block == MASK, st)
    assert int(dec.commit.sum()) == 1 and not dec.remask.any()


def test_counterfactual_trace_and_audit_run_v2_policies_on_the_same_signals(tiny) -> None:
    from dlm_decode.ablate.counterfactual import commit_audit, counterfactual_trace
    from dlm_decode.config import DecodeConfig

    cfg = DecodeConfig(policy="wino", cache="dual", gen_length=8, block_length=4)
    tr = counterfactual_trace(tiny, PROMPTS, cfg, ["eb", "klass", "credit", "margin", "threshold"])
    actual = tr.result.commit_counts
    for row in tr.rows:
        assert row["actual"] == int(actual[row["step_index"], row["row"]])
        for lab in tr.labels:
            assert 1 <= row[lab] <= row["masked"]
    # The driver decodes exactly as it does alone: the others' signals and state are apart.
    alone = dlm_decode.generate(tiny, PROMPTS, config=cfg)
    assert torch.equal(tr.result.sequences, alone.sequences)
    res = commit_audit(tiny, PROMPTS, cfg.model_copy(update={"policy": "eb"}), max_steps=4)
    assert res.records and res.summary()["audited_steps"] == len(res.records)
