"""Properties of the Fréchet function layer and the built-in commit rules.

Each test name states the invariant it checks. Two kinds of input are used (see
``tests/strategies.py``): *exact* profiles on the dyadic grid ``k/64``, where every score
is computed without rounding and the vectorized rules must equal the pure-Python
references bit for bit (including at ``>`` / ``≥`` boundaries), and free floats in
``[0, 1]`` in float32/float64, where results may differ from exact arithmetic only by
rounding (checked by bracketing the parameter by ``± tol``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from fractions import Fraction

import pytest
import torch
from conftest import DEVICES
from hypothesis import example, given, settings
from hypothesis import strategies as st

import dlm_decode
from dlm_decode.frechet import frechet_gap, frechet_scores
from dlm_decode.interfaces import CountPolicy, StepState
from dlm_decode.policies.rules import (
    FactorParams,
    FactorPolicy,
    FixedPolicy,
    FrechetParams,
    FrechetPolicy,
    FrechetRobustParams,
    FrechetRobustPolicy,
    ThresholdParams,
    ThresholdPolicy,
)
from dlm_decode.testing.strategies import (
    GRID,
    PolicyInput,
    grid_values,
    policy_inputs,
    sorted_profiles,
)

#: Example counts (``max_examples``) by cost of one example.
CHEAP = 300
MEDIUM = 150

#: Absolute rounding tolerance of the scores per dtype (cumsums of up to 40 values ≤ 1).
TOL = {torch.float32: 2e-4, torch.float64: 1e-9}

FLOAT_DTYPES = st.sampled_from([torch.float32, torch.float64])


def _no_state(m: int = 1) -> StepState:
    return StepState(0, 0, 1, None, torch.tensor([m]))


# --------------------------------------------------------------------------------------
# Slow, obviously-correct references: one row, a loop over n, Python numbers
# --------------------------------------------------------------------------------------


def _clamp_count(n: int, m: int) -> int:
    """At least one, at most the masked count (0 when nothing is masked)."""
    return 0 if m == 0 else min(max(n, 1), m)


def ref_threshold(profile: list[float], threshold: float) -> int:
    """Every value ``≥ τ``; if none, the single best."""
    return _clamp_count(sum(1 for c in profile if c >= threshold), len(profile))


def ref_factor(profile: list[float], factor: float) -> int:
    """The largest ``n`` with ``(n + 1)(1 − c(n)) < f``."""
    best = 0
    for n in range(1, len(profile) + 1):
        if (n + 1) * (1 - profile[n - 1]) < factor:
            best = n
    return _clamp_count(best, len(profile))


def ref_frechet(profile: list[float], margin: float, eta: float = 0.0) -> int:
    """The largest ``n`` with ``G_n > δ`` on ``max(0, c − η)``."""
    c = [max(0.0, v - eta) for v in profile]
    best = 0
    for n in range(1, len(c) + 1):
        lower = max(0.0, sum(c[:n]) - (n - 1))
        upper = 1 - c[n - 1]
        if lower - upper > margin:
            best = n
    return _clamp_count(best, len(c))


def ref_fixed(m: int, masked_at_start: int, steps: int, step: int) -> int:
    """LLaDA's schedule: step ``i`` commits ``M // s + (i < M % s)``; the last commits the
    rest."""
    schedule = [masked_at_start // steps + (i < masked_at_start % steps) for i in range(steps)]
    n = m if step >= steps - 1 else schedule[step]
    return _clamp_count(n, m)


def ref_select(
    rows: list[list[float]], mask_rows: list[list[bool]], count: Callable[[int, list[float]], int]
) -> list[list[bool]]:
    """Commit the ``count(b, profile)`` most confident masked positions of each row ``b``;
    ties go to the lower column."""
    out = []
    for b, (row, mrow) in enumerate(zip(rows, mask_rows, strict=True)):
        cols = [j for j, is_masked in enumerate(mrow) if is_masked]
        cols.sort(key=lambda j: -row[j])  # stable: ties keep column order
        n = count(b, [row[j] for j in cols])
        chosen = set(cols[:n])
        out.append([j in chosen for j in range(len(row))])
    return out


# Rule name → (params strategy on the grid, params model, reference count).
GRID_PARAMS: dict[str, st.SearchStrategy[dict[str, float]]] = {
    "threshold": st.integers(1, GRID).map(lambda k: {"threshold": k / GRID}),
    "factor": st.integers(1, 4 * GRID).map(lambda k: {"factor": k / GRID}),
    "frechet": st.integers(0, 2 * GRID).map(lambda k: {"margin": k / GRID}),
    "frechet_robust": st.tuples(st.integers(0, 2 * GRID), st.integers(0, GRID - 1)).map(
        lambda t: {"margin": t[0] / GRID, "eta": t[1] / GRID}
    ),
}


def _reference(name: str, params: dict[str, float], inp: PolicyInput) -> Callable:
    m0 = inp.state.block_masked_at_start.tolist()
    refs: dict[str, Callable[[int, list[float]], int]] = {
        "threshold": lambda b, p: ref_threshold(p, params["threshold"]),
        "factor": lambda b, p: ref_factor(p, params["factor"]),
        "frechet": lambda b, p: ref_frechet(p, params["margin"]),
        "frechet_robust": lambda b, p: ref_frechet(p, params["margin"], params["eta"]),
        "fixed": lambda b, p: ref_fixed(len(p), m0[b], inp.state.steps_per_block, inp.state.step),
    }
    return refs[name]


# --------------------------------------------------------------------------------------
# The function layer: L_n, U_n, G_n, F_n, B_n
# --------------------------------------------------------------------------------------


@settings(max_examples=CHEAP, deadline=None)
@given(profile=sorted_profiles(), dtype=FLOAT_DTYPES)
def test_lower_bound_at_least_weakest_token_bound(profile: list[float], dtype) -> None:
    """``L_n ≥ 1 − n(1 − c(n))``: the top ``n`` are jointly right at least as often as
    ``n`` copies of the weakest token would be."""
    c = torch.tensor(profile, dtype=dtype)
    s = frechet_scores(c)
    n = torch.arange(1, len(profile) + 1, dtype=dtype)
    assert (s.lower >= 1 - n * (1 - c) - TOL[dtype]).all()
    assert (s.lower >= 0).all()


@settings(max_examples=CHEAP, deadline=None)
@given(profile=sorted_profiles(), dtype=FLOAT_DTYPES)
def test_gap_only_function_equals_full_scores_gap(profile: list[float], dtype) -> None:
    """``frechet_gap`` (what the policy evaluates each step) is ``frechet_scores(c).gap``."""
    c = torch.tensor(profile, dtype=dtype)
    torch.testing.assert_close(frechet_gap(c), frechet_scores(c).gap, atol=TOL[dtype], rtol=0)


@settings(max_examples=CHEAP, deadline=None)
@given(profile=sorted_profiles(), dtype=FLOAT_DTYPES)
def test_gap_equals_max_of_factor_core_plus_bonus_and_c_minus_one(
    profile: list[float], dtype
) -> None:
    """``G_n = max(F_n + B_n, c(n) − 1)``, and ``G_n = F_n + B_n`` where the clamp in
    ``L_n`` is inactive."""
    c = torch.tensor(profile, dtype=dtype)
    s = frechet_scores(c)
    identity = torch.maximum(s.factor_core + s.bonus, c - 1)
    torch.testing.assert_close(s.gap, identity, atol=TOL[dtype], rtol=0)
    n = torch.arange(1, len(profile) + 1, dtype=dtype)
    unclamped = c.cumsum(-1) - (n - 1) > TOL[dtype]
    torch.testing.assert_close(
        s.gap[unclamped], (s.factor_core + s.bonus)[unclamped], atol=TOL[dtype], rtol=0
    )


@settings(max_examples=CHEAP, deadline=None)
@given(profile=sorted_profiles(exact=True), dtype=FLOAT_DTYPES)
def test_bonus_nonnegative_and_zero_iff_prefix_flat(profile: list[float], dtype) -> None:
    """``B_n ≥ 0`` with equality exactly when ``c(1) = … = c(n)`` (exact on the grid)."""
    s = frechet_scores(torch.tensor(profile, dtype=dtype))
    for n, bonus in enumerate(s.bonus.tolist(), start=1):
        assert bonus >= 0
        flat = profile[0] == profile[n - 1]
        assert (bonus == 0) == flat, (n, profile[:n], bonus)


@settings(max_examples=CHEAP, deadline=None)
@given(profile=sorted_profiles(), dtype=FLOAT_DTYPES)
def test_bonus_at_least_spread_of_prefix(profile: list[float], dtype) -> None:
    """``c(1) − c(n) ≤ B_n ≤ (n − 1)(c(1) − c(n))`` on free floats (up to rounding)."""
    c = torch.tensor(profile, dtype=dtype)
    s = frechet_scores(c)
    n = torch.arange(1, len(profile) + 1, dtype=dtype)
    spread = c[0] - c
    assert (s.bonus >= spread - TOL[dtype]).all()
    assert (s.bonus <= (n - 1) * spread + TOL[dtype]).all()


@settings(max_examples=CHEAP, deadline=None)
@given(profile=sorted_profiles(exact=True), dtype=FLOAT_DTYPES)
def test_gap_non_increasing_in_n_exact(profile: list[float], dtype) -> None:
    """``G_{n+1} ≤ G_n`` (exact on the grid), so counting passes finds the largest prefix."""
    gap = frechet_scores(torch.tensor(profile, dtype=dtype)).gap
    assert (gap[1:] <= gap[:-1]).all()


@settings(max_examples=CHEAP, deadline=None)
@given(profile=sorted_profiles(), dtype=FLOAT_DTYPES)
def test_gap_non_increasing_in_n_up_to_rounding(profile: list[float], dtype) -> None:
    gap = frechet_scores(torch.tensor(profile, dtype=dtype)).gap
    assert (gap[1:] <= gap[:-1] + TOL[dtype]).all()


@settings(max_examples=CHEAP, deadline=None)
@given(
    profiles=st.lists(sorted_profiles(min_length=7, max_length=7), min_size=1, max_size=3),
    dtype=FLOAT_DTYPES,
)
def test_frechet_scores_batched_equals_row_by_row(profiles: list[list[float]], dtype) -> None:
    batch = frechet_scores(torch.tensor(profiles, dtype=dtype))
    for b, profile in enumerate(profiles):
        row = frechet_scores(torch.tensor(profile, dtype=dtype))
        for got, want in zip(batch, row, strict=True):
            assert torch.equal(got[b], want)


# --------------------------------------------------------------------------------------
# Relations between the rules
# --------------------------------------------------------------------------------------


def _counts(policy: CountPolicy, profile: list[float], dtype: torch.dtype) -> int:
    c = torch.tensor([profile], dtype=dtype)
    masked = torch.ones_like(c, dtype=torch.bool)
    return int(policy.counts(c, masked, _no_state(len(profile)))[0])


@settings(max_examples=CHEAP, deadline=None)
@given(
    value=grid_values(),
    length=st.integers(1, 40),
    margin=st.integers(0, GRID - 1).map(lambda k: k / GRID),
    dtype=FLOAT_DTYPES,
)
def test_equal_confidences_frechet_delta_commits_same_as_factor_one_minus_delta(
    value: float, length: int, margin: float, dtype
) -> None:
    """On a flat profile ``B_n = 0``, so ``frechet(δ) ≡ factor(1 − δ)`` for ``δ ∈ [0, 1)``."""
    profile = [value] * length
    frechet = FrechetPolicy(FrechetParams(margin=margin))
    factor = FactorPolicy(FactorParams(factor=1 - margin))
    assert _counts(frechet, profile, dtype) == _counts(factor, profile, dtype)


@settings(max_examples=CHEAP, deadline=None)
@given(
    profile=sorted_profiles(exact=True),
    margin=st.integers(0, GRID - 1).map(lambda k: k / GRID),
    dtype=FLOAT_DTYPES,
)
def test_factor_one_minus_delta_commits_at_most_frechet_delta(
    profile: list[float], margin: float, dtype
) -> None:
    """``G_n ≥ F_n`` wherever either passes, so whatever ``factor(1 − δ)`` accepts,
    ``frechet(δ)`` accepts."""
    frechet = FrechetPolicy(FrechetParams(margin=margin))
    factor = FactorPolicy(FactorParams(factor=1 - margin))
    assert _counts(factor, profile, dtype) <= _counts(frechet, profile, dtype)
    # Pointwise per prefix size, not just the counts.
    s = frechet_scores(torch.tensor(profile, dtype=dtype))
    n = torch.arange(1, len(profile) + 1, dtype=dtype)
    factor_accepts = (n + 1) * (1 - torch.tensor(profile, dtype=dtype)) < 1 - margin
    assert not (factor_accepts & ~(s.gap > margin)).any()


@settings(max_examples=MEDIUM, deadline=None)
@given(inp=policy_inputs(), margin=st.floats(0.0, 2.0))
def test_frechet_robust_eta_zero_equals_frechet(inp: PolicyInput, margin: float) -> None:
    robust = FrechetRobustPolicy(FrechetRobustParams(margin=margin, eta=0.0))
    plain = FrechetPolicy(FrechetParams(margin=margin))
    got = robust.select(inp.confidence, inp.masked, inp.state)
    assert torch.equal(got, plain.select(inp.confidence, inp.masked, inp.state))


@settings(max_examples=MEDIUM, deadline=None)
@given(
    inp=policy_inputs(),
    margin=st.floats(0.0, 1.0),
    etas=st.lists(st.floats(0.0, 0.999), min_size=2, max_size=4).map(sorted),
)
def test_frechet_robust_commits_non_increasing_as_eta_grows(
    inp: PolicyInput, margin: float, etas: list[float]
) -> None:
    """Discounting every confidence lowers every ``G_n``, so fewer (or as many) commits."""
    counts = [
        FrechetRobustPolicy(FrechetRobustParams(margin=margin, eta=eta)).counts(
            inp.confidence, inp.masked, inp.state
        )
        for eta in etas
    ]
    for before, after in itertools.pairwise(counts):
        assert (after <= before).all()


@settings(max_examples=MEDIUM, deadline=None)
@given(
    inp=policy_inputs(),
    margins=st.lists(st.floats(0.0, 2.0), min_size=2, max_size=4).map(sorted),
)
def test_frechet_commits_non_increasing_as_margin_grows(
    inp: PolicyInput, margins: list[float]
) -> None:
    counts = [
        FrechetPolicy(FrechetParams(margin=d)).counts(inp.confidence, inp.masked, inp.state)
        for d in margins
    ]
    for before, after in itertools.pairwise(counts):
        assert (after <= before).all()


# --------------------------------------------------------------------------------------
# Vectorized rules == per-row Python references
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["fixed", "threshold", "factor", "frechet", "frechet_robust"])
@settings(max_examples=MEDIUM, deadline=None)
@given(data=st.data(), inp=policy_inputs(exact=True))
def test_vectorized_rule_equals_python_reference_exactly(
    name: str, device: str, data: st.DataObject, inp: PolicyInput
) -> None:
    """On the grid there is no rounding: the commit masks must be identical, ties and
    ``>``/``≥`` boundaries included (on every device: GPU sorts must keep ties stable)."""
    params = data.draw(GRID_PARAMS[name]) if name in GRID_PARAMS else {}
    policy = dlm_decode.get_policy(name, **params)
    on_device = inp.to(device)
    got = policy.select(on_device.confidence, on_device.masked, on_device.state)
    want = ref_select(inp.rows, inp.mask_rows, _reference(name, params, inp))
    assert got.cpu().tolist() == want


# Rule → (free params strategy, name of the monotone param, +1 if counts grow with it).
FREE_PARAMS = {
    "threshold": (st.floats(0.01, 1.0).map(lambda v: {"threshold": v}), "threshold", -1),
    "factor": (st.floats(0.01, 4.0).map(lambda v: {"factor": v}), "factor", +1),
    "frechet": (st.floats(0.0, 2.0).map(lambda v: {"margin": v}), "margin", -1),
    "frechet_robust": (
        st.tuples(st.floats(0.0, 2.0), st.floats(0.0, 0.99)).map(
            lambda t: {"margin": t[0], "eta": t[1]}
        ),
        "margin",
        -1,
    ),
}


@pytest.mark.parametrize("name", sorted(FREE_PARAMS))
@settings(max_examples=MEDIUM, deadline=None)
@given(data=st.data(), inp=policy_inputs())
def test_vectorized_rule_equals_python_reference_up_to_rounding(
    name: str, data: st.DataObject, inp: PolicyInput
) -> None:
    """On free floats the count lies between the reference's counts at the parameter
    nudged by the rounding tolerance either way."""
    strategy, knob, direction = FREE_PARAMS[name]
    params = data.draw(strategy)
    policy = dlm_decode.get_policy(name, **params)
    got = policy.counts(inp.confidence, inp.masked, inp.state).tolist()
    tol = TOL[inp.confidence.dtype]
    stored = inp.confidence.tolist()  # the values the tensor holds (float32-rounded)
    for b in range(len(stored)):
        profile = sorted(
            (v for v, m in zip(stored[b], inp.mask_rows[b], strict=True) if m), reverse=True
        )
        lo_params = {**params, knob: params[knob] - direction * tol}
        hi_params = {**params, knob: params[knob] + direction * tol}
        lo = _reference(name, lo_params, inp)(b, profile)
        hi = _reference(name, hi_params, inp)(b, profile)
        assert lo <= got[b] <= hi, (b, profile, got[b], lo, hi)


@settings(max_examples=MEDIUM, deadline=None)
@given(inp=policy_inputs())
def test_count_rules_treat_batch_rows_independently(inp: PolicyInput) -> None:
    """A row's commits do not depend on the other rows of the batch."""
    for key in ("fixed", "threshold", "factor", "frechet", "frechet_robust"):
        policy = dlm_decode.get_policy(key)
        batch = policy.select(inp.confidence, inp.masked, inp.state)
        for b in range(inp.confidence.shape[0]):
            state = StepState(
                inp.state.step,
                inp.state.block_index,
                inp.state.num_blocks,
                inp.state.steps_per_block,
                inp.state.block_masked_at_start[b : b + 1],
            )
            row = policy.select(inp.confidence[b : b + 1], inp.masked[b : b + 1], state)
            assert torch.equal(row[0], batch[b]), key


