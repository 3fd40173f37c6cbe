"""The tiny model's training recipe (experiments/tiny/train.py): data layout and a smoke run."""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

import dlm_decode
from dlm_decode.tasks.synthetic import (
    SPECIAL_TOKENS,
    build_tokenizer,
    train_stream,
    validation_problems,
)

ROOT = Path(__file__).resolve().parents[1]
PAD, EOS = SPECIAL_TOKENS.index("<|pad|>"), SPECIAL_TOKENS.index("<|eos|>")


@pytest.fixture(scope="module")
def train() -> ModuleType:
    """``experiments/tiny/train.py`` imported as a module."""
    spec = importlib.util.spec_from_file_location("tiny_train", ROOT / "experiments/tiny/train.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rows_match_the_tokenizer_and_the_layout(train: ModuleType) -> None:
    tok = build_tokenizer()
    probs = list(itertools.islice(train_stream(3), 60)) + list(validation_problems()[:12])
    rows = train.encode_rows(probs, 40, 64)
    assert rows.shape == (len(probs), 104)
    for q, row in zip(probs, rows.tolist(), strict=True):
        pr = tok.encode(q.prompt, add_special_tokens=False)
        an = tok.encode(q.answer, add_special_tokens=False)
        assert row == [PAD] * (40 - len(pr)) + pr + an + [EOS] * (64 - len(an))


def test_rows_reject_problems_that_do_not_fit(train: ModuleType) -> None:
    q = next(train_stream(0))
    with pytest.raises(ValueError, match="too long for the layout"):
        train.encode_rows([q], 4, 64)
    with pytest.raises(ValueError, match="too long for the layout"):
        train.encode_rows([q], 40, len(q.answer))


def test_pool_is_seeded_and_batches_visit_every_row(train: ModuleType) -> None:
    a = train.build_pool(300, 1, 40, 64)
    assert torch.equal(a, train.build_pool(300, 1, 40, 64))
    assert not torch.equal(a, train.build_pool(300, 2, 40, 64))
    seen = torch.cat(list(itertools.islice(train.batches(a, 100, 0), 3)))
    assert seen.dtype == torch.long and seen.shape == (300, 104)
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, a.long().tolist()))


def test_lr_schedule_warms_up_then_decays(train: ModuleType) -> None:
    args = train.parse_args(["--lr", "1e-3", "--warmup", "10", "--steps", "110"])
    lrs = [train.lr_at(s, args) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(x >= y for x, y in itertools.pairwise(lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-3 * 0.05, rel=0.05)


def test_a_few_steps_write_a_loadable_checkpoint(train: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "out"
    train.main(
        [
            *("--steps", "4", "--batch", "8", "--pool", "64", "--eval-every", "2"),
            *("--eval-n", "6", "--eval-batch", "6", "--no-compile", "--threads", "1"),
            *("--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--mlp", "64"),
            *("--out", str(out), "--run-dir", str(tmp_path / "run")),
        ]
    )
    log = json.loads((out / "training_log.json").read_text())
    assert log["steps_done"] == 4 and [e["step"] for e in log["evals"]] == [2, 4]
    assert log["selected"]["step"] in (2, 4)
    model = dlm_decode.load_model(str(out))
    assert model.name == "llada" and model.tokenizer.mask_token_id == model.mask_token_id


def test_block_masks_look_like_block_decoding_states(train: ModuleType) -> None:
    gen = torch.Generator().manual_seed(0)
    t = torch.rand(400, generator=gen) * 0.9 + 0.1  # (B,)
    masked, weight = train.block_masks(t, 64, 1.0, gen)  # every row block-structured
    assert masked.shape == weight.shape == (400, 64)
    assert torch.equal(weight > 0, masked)

    def fits(row: list[bool], w: list[float], inv_t: float, length: int, k: int) -> bool:
        lo, hi = k * length, (k + 1) * length
        return (
            not any(row[:lo])  # clean before the current block
            and all(row[hi:])  # everything after it masked, weight 1
            and all(x == 1.0 for x in w[hi:])
            and all(
                x == pytest.approx(inv_t) for x, m in zip(w[lo:hi], row[lo:hi], strict=True) if m
            )
        )

    for row, w, tr in zip(masked.tolist(), weight.tolist(), t.tolist(), strict=True):
        shapes = [(n, k) for n in (16, 32) for k in range(64 // n)]
        assert any(fits(row, w, 1 / tr, n, k) for n, k in shapes), row
    uniform, uw = train.block_masks(t, 64, 0.0, gen)
    assert torch.equal(uw, uniform.float() / t[:, None])
    assert abs(uniform.float().mean().item() - t.mean().item()) < 0.02
