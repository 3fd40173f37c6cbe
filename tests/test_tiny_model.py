"""The shipped tiny models (``tiny``: LLaDA layout; ``tiny-bd``: SDAR layout, block
diffusion): each loads, solves held-out synthetic problems, decodes in parallel."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import dlm_decode
from dlm_decode.models.loading import SHIPPED_MODELS
from dlm_decode.tasks.synthetic import FAMILIES, SyntheticTask

GEN, BLOCK, N = 64, 16, 24  # the first 24 held-out problems: 4 of each of the 6 families
#: Each shipped model with the cache it is measured under (its preferred one).
SHIPPED = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(
            not (folder / "model.safetensors").is_file(),
            reason=f"the {name} checkpoint is not built (python {recipe})",
        ),
    )
    for name, (folder, recipe) in SHIPPED_MODELS.items()
]


@pytest.fixture(scope="module", params=SHIPPED)
def model(request: pytest.FixtureRequest) -> Any:
    """A packaged tiny model."""
    torch.set_num_threads(2)
    return dlm_decode.load_model(request.param)


def _cache(model: Any) -> str:
    return model.preferred_cache or "dual"


def _bar(model: Any) -> int:
    """Problems of the 24 a model must solve: ``tiny`` all but one; ``tiny-bd``, whose
    held-out bar is 90 %, all but two."""
    return N - 1 if model.name == "llada" else N - 2


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
    kw.setdefault("cache", _cache(model))
    return dlm_decode.generate(model, ids, policy=policy, gen_length=GEN, block_length=BLOCK, **kw)


def test_tiny_loads(model: Any) -> None:
    assert model.name in ("llada", "sdar")
    assert (model.attention.block_size is not None) == (model.name == "sdar")
    assert model.tokenizer is not None
    assert model.mask_token_id == model.tokenizer.mask_token_id
    assert model.tokenizer.eos_token_id in model.eos_token_ids
    assert 1_000_000 <= sum(p.numel() for p in model.module.parameters()) <= 5_000_000


def test_one_token_per_step_solves_every_family(model: Any, batch: Any) -> None:
    """The quality bar's baseline: one token per step (here on 24 problems, 4 per family)."""
    samples, ids = batch
    assert {s.meta["family"] for s in samples} == set(FAMILIES)
    res = _decode(model, ids, "fixed", steps=GEN)
    if model.attention.block_size is None:
        assert res.nfe == GEN
    else:  # one step per position of each grid block, plus the block writes
        assert int(res.commit_counts.max()) == 1
    assert _correct(samples, res.texts(model.tokenizer)) >= _bar(model)


def test_frechet_keeps_accuracy_with_under_40_percent_of_the_forwards(
    model: Any, batch: Any
) -> None:
    samples, ids = batch
    res = _decode(model, ids, "frechet", policy_args={"margin": 0.25})
    assert res.nfe_per_row.float().mean().item() <= 0.4 * GEN
    assert res.nfe <= 0.4 * GEN  # the batch's forwards, block writes included
    assert _correct(samples, res.texts(model.tokenizer)) >= _bar(model)


def test_an_aggressive_threshold_fails_the_hide_family(model: Any, batch: Any) -> None:
    """threshold 0.5 commits every letter the model is ~15/16 sure of, and so no ``*``:
    the suite separates policies that bound the joint from one that does not."""
    samples, ids = batch
    res = _decode(model, ids, "threshold", policy_args={"threshold": 0.5})
    assert _correct(samples, res.texts(model.tokenizer), "hide") <= 1


def test_the_block_cache_is_exact_on_tiny_bd(model: Any, batch: Any) -> None:
    """On the block-diffusion model, ``block`` commits exactly what ``none`` does, with
    fewer token-forwards; on ``tiny`` (full attention) ``block`` is ``none``."""
    _, ids = batch
    kw = dict(policy_args={"margin": 0.25}, early_stop=False)
    none = _decode(model, ids, "frechet", cache="none", **kw)
    block = _decode(model, ids, "frechet", cache="block", **kw)
    assert torch.equal(none.sequences, block.sequences)
    if model.attention.block_size is not None:
        assert block.token_forwards < none.token_forwards / 2
    else:
        assert block.token_forwards == none.token_forwards