@settings(max_examples=CHEAP, deadline=None)
@given(
    length=st.integers(1, 40),
    data=st.data(),
)
def test_fixed_schedule_finishes_block_in_steps_per_block(length: int, data: st.DataObject) -> None:
    """Run a whole block under ``fixed``: step ``i`` commits ``M // s + (i < M % s)`` and
    the block is empty after exactly ``s`` steps."""
    masked_at_start = data.draw(st.integers(1, length))
    steps = data.draw(st.integers(1, masked_at_start))
    cols = data.draw(st.permutations(range(length)))[:masked_at_start]
    masked = torch.zeros(1, length, dtype=torch.bool)
    masked[0, list(cols)] = True
    conf = torch.tensor([data.draw(st.lists(grid_values(), min_size=length, max_size=length))])
    policy = FixedPolicy()
    m0 = masked.sum(-1)
    for i in range(steps):
        state = StepState(i, 0, 1, steps, m0)
        commit = policy.select(conf, masked, state)
        expected = masked_at_start // steps + (i < masked_at_start % steps)
        assert int(commit.sum()) == expected
        masked = masked & ~commit
    assert not masked.any()


# --------------------------------------------------------------------------------------
# The theorem behind the rule, on small exhaustive joints
# --------------------------------------------------------------------------------------


