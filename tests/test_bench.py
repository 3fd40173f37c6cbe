"""``dlm-decode bench`` and the fast path: JSON rows, the 8B refusal on CPU, and the fast
path (static buffers; CUDA graphs on a GPU) committing exactly the reference's tokens."""

from __future__ import annotations

import json

import pytest
import torch

from dlm_decode.cli import main
from dlm_decode.config import DecodeConfig
from dlm_decode.decoder import Decoder, PolicyContractError
from dlm_decode.fast import FastDecoder
from dlm_decode.interfaces import CommitPolicy
from dlm_decode.models import build_model

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CACHES = ["none", "prefix", "dual"]
SETTINGS = [  # (policy, policy_args, extra config fields)
    ("frechet", {"margin": 0.1}, {}),
    ("threshold", {"threshold": 0.3}, {"early_stop": True}),
    ("fixed", {}, {"steps": 8}),
    ("frechet_robust", {"margin": 0.0, "eta": 0.05}, {"temperature": 0.7, "trace": True}),
]
GEN, BLOCK = 16, 8


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes are dispatch-bound; two shared cores contend badly with two threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _model(arch: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    m = build_model(arch, device=device, dtype=dtype, seed=1)
    m.module.head.weight.mul_(25.0)  # peaky logits: varied profiles, several commits a step
    return m


@pytest.fixture(scope="module", params=["llada-tiny", "dream-tiny"])
def model(request):
    return _model(request.param)


def _prompts(lengths=(5, 9, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 120, (n,), generator=g) for n in lengths]


def _same(a, b) -> None:
    assert torch.equal(a.sequences.cpu(), b.sequences.cpu())
    assert a.nfe == b.nfe
    assert torch.equal(a.commit_counts, b.commit_counts)
    assert torch.equal(a.nfe_per_row, b.nfe_per_row)
    assert torch.equal(a.step_blocks, b.step_blocks)
    if a.trace is not None:
        assert [(s.committed, s.positions, s.tokens) for s in a.trace] == [
            (s.committed, s.positions, s.tokens) for s in b.trace
        ]


# --- the fast path on CPU (same static-buffer code the GPU captures) ------------------------


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s[0])
def test_fast_path_commits_the_reference_tokens(model, cache, setting):
    policy, pargs, extra = setting
    cfg = DecodeConfig(
        policy=policy,
        policy_args=pargs,
        cache=cache,
        gen_length=GEN,
        block_length=BLOCK,
        **extra,
    )
    fast = FastDecoder(model, cfg)
    assert fast.graphs is False  # CPU: the stages run eagerly
    padded, square = _prompts(), torch.stack(_prompts((6, 6, 6), seed=1))
    for prompts in (padded, square, padded):  # reuse, reallocation, reuse again
        ref = Decoder(model, cfg).generate(prompts)
        _same(ref, fast.generate(prompts))
    assert max(int(c.max()) for c in ref.commit_counts) >= 1


def test_static_buffers_are_reused_and_results_are_copies(model):
    cfg = DecodeConfig(cache="dual", gen_length=GEN, block_length=BLOCK)
    fast = FastDecoder(model, cfg)
    a = torch.stack(_prompts((4, 4)))
    b = torch.stack(_prompts((4, 4), seed=5))
    ra = fast.generate(a)
    st = fast._state
    ptrs = (st.x.data_ptr(), st.logits.data_ptr(), st.ctx.kv.k.data_ptr())
    kept = ra.sequences.clone()
    rb = fast.generate(b)
    assert fast._state is st  # same shape: same buffers
    assert (st.x.data_ptr(), st.logits.data_ptr(), st.ctx.kv.k.data_ptr()) == ptrs
    assert torch.equal(ra.sequences, kept)  # the result is not the reused buffer
    assert not torch.equal(ra.sequences, rb.sequences)
    fast.generate(torch.stack(_prompts((4, 4, 4))))  # new batch size: new buffers
    assert fast._state is not st and fast._state.batch_size == 3
    fast.release()
    assert fast._state is None


def test_graphs_on_cpu_model_is_refused(model):
    with pytest.raises(ValueError, match="CUDA"):
        FastDecoder(model, DecodeConfig(gen_length=GEN, block_length=BLOCK), graphs=True)


class _Lazy(CommitPolicy):
    name = "lazy_test"

    def select(self, confidence, masked, state):
        return torch.zeros_like(masked)


def test_fast_path_enforces_the_policy_contract(model):
    cfg = DecodeConfig(gen_length=GEN, block_length=BLOCK)
    with pytest.raises(PolicyContractError, match="committed nothing"):
        FastDecoder(model, cfg, policy=_Lazy()).generate(_prompts())


# --- the bench command ---------------------------------------------------------------------

