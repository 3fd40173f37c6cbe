"""The shipped tiny model: loads, solves held-out synthetic problems, decodes in parallel."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import dlm_decode
from dlm_decode.models.loading import TINY_FOLDER
from dlm_decode.tasks.synthetic import FAMILIES, SyntheticTask

pytestmark = pytest.mark.skipif(
    not (TINY_FOLDER / "model.safetensors").is_file(),
    reason="the tiny checkpoint is not built (python experiments/tiny/train.py)",
)

GEN, BLOCK, N = 64, 16, 24  # the first 24 held-out problems: 4 of each of the 6 families


@pytest.fixture(scope="module")
def model() -> Any:
    """The packaged tiny model."""
    torch.set_num_threads(2)
    return dlm_decode.load_model("tiny")


@pytest.fixture(scope="module")
def batch(model: Any) -> tuple[list[Any], list[list[int]]]:
    """The first ``N`` held-out samples (every family) and their prompt ids."""
    task = SyntheticTask()
    samples = task.samples(limit=N)
    ids = [model.tokenizer.encode(s.prompt, add_special_tokens=False) for s in samples]
    return samples, ids


def _correct(samples: list[Any], texts: list[str], family: str | None = None) -> int:
    task = SyntheticTask()
    return sum(
        task.score(s, t)["correct"]
        for s, t in zip(samples, texts, strict=True)
        if family is None or s.meta["family"] == family
    )


def _decode(model: Any, ids: list[list[int]], policy: str, **kw: Any) -> Any:
    return dlm_decode.generate(
        model, ids, policy=policy, gen_length=GEN, block_length=BLOCK, cache="dual", **kw
    )


def test_tiny_loads(model: Any) -> None:
    assert model.name == "llada"
    assert model.tokenizer is not None
    assert model.mask_token_id == model.tokenizer.mask_token_id
    assert model.tokenizer.eos_token_id in model.eos_token_ids
    assert 1_000_000 <= sum(p.numel() for p in model.module.parameters()) <= 5_000_000


def test_one_token_per_step_solves_every_family(model: Any, batch: Any) -> None:
    """The quality bar's baseline: one token per step (here on 24 problems, 4 per family)."""
    samples, ids = batch
    assert {s.meta["family"] for s in samples} == set(FAMILIES)
    res = _decode(model, ids, "fixed", steps=GEN)
    assert res.nfe == GEN
    assert _correct(samples, res.texts(model.tokenizer)) >= N - 1


def test_frechet_keeps_accuracy_with_under_40_percent_of_the_forwards(
    model: Any, batch: Any
) -> None:
    samples, ids = batch
    res = _decode(model, ids, "frechet", policy_args={"margin": 0.25})
    assert res.nfe_per_row.float().mean().item() <= 0.4 * GEN
    assert _correct(samples, res.texts(model.tokenizer)) >= N - 1


def test_an_aggressive_threshold_fails_the_hide_family(model: Any, batch: Any) -> None:
    """threshold 0.5 commits every letter the model is ~15/16 sure of, and so no ``*``:
    the suite separates policies that bound the joint from one that does not."""
    samples, ids = batch
    res = _decode(model, ids, "threshold", policy_args={"threshold": 0.5})
    assert _correct(samples, res.texts(model.tokenizer), "hide") <= 1
