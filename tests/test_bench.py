"""``dlm-decode bench`` and the fast path: JSON rows, the 8B refusal on CPU, and the fast
path (static buffers; CUDA graphs on a GPU) committing exactly the reference's tokens; the
forward floor, the time breakdown and the commit profile (structure and invariants only:
timings on a shared machine are noise)."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch

from dlm_decode import bench
from dlm_decode.bench import (
    CommitProfileParams,
    CommitProfilePolicy,
    StageRecorder,
    known_bandwidth_gbs,
    profile_counts,
    profile_steps_per_block,
)
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
    assert row["breakdown"] is None and row["floor_ms_per_nfe"] is None
    assert "floor" not in out  # the floor columns only with --floor


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


# --- the time breakdown ----------------------------------------------------------------------

PARTS = ("refresh_forward_s", "step_forward_s", "select_s", "host_sync_s", "remainder_s")


def _check_breakdown(bd: dict, nfe: int, blocks: int) -> None:
    assert all(bd[k] >= 0 for k in PARTS), bd
    assert bd["total_s"] > 0
    parts = sum(bd[k] for k in PARTS)
    assert parts <= bd["total_s"] * (1 + 1e-6) + 1e-6  # the parts never exceed the wall time
    assert math.isclose(parts, bd["total_s"], rel_tol=1e-6, abs_tol=1e-6)  # and fill it
    assert bd["refresh_forward_s"] + bd["step_forward_s"] > 0
    assert bd["nfe"] == nfe and bd["refreshes"] + bd["steps"] == nfe
    assert bd["refreshes"] == blocks  # one refresh per block (no refresh_every)
    assert bd["clock"] == "perf_counter"


def test_bench_breakdown_partitions_the_decode(compare_json):
    for r in compare_json["rows"]:
        _check_breakdown(r["breakdown"], r["nfe"], blocks=2)
        _check_breakdown(r["extra"]["slow_breakdown"], r["nfe"], blocks=2)


def test_stage_recorder_restores_the_decoder(model):
    cfg = DecodeConfig(cache="dual", gen_length=GEN, block_length=BLOCK)
    for dec in (Decoder(model, cfg), FastDecoder(model, cfg)):
        ref = dec.generate(_prompts())
        with StageRecorder(dec) as rec:
            out = dec.generate(_prompts())
        assert "_forward" not in vars(dec) and "_select" not in vars(dec)
        _same(ref, out)  # recording changes nothing
        assert len(rec.forwards) == out.nfe
        assert [f.refresh for f in rec.forwards].count(True) == GEN // BLOCK
        steps = [f for f in rec.forwards if not f.refresh]
        assert {f.span for f in steps} == {BLOCK + model.logits_shift}  # dual: the block
        assert all(f.kv for f in rec.forwards)
        bd = rec.breakdown(out.timings["total_s"])
        assert all(bd[k] >= 0 for k in PARTS)


# --- the forward floor ------------------------------------------------------------------------

BANDWIDTH = 100.0  # GB/s, given: a CPU has no table entry


@pytest.fixture(scope="module")
def floor_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("floor") / "floor.json"
    argv = [*ARGS, "--batch-sizes", "2", "--warmup", "1", "--floor", "--floor-repeats", "2"]
    argv += ["--bandwidth-gbs", str(BANDWIDTH), "--json", str(path)]
    out = io.StringIO()
    old = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out):
            rc = main(argv)
    finally:
        torch.set_num_threads(old)
    assert rc == 0
    return json.loads(path.read_text()), out.getvalue()


def test_floor_columns_and_fields(floor_run):
    data, printed = floor_run
    header = next(line for line in printed.splitlines() if "ms/NFE" in line and "cache" in line)
    assert "floor" in header and "ratio" in header and "wt-read" in header
    meta = data["meta"]
    assert meta["bandwidth_gbs"] == BANDWIDTH and meta["bandwidth_source"] == "--bandwidth-gbs"
    assert meta["weight_bytes"] > 0
    assert {r["cache"] for r in data["rows"]} == set(CACHES)
    for r in data["rows"]:
        fl = r["extra"]["floor"]
        assert r["floor_ms_per_nfe"] > 0 and r["floor_ratio"] > 0
        assert math.isclose(r["floor_ratio"], r["ms_per_nfe"] / r["floor_ms_per_nfe"])
        assert r["floor_ms_per_nfe"] <= 5 * r["ms_per_nfe"]  # a floor, give or take noise
        assert math.isclose(r["weight_read_ms_per_nfe"], 1e3 * meta["weight_bytes"] / 1e11)
        assert fl["kind"] == "eager"  # CPU
        assert fl["refreshes"] + fl["steps"] == r["nfe"] and fl["refreshes"] == 2
        assert sum(sh["count"] for sh in fl["shapes"]) == r["nfe"]
        # (refreshes × t_full + Σ t_step) / NFE, from the shapes' own times
        total = sum(sh["ms"] * sh["count"] for sh in fl["shapes"])
        assert math.isclose(r["floor_ms_per_nfe"], total / r["nfe"])
        spans = {sh["span"] for sh in fl["shapes"]}
        assert 64 in spans  # the full sequence (prompt 32 + gen 32): refreshes, none
        if r["cache"] == "none":
            assert spans == {64} and fl["t_step_ms"] is None
        elif r["cache"] == "dual":
            assert spans - {64} <= {16, 17}  # the block (+1 before it if shifted)
        else:  # prefix: block start to the end, one span per block
            assert len(spans - {64}) == 2 and max(spans - {64}) <= 33
        _check_breakdown(r["breakdown"], r["nfe"], blocks=2)


def test_forward_floor_weights_the_mix():
    m = build_model("llada-tiny", device="cpu", seed=0)
    fwds = [bench.ForwardRecord(True, 8, 16, 24, True)]
    fwds += [bench.ForwardRecord(False, 8, 16, 8, True)] * 3
    fl = bench.forward_floor(m, fwds, 2, 24, repeats=1, warmup=0)
    assert (fl["refreshes"], fl["steps"], fl["full_span_forwards"]) == (1, 3, 1)
    want = (fl["t_full_ms"] + 3 * fl["t_step_ms"]) / 4
    assert math.isclose(fl["floor_ms_per_nfe"], want)
    with pytest.raises(ValueError, match="forwards"):
        bench.forward_floor(m, [], 2, 24)


@pytest.mark.parametrize(
    "name, gbs",
    [
        ("NVIDIA H200", 4800.0),
        ("NVIDIA H100 80GB HBM3", 3350.0),
        ("NVIDIA A100-SXM4-80GB", 2039.0),
        ("cpu", None),
        ("Some Future GPU", None),
    ],
)
def test_known_bandwidth(name, gbs):
    assert known_bandwidth_gbs(name) == gbs


# --- the commit profile -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "profile, counts, steps",
    [
        ("3.5", [3, 4, 3, 4, 3, 4, 3, 4], 5),  # ⌈16 / 3.5⌉
        ("1", [1] * 8, 16),
        ("2.5", [2, 3, 2, 3, 2, 3, 2, 3], 7),  # ⌈16 / 2.5⌉
        ("1,2,4", [1, 2, 4, 4, 4, 4, 4, 4], 6),  # 1, 3, 7, 11, 15, 19
        ("16", [16] * 8, 1),
    ],
)
def test_profile_counts_and_steps(profile, counts, steps):
    assert profile_counts(profile, 16)[:8] == counts
    assert profile_steps_per_block(profile, 16) == steps


@pytest.mark.parametrize("profile", ["3.5", "1,2,4"])
def test_commit_profile_policy_fast_equals_reference(model, profile):
    pol = CommitProfilePolicy(CommitProfileParams(profile=profile))
    cfg = DecodeConfig(cache="dual", gen_length=GEN, block_length=BLOCK)
    prompts = torch.stack(_prompts((6, 6)))
    ref = Decoder(model, cfg, policy=pol).generate(prompts)
    fast = FastDecoder(model, cfg, policy=pol)
    for _ in range(2):
        _same(ref, fast.generate(prompts))
    assert ref.nfe == (GEN // BLOCK) * profile_steps_per_block(profile, BLOCK)
    per_step = profile_counts(profile, BLOCK)
    blocks = ref.step_blocks.tolist()
    k = 0
    for i, b in enumerate(blocks):  # each step commits its count (capped by what is left)
        k = 0 if i == 0 or blocks[i - 1] != b else k + 1
        left = BLOCK - sum(per_step[:k])
        assert ref.commit_counts[i].tolist() == [min(per_step[k], left)] * 2


def test_bench_tokens_per_step_gives_the_exact_nfe(tmp_path):
    path = tmp_path / "p.json"
    argv = [*ARGS, "--batch-sizes", "2", "--warmup", "0", "--tokens-per-step", "3.5"]
    assert main([*argv, "--compare", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["meta"]["tokens_per_step"] == "3.5"
    assert {r["cache"] for r in data["rows"]} == set(CACHES)
    for r in data["rows"]:
        # gen 32 in 2 blocks of 16; 3, 4, 3, 4, 3 tokens: ⌈16 / 3.5⌉ = 5 steps a block
        assert r["nfe"] == 10 == r["extra"]["expected_nfe"]
        assert r["policy"] == "commit_profile(profile=3.5)"
        assert r["agree"] is True
        assert r["breakdown"]["refreshes"] == 2 and r["breakdown"]["steps"] == 8


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--tokens-per-step", "0"], "≥ 1"),
        (["--tokens-per-step=-2"], "≥ 1"),
        (["--tokens-per-step", "abc"], "expected a number"),
        (["--tokens-per-step", "0.5"], "≥ 1"),
        (["--tokens-per-step", "nan"], "≥ 1"),
        (["--tokens-per-step", "1,x"], "integers ≥ 1"),
        (["--tokens-per-step", "2,0"], "integers ≥ 1"),
        (["--commit-profile", "-1"], "≥ 1"),
        (["--bandwidth-gbs", "0"], "> 0"),
        (["--bandwidth-gbs", "fast"], "expected a number"),
        (["--floor-repeats", "0"], "positive integer"),
    ],
)
def test_bench_bad_floor_and_profile_values_exit_2_before_any_model(argv, msg, capsys, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(bench, "build_model", boom)
    monkeypatch.setattr(bench, "load_model", boom)
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--arch", "tiny", "--random-weights", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dlm-decode: error:") and msg in err[0]


def test_bench_policies_and_tokens_per_step_are_exclusive(capsys):
    argv = ["bench", "--arch", "tiny", "--tokens-per-step", "2", "--policies", "frechet"]
    assert main(argv) == 2
    assert "not both" in capsys.readouterr().err


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


@requires_cuda
@pytest.mark.requires_cuda
def test_bench_floor_on_cuda(tmp_path):
    path = tmp_path / "f.json"
    rc = main(
        [*ARGS, "--device", "cuda", "--floor", "--tokens-per-step", "3.5", "--json", str(path)]
    )
    assert rc == 0
    data = json.loads(path.read_text())
    name = data["meta"]["device_name"]
    assert data["meta"]["bandwidth_gbs"] == known_bandwidth_gbs(name)
    for r in data["rows"]:
        assert r["extra"]["floor"]["kind"] == "cuda_graph"
        assert r["floor_ratio"] > 0 and r["nfe"] == 10
        bd = r["breakdown"]
        assert bd["clock"] == "cuda_events" and all(bd[k] >= 0 for k in PARTS)
        assert sum(bd[k] for k in PARTS) <= bd["total_s"] * 1.01