@st.composite
def small_joints(draw: st.DrawFn) -> tuple[list[int], dict[tuple[int, ...], Fraction]]:
    """A joint distribution over 2–3 positions with 2–3 values each, with exact
    probabilities; one outcome often carries most of the mass so the premise fires."""
    sizes = draw(st.lists(st.integers(2, 3), min_size=2, max_size=3))
    outcomes = list(itertools.product(*(range(k) for k in sizes)))
    weights = draw(st.lists(st.integers(0, 20), min_size=len(outcomes), max_size=len(outcomes)))
    peak = draw(st.integers(0, len(outcomes) - 1))
    weights[peak] += draw(st.integers(0, 600))
    total = sum(weights)
    if total == 0:
        weights[peak], total = 1, 1
    return sizes, {o: Fraction(w, total) for o, w in zip(outcomes, weights, strict=True)}


def _marginal(joint: dict[tuple[int, ...], Fraction], positions: list[int]) -> dict:
    out: dict[tuple[int, ...], Fraction] = {}
    for outcome, p in joint.items():
        key = tuple(outcome[i] for i in positions)
        out[key] = out.get(key, Fraction(0)) + p
    return out


@settings(max_examples=MEDIUM, deadline=None)
@example(
    joint=(
        [2, 2, 2],
        {
            o: Fraction(93 if o == (1, 0, 1) else 1, 100)
            for o in itertools.product(range(2), repeat=3)
        },
    )
)
@given(joint=small_joints())
def test_marginal_argmax_is_joint_argmax_when_lower_exceeds_upper(
    joint: tuple[list[int], dict[tuple[int, ...], Fraction]],
) -> None:
    """If ``L_n > U_n`` for the top-``n`` positions, the tuple of their marginal argmaxes
    is the unique joint argmax, ahead of every other tuple by at least ``G_n``."""
    sizes, dist = joint
    k = len(sizes)
    argmax, conf = [], []
    for i in range(k):
        marg = _marginal(dist, [i])
        best = max(range(sizes[i]), key=lambda v: marg.get((v,), Fraction(0)))
        argmax.append(best)
        conf.append(marg.get((best,), Fraction(0)))
    order = sorted(range(k), key=lambda i: -conf[i])  # c(1) ≥ c(2) ≥ …
    c = [conf[i] for i in order]
    scores = frechet_scores(torch.tensor([float(v) for v in c], dtype=torch.float64))
    for n in range(1, k + 1):
        lower = max(Fraction(0), sum(c[:n]) - (n - 1))
        upper = 1 - c[n - 1]
        assert math.isclose(scores.gap[n - 1].item(), float(lower - upper), abs_tol=1e-12)
        if lower <= upper:
            continue
        top = order[:n]
        marg = _marginal(dist, top)
        guess = tuple(argmax[i] for i in top)
        p_guess = marg.get(guess, Fraction(0))
        rivals = [p for y, p in marg.items() if y != guess]
        best_rival = max(rivals, default=Fraction(0))
        assert p_guess >= lower
        assert p_guess > best_rival
        assert p_guess - best_rival >= lower - upper


