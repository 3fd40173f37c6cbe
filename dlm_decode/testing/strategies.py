"""Shape-aware Hypothesis strategies for commit-rule tests (the project's own and plugin
authors').

Everything a commit policy sees is drawn here, once:

* [`confidence_rows`][dlm_decode.testing.strategies.confidence_rows] — one row of confidences in
  ``[0, 1]``: free values, a few tied
  values, a flat profile, or ties mixed with exact ``0`` and ``1``;
* [`masks`][dlm_decode.testing.strategies.masks] — ``(B, L)`` bool masks with ragged rows (fully
  masked, fully unmasked,
  random);
* [`policy_inputs`][dlm_decode.testing.strategies.policy_inputs] — a whole ``(confidence, masked,
  state)`` triple for ``select``;
* [`sorted_profiles`][dlm_decode.testing.strategies.sorted_profiles] — one descending profile, for
  the pure functions of
  ``dlm_decode.frechet``.

``exact=True`` draws values from the dyadic grid ``k / 64``. Sums of up to 40 such values,
and every score the rules compute from them, are exact in float32 and float64, so a
vectorized rule must agree with a pure-Python reference *exactly*, including at the
boundaries where ``>`` and ``≥`` differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dlm_decode.interfaces import StepState

__all__ = [
    "DTYPES",
    "GRID",
    "MAX_BATCH",
    "MAX_LENGTH",
    "PolicyInput",
    "StepInput",
    "confidence_rows",
    "dtypes",
    "grid_values",
    "masks",
    "policy_inputs",
    "sorted_profiles",
    "step_inputs",
    "unit_values",
]

MAX_BATCH = 4
MAX_LENGTH = 40
GRID = 64
DTYPES = (torch.float32, torch.float64)


def dtypes() -> st.SearchStrategy[torch.dtype]:
    """float32 or float64, the dtypes a policy may receive."""
    return st.sampled_from(DTYPES)


def unit_values() -> st.SearchStrategy[float]:
    """Floats in ``[0, 1]`` (Hypothesis draws the endpoints and near-boundary floats often)."""
    return st.floats(0.0, 1.0, allow_nan=False, allow_infinity=False)


def grid_values(denominator: int = GRID) -> st.SearchStrategy[float]:
    """Values ``k / denominator`` for ``k = 0 … denominator`` (exact in binary floats)."""
    return st.integers(0, denominator).map(lambda k: k / denominator)


@st.composite
def confidence_rows(draw: st.DrawFn, length: int, *, exact: bool = False) -> list[float]:
    """One row of ``length`` confidences: free values, a small pool of ties, or flat.

    Args:
        draw: Hypothesis draw function.
        length: number of values.
        exact: draw from the dyadic grid (see the module docstring).

    Returns:
        The values, unsorted.
    """
    value = grid_values() if exact else unit_values()
    kind = draw(st.sampled_from(["free", "ties", "flat", "endpoints"]))
    if kind == "flat":
        return [draw(value)] * length
    if kind in ("ties", "endpoints"):
        pool = draw(st.lists(value, min_size=1, max_size=3))
        if kind == "endpoints":
            pool += [0.0, 1.0]
        picks = draw(hnp.arrays(np.int64, length, elements=st.integers(0, len(pool) - 1)))
        return [pool[i] for i in picks.tolist()]
    if exact:
        ks = draw(hnp.arrays(np.int64, length, elements=st.integers(0, GRID)))
        return (ks / GRID).tolist()
    return draw(hnp.arrays(np.float64, length, elements=value)).tolist()


@st.composite
def sorted_profiles(
    draw: st.DrawFn,
    *,
    min_length: int = 1,
    max_length: int = MAX_LENGTH,
    exact: bool = False,
) -> list[float]:
    """One profile sorted descending, ``c(1) ≥ c(2) ≥ …``."""
    length = draw(st.integers(min_length, max_length))
    return sorted(draw(confidence_rows(length, exact=exact)), reverse=True)


@st.composite
def masks(draw: st.DrawFn, batch: int, length: int) -> torch.Tensor:
    """A ``(batch, length)`` bool mask whose rows are fully masked, unmasked or random."""
    rows = []
    for _ in range(batch):
        kind = draw(st.sampled_from(["all", "none", "random"]))
        if kind == "all":
            rows.append([True] * length)
        elif kind == "none":
            rows.append([False] * length)
        else:
            rows.append(draw(hnp.arrays(np.bool_, length)).tolist())
    return torch.tensor(rows, dtype=torch.bool)


@dataclass(frozen=True)
class PolicyInput:
    """What [`CommitPolicy.select`][dlm_decode.interfaces.CommitPolicy.select] receives, plus
    the raw Python values.

    Attributes:
        confidence: ``(B, L)`` float tensor.
        masked: ``(B, L)`` bool tensor.
        state: the step state (always carries a step budget, so ``fixed`` runs too).
        rows: the confidence values as Python floats, per row.
        mask_rows: the mask as Python bools, per row.
    """

    confidence: torch.Tensor
    masked: torch.Tensor
    state: StepState
    rows: list[list[float]]
    mask_rows: list[list[bool]]

    def to(self, device: str | torch.device) -> PolicyInput:
        """The same input on another device."""
        state = StepState(
            step=self.state.step,
            block_index=self.state.block_index,
            num_blocks=self.state.num_blocks,
            steps_per_block=self.state.steps_per_block,
            block_masked_at_start=self.state.block_masked_at_start.to(device),
        )
        return PolicyInput(
            self.confidence.to(device), self.masked.to(device), state, self.rows, self.mask_rows
        )


@st.composite
def policy_inputs(
    draw: st.DrawFn,
    *,
    max_batch: int = MAX_BATCH,
    max_length: int = MAX_LENGTH,
    exact: bool = False,
    dtype: torch.dtype | None = None,
) -> PolicyInput:
    """A batch of confidences with a ragged mask and a consistent
    [`StepState`][dlm_decode.interfaces.StepState].

    ``block_masked_at_start`` is at least each row's current masked count, and the step index
    lies in ``[0, steps_per_block)``, as the Decoder guarantees for a schedule that has not
    run out.

    Args:
        draw: Hypothesis draw function.
        max_batch: largest ``B`` (at least 1).
        max_length: largest ``L`` (at least 1).
        exact: draw confidences from the dyadic grid.
        dtype: force a dtype; default float32 or float64.

    Returns:
        A [`PolicyInput`][dlm_decode.testing.strategies.PolicyInput] on the CPU.
    """
    batch = draw(st.integers(1, max_batch))
    length = draw(st.integers(1, max_length))
    dt = dtype if dtype is not None else draw(dtypes())
    rows = [draw(confidence_rows(length, exact=exact)) for _ in range(batch)]
    masked = draw(masks(batch, length))
    steps = draw(st.integers(1, length))
    step = draw(st.integers(0, steps - 1))
    extra = draw(st.lists(st.integers(0, length), min_size=batch, max_size=batch))
    m = masked.sum(-1)
    m0 = torch.minimum(m + torch.tensor(extra), torch.full_like(m, length))
    state = StepState(
        step=step,
        block_index=draw(st.integers(0, 3)),
        num_blocks=4,
        steps_per_block=steps,
        block_masked_at_start=m0,
    )
    return PolicyInput(
        confidence=torch.tensor(rows, dtype=dt),
        masked=masked,
        state=state,
        rows=rows,
        mask_rows=masked.tolist(),
    )


@dataclass(frozen=True)
class StepInput:
    """A contract-v2 step: the block's logits and its state before the step.

    Attributes:
        logits: ``(B, L, V)`` float32 logits (the mask id is ``V − 1``).
        block: ``(B, L)`` long tokens (the mask id where masked).
        committed_at: ``(B, L)`` long, as [`History`][dlm_decode.signals.History] keeps it:
            ``-1`` masked, ``-2`` filled before the block, ``≥ 0`` committed at that step.
        step: the step index within the block (``committed_at < step``).
        steps_per_block: a step budget (``fixed`` reads it).
    """

    logits: torch.Tensor
    block: torch.Tensor
    committed_at: torch.Tensor
    step: int
    steps_per_block: int

    @property
    def mask_token_id(self) -> int:
        """The mask id, the last of the vocabulary."""
        return self.logits.shape[-1] - 1

    @property
    def masked(self) -> torch.Tensor:
        """``(B, L)`` bool."""
        return self.block == self.mask_token_id


@st.composite
def step_inputs(
    draw: st.DrawFn, *, max_batch: int = MAX_BATCH, max_length: int = 16, max_vocab: int = 12
) -> StepInput:
    """A batch of logits with a ragged block state: rows fully masked, fully committed or
    mixed, committed positions from earlier steps of the block or from before it, peaked,
    flat and tied logits.

    Args:
        draw: Hypothesis draw function.
        max_batch: largest ``B``.
        max_length: largest ``L``.
        max_vocab: largest ``V`` (at least 3: two tokens and the mask).

    Returns:
        A [`StepInput`][dlm_decode.testing.strategies.StepInput] on the CPU.
    """
    b = draw(st.integers(1, max_batch))
    n = draw(st.integers(1, max_length))
    v = draw(st.integers(3, max_vocab))
    scale = draw(st.sampled_from([0.0, 1.0, 4.0, 12.0]))  # 0: a flat profile, every tie
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn((b, n, v), generator=g) * scale  # (B, L, V)
    masked = draw(masks(b, n))
    step = draw(st.integers(0, n))
    tokens = torch.randint(0, v - 1, (b, n), generator=g)
    before = torch.rand((b, n), generator=g) < 0.3
    at = torch.randint(0, max(step, 1), (b, n), generator=g)
    at = torch.where(before | (step == 0), -2, at)
    committed_at = torch.where(masked, -1, at)
    block = torch.where(masked, v - 1, tokens)
    return StepInput(logits, block, committed_at, step, max(step + 1, n))
