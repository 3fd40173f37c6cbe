"""The tiny-bd training recipe (experiments/tiny_bd/train.py): the block-diffusion mask
conditions every noisy block exactly as a decode does, the warm start, and a smoke run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import dlm_decode
from dlm_decode.models.sdar import SDARModel

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bd() -> ModuleType:
    """``experiments/tiny_bd/train.py`` imported as a module."""
    path = ROOT / "experiments/tiny_bd/train.py"
    spec = importlib.util.spec_from_file_location("tiny_bd_train", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["tiny_bd_train"] = mod
    spec.loader.exec_module(mod)
    return mod


def _small(bd: ModuleType, block: int = 8) -> SDARModel:
    args = bd.parse_args(["--d-model", "32", "--n-heads", "2", "--n-layers", "2", "--mlp", "64"])
    args.block_size = block
    return SDARModel.from_config(bd.model_config(args, 100), seed=1, dtype=torch.float64)


def test_noisy_blocks_see_what_a_decode_shows_them(bd: ModuleType) -> None:
    """The noisy half's logits at block k equal a block-causal forward of the clean blocks
    before k, block k noisy, anything after it (unseen): the decode-time state."""
    model, m = _small(bd), 8
    rows = bd.tiny.build_pool(5, 3, 40, 64).long()  # (5, 104)
    ids = torch.cat([torch.full((5, 3), bd.PAD), rows, torch.full((5, 5), bd.EOS)], 1)  # (5, 112)
    t = ids.shape[1]
    am = ids != bd.PAD
    pos = (am.long().cumsum(-1) - 1).clamp(min=0)
    g = torch.Generator().manual_seed(0)
    masked = (torch.rand(ids.shape, generator=g) < 0.5) & (torch.arange(t) >= 43)
    noisy = torch.where(masked, bd.MASK, ids)
    mask = bd.block_diffusion_mask(am, m)
    assert mask.shape == (5, 1, 2 * t, 2 * t)
    got = bd.forward_bd(model.module, torch.cat([noisy, ids], 1), torch.cat([pos, pos], 1), mask)
    for k in range(t // m):
        lo, hi = k * m, (k + 1) * m
        state = ids.clone()
        state[:, lo:hi] = noisy[:, lo:hi]
        state[:, hi:] = torch.randint(4, 100, (5, t - hi), generator=g)  # never seen
        want = model.module(state, attention_mask=am, position_ids=pos)[:, lo:hi]
        real = am[:, lo:hi]
        torch.testing.assert_close(got[:, lo:hi][real], want[real].float(), rtol=0, atol=1e-6)


def test_the_mask_never_lets_a_clean_row_see_noise(bd: ModuleType) -> None:
    am = torch.ones(1, 8, dtype=torch.bool)
    am[0, :2] = False
    mask = bd.block_diffusion_mask(am, 4)[0, 0]  # (16, 16)
    assert not mask[8:, :8].any()  # clean queries, noisy keys
    assert not (mask[:, [0, 1, 8, 9]] & ~torch.eye(16, dtype=torch.bool)[:, [0, 1, 8, 9]]).any()
    assert mask[4, 4:8].all() and not mask[4, :4].any() and mask[4, 10:12].all()  # block 1
    assert not mask[4, 12:].any()  # nor its own clean block


def test_loss_masks_only_answer_slots_and_covers_the_grid(
    bd: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _small(bd)
    args = bd.parse_args(["--no-compile", "--block-size", "8", "--complementary"])
    seen: dict[str, torch.Tensor] = {}

    def spy(ids: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        seen["ids"], seen["masked"] = ids, masked
        return torch.zeros(())

    monkeypatch.setattr(bd.tiny, "compile_or_eager", lambda fn, a: spy)
    step = bd.bd_loss(model.module, args)
    rows = bd.tiny.build_pool(16, 3, 40, 64).long()  # (16, 104)
    step(rows, None, torch.Generator().manual_seed(2))
    ids, masked = seen["ids"], seen["masked"]  # (32, T): the rows, then their complements
    t = ids.shape[1]
    assert t % 8 == 0 and ids.shape[0] == 32
    shifts = [s for s in range(8) if torch.equal(ids[:16, s : s + 104], rows)]
    assert len(shifts) == 1
    shift = shifts[0]
    assert (ids[:, :shift] == bd.PAD).all() and (ids[:, shift + 104 :] == bd.EOS).all()
    answer = torch.arange(t) >= shift + 40
    assert not masked[:, ~answer].any()  # the prompt (and padding) is never masked
    assert torch.equal(masked[:16] ^ masked[16:], answer.expand(16, t))  # complementary


def test_warm_start_copies_llada_and_sets_qk_norms(bd: ModuleType) -> None:
    args = bd.parse_args([])
    model = SDARModel.from_config(bd.model_config(args, 100), seed=0, dtype=torch.float32)
    probe = bd.tiny.build_pool(32, 5, 40, 64).long()
    info = bd.init_from_llada(model, args.init_llada, probe)
    tiny = dlm_decode.load_model("tiny")
    src = tiny.module.state_dict()
    for name, value in model.module.state_dict().items():
        if "q_norm" in name or "k_norm" in name:
            assert (value > 0).all() and not torch.equal(value, torch.ones_like(value))
        else:
            assert torch.equal(value, src[name]), name
    assert len(info["qk_norm_init_mean"]) == 2 * args.n_layers


def test_a_few_steps_write_a_loadable_block_diffusion_checkpoint(
    bd: ModuleType, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    bd.main(
        [
            *("--steps", "3", "--batch", "4", "--pool", "32", "--eval-every", "3"),
            *("--eval-n", "6", "--eval-batch", "6", "--no-compile", "--threads", "1"),
            *("--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--mlp", "64"),
            *("--init-llada", "", "--complementary", "--block-size", "8"),
            *("--out", str(out), "--run-dir", str(tmp_path / "run")),
        ]
    )
    log = json.loads((out / "training_log.json").read_text())
    assert log["steps_done"] == 3 and log["objective"] == "block diffusion"
    assert [e["step"] for e in log["evals"]] == [3] and "overall" in log["evals"][0]
    model = dlm_decode.load_model(str(out))
    assert model.name == "sdar" and model.attention.block_size == 8
    assert model.preferred_cache == "block"