# --------------------------------------------------------------------------------------
# Regressions and the worked example
# --------------------------------------------------------------------------------------


def _select_count(name: str, profile: list[float], **params: float) -> int:
    policy = dlm_decode.get_policy(name, **params)
    conf = torch.tensor([profile])
    masked = torch.ones_like(conf, dtype=torch.bool)
    return int(policy.select(conf, masked, _no_state(len(profile))).sum())


def test_factor_regression_stops_at_first_failing_prefix() -> None:
    """[0.99, 0.98, 0.10] with f = 0.75 commits 2, as the paper's rule says: n = 3 fails
    (4 × 0.90 ≥ 0.75). The public Fast-dLLM code's bug would give a different count."""
    assert _select_count("factor", [0.99, 0.98, 0.10], factor=0.75) == 2
    assert _select_count("factor", [0.10, 0.99, 0.98], factor=0.75) == 2  # order-free


def test_worked_example_frechet_commits_four_factor_commits_two() -> None:
    profile = [0.99, 0.95, 0.82, 0.78, 0.74]
    assert _select_count("frechet", profile, margin=0.30) == 4
    assert _select_count("factor", profile, factor=0.70) == 2
    s = frechet_scores(torch.tensor(profile, dtype=torch.float64))
    assert [round(g, 2) for g in s.gap.tolist()] == [0.98, 0.89, 0.58, 0.32, 0.02]
    assert [round(v, 2) for v in s.lower.tolist()] == [0.99, 0.94, 0.76, 0.54, 0.28]
    assert [round(v, 2) for v in s.bonus.tolist()] == [0.0, 0.04, 0.30, 0.42, 0.58]


def test_threshold_commits_single_best_when_none_passes() -> None:
    conf = torch.tensor([[0.2, 0.6, 0.5]])
    masked = torch.tensor([[True, False, True]])
    policy = ThresholdPolicy(ThresholdParams(threshold=0.9))
    assert policy.select(conf, masked, _no_state(2)).tolist() == [[False, False, True]]


def test_fixed_without_step_budget_says_how_to_fix() -> None:
    conf = torch.tensor([[0.5, 0.5]])
    masked = torch.ones_like(conf, dtype=torch.bool)
    with pytest.raises(ValueError, match="steps"):
        FixedPolicy().select(conf, masked, _no_state(2))
