"""pytest-benchmark timings of one tiny decode per cache, fast path (runs as a plain test)."""

from __future__ import annotations

import pytest
import torch

from dlm_decode.config import DecodeConfig
from dlm_decode.fast import FastDecoder
from dlm_decode.models import build_model


@pytest.fixture(scope="module")
def tiny():
    return build_model("llada-tiny", device="cpu", dtype=torch.float32, seed=0)


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_tiny_decode(benchmark, tiny, cache):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = DecodeConfig(cache=cache, gen_length=32, block_length=16)
        dec = FastDecoder(tiny, cfg)
        prompts = torch.randint(0, 120, (2, 32), generator=torch.Generator().manual_seed(0))
        res = benchmark.pedantic(dec.generate, args=(prompts,), rounds=3, warmup_rounds=1)
    finally:
        torch.set_num_threads(old)
    assert res.nfe >= 32 // 16
    assert res.sequences.shape == (2, 64)
    benchmark.extra_info["nfe"] = res.nfe
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["ms_per_nfe"] = 1e3 * benchmark.stats.stats.median / res.nfe