ARGS = [
    "bench",
    "--arch",
    "tiny",
    "--random-weights",
    "--prompt-length",
    "32",
    "--gen-length",
    "32",
    "--block-length",
    "16",
    "--batch-sizes",
    "1,2",
    "--repeats",
    "1",
]


@pytest.fixture(scope="module")
def compare_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    old = torch.get_num_threads()
    try:
        rc = main([*ARGS, "--warmup", "1", "--compare", "--json", str(path)])
    finally:
        torch.set_num_threads(old)
    assert rc == 0
    return json.loads(path.read_text())


def test_bench_writes_every_cache_and_batch(compare_json):
    rows = compare_json["rows"]
    assert {(r["cache"], r["batch_size"]) for r in rows} == {(c, b) for c in CACHES for b in (1, 2)}
    assert len(rows) == 6
    for r in rows:
        assert r["ms_per_nfe"] > 0 and r["slow_ms_per_nfe"] > 0
        assert r["nfe"] >= 32 // 16
        assert r["token_forwards"] >= r["nfe"] * r["batch_size"]  # every forward computes
        assert r["tokens_per_s"] > 0
        assert 0 <= r["outside_forward_share"] <= 1
        assert r["agree"] is True
        assert r["peak_mem_bytes"] >= 0 and r["static_bytes"] > 0
    meta = compare_json["meta"]
    assert meta["device"] == "cpu" and meta["mem_kind"].startswith("cpu")
    assert meta["threads"] == 1


def test_bench_without_compare_prints_a_table(tmp_path, capsys):
    path = tmp_path / "b.json"
    argv = [*ARGS, "--caches", "dual", "--batch-sizes", "2", "--warmup", "0", "--no-profile"]
    rc = main([*argv, "--json", str(path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "ms/NFE" in out and "dual" in out
    (row,) = json.loads(path.read_text())["rows"]
    assert row["agree"] is None and row["outside_forward_share"] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
@pytest.mark.parametrize("arch", ["llada-8b", "dream-7b"])
def test_8b_preset_on_cpu_exits_2_with_one_line(arch, capsys):
    assert main(["bench", "--arch", arch, "--random-weights"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"dlm-decode: error: {arch} needs a GPU; use --arch tiny on CPU"]


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--batch-sizes", "1,x"], "--batch-sizes"),
        (["--policies", "frechet:margin"], "key=value"),
        (["--caches", "dula"], "dula"),
        (["--policies", "fixed"], "needs steps"),
    ],
)
def test_bench_user_errors_exit_2(argv, msg, capsys):
    assert main(["bench", "--arch", "tiny", *argv]) == 2
    assert msg in capsys.readouterr().err


# --- GPU: the captured graphs ---------------------------------------------------------------


@requires_cuda
@pytest.mark.requires_cuda
@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_graphs_commit_the_reference_tokens(cache, dtype):
    model = _model("llada-tiny", device="cuda", dtype=dtype)
    cfg = DecodeConfig(cache=cache, gen_length=32, block_length=8)
    prompts = torch.stack(_prompts((12, 12, 12, 12))).cuda()
    ref = Decoder(model, cfg).generate(prompts)
    fast = FastDecoder(model, cfg)
    assert fast.graphs is True
    for i in range(3):  # warm-up, capture, replay
        _same(ref, fast.generate(prompts))
        if i == 2:
            assert fast.stats["replays"] > 0 and fast.stats["eager"] == 0
    padded = [p.cuda() for p in _prompts()]
    ref_p = Decoder(model, cfg).generate(padded)
    for _ in range(3):
        _same(ref_p, fast.generate(padded))


@requires_cuda
@pytest.mark.requires_cuda
@pytest.mark.parametrize("arch", ["llada-tiny", "dream-tiny"])
def test_cuda_graph_fallbacks_still_agree(arch):
    model = _model(arch, device="cuda")
    prompts = [p.cuda() for p in _prompts()]
    for policy, pargs, extra in SETTINGS:
        cfg = DecodeConfig(
            policy=policy,
            policy_args=pargs,
            cache="dual",
            gen_length=GEN,
            block_length=BLOCK,
            **extra,
        )
        ref = Decoder(model, cfg).generate(prompts)
        fast = FastDecoder(model, cfg)
        for _ in range(3):
            _same(ref, fast.generate(prompts))


@requires_cuda
@pytest.mark.requires_cuda
def test_bench_on_cuda_reports_graphs(tmp_path):
    path = tmp_path / "b.json"
    rc = main([*ARGS, "--device", "cuda", "--compare", "--json", str(path)])
    assert rc == 0
    rows = json.loads(path.read_text())["rows"]
    assert all(r["graphs"] and r["agree"] for r in rows)
