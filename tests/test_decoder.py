"""Decoder tests: cache parity with plain re-implementations, LLaDA's original loop,
batching, per-row completion, early stop, sampling, and bad input."""

from __future__ import annotations

import itertools

import pytest
import torch

import dlm_decode
from dlm_decode.config import DecodeConfig
from dlm_decode.decoder import PolicyContractError, propose
from dlm_decode.interfaces import CommitPolicy, StepState, positions_from_mask
from dlm_decode.models import load_model
from dlm_decode.models.testing import write_random_checkpoint

POLICIES = [
    ("fixed", {}),
    ("threshold", {"threshold": 0.5}),
    ("factor", {"factor": 1.0}),
    ("frechet", {"margin": 0.1}),
    ("frechet_robust", {"margin": 0.1, "eta": 0.05}),
]
CACHES = ["none", "prefix", "dual"]
GEN, BLOCK = 16, 8


def _peaky(model) -> None:
    """Scale the LM head so random models give confident, varied profiles."""
    for name, p in model.named_parameters():
        if name.endswith(("ff_out.weight", "lm_head.weight")) and p.dim() == 2:
            if p.shape[0] == model.vocab_size or "lm_head" in name or "transformer.ff_out" in name:
                p.data.mul_(12.0)


@pytest.fixture(scope="module", params=["llada", "dream"])
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    write_random_checkpoint(path, arch=request.param, seed=3)
    m = load_model(str(path), dtype=torch.float64)
    _peaky(m)
    return m


def _prompts(model, lengths=(5, 9, 3)):
    g = torch.Generator().manual_seed(0)
    hi = model.mask_token_id  # ids below the mask id are ordinary tokens in the test vocab
    return [torch.randint(0, min(hi, model.vocab_size - 1), (n,), generator=g) for n in lengths]


def _steps(policy):
    return GEN if policy == "fixed" else None


# --- plain references -------------------------------------------------------------------


def _plain_decode(model, prompt, cfg: DecodeConfig):
    """One row, the decode semantics written plainly: every 'cached' forward recomputes the
    block-start state from scratch into a fresh buffer instead of reusing one."""
    pol = dlm_decode.get_policy(cfg.policy, **cfg.policy_args)
    p = prompt.numel()
    t = p + cfg.gen_length
    x = torch.full((1, t), model.mask_token_id, dtype=torch.long)
    x[0, :p] = prompt
    pos = torch.arange(t).unsqueeze(0)
    shift = model.logits_shift
    nfe = 0
    for b in range(cfg.num_blocks):
        bs, be = p + b * cfg.block_length, p + (b + 1) * cfg.block_length
        x_start = x.clone()  # the state the refresh saw
        m0 = (x[:, bs:be] == model.mask_token_id).sum(-1)
        step = 0
        while (x[:, bs:be] == model.mask_token_id).any():
            if cfg.cache == "none" or step == 0:
                logits = model.logits(x)[:, bs:be]
            else:
                kv = model.new_kv(1, t)
                model.forward(x_start, start=0, kv=kv, position_ids=pos)  # the refresh
                s = bs - shift
                e = t if cfg.cache == "prefix" else be
                out = model.forward(x[:, s:e], start=s, kv=kv, position_ids=pos[:, s:e])
                logits = out[:, bs - shift - s : be - shift - s]
            nfe += 1
            masked = x[:, bs:be] == model.mask_token_id
            x0, conf = propose(logits, model.mask_token_id)
            st = StepState(step, b, cfg.num_blocks, cfg.steps_per_block, m0)
            commit = pol.select(conf, masked, st)
            x[:, bs:be] = torch.where(commit, x0, x[:, bs:be])
            step += 1
    return x[0], nfe


def _llada_original(model, prompt, gen_length, block_length, steps):
    """LLaDA's original loop (no cache, k tokens per step by confidence), written plainly
    with Python loops over rows and positions."""
    p = prompt.numel()
    x = torch.full((1, p + gen_length), model.mask_token_id, dtype=torch.long)
    x[0, :p] = prompt
    n_blocks = gen_length // block_length
    spb = steps // n_blocks
    for b in range(n_blocks):
        bs, be = p + b * block_length, p + (b + 1) * block_length
        m = int((x[0, bs:be] == model.mask_token_id).sum())
        schedule = [m // spb + (1 if i < m % spb else 0) for i in range(spb)]
        for k in schedule:
            logits = model.logits(x)[0].clone()
            logits[:, model.mask_token_id] = -float("inf")
            probs = torch.softmax(logits.double(), -1)
            cands = []
            for i in range(bs, be):
                if int(x[0, i]) == model.mask_token_id:
                    tok = int(probs[i].argmax())
                    cands.append((float(probs[i, tok]), -i, i, tok))
            cands.sort(reverse=True)
            for _, _, i, tok in cands[:k]:
                x[0, i] = tok
    return x[0]


# --- tests -----------------------------------------------------------------------------


@pytest.mark.parametrize(("cache", "policy"), list(itertools.product(CACHES, POLICIES)))
def test_cache_matches_plain_reimplementation(model, cache, policy):
    name, args = policy
    prompt = _prompts(model)[0]
    cfg = DecodeConfig(
        policy=name,
        policy_args=args,
        cache=cache,
        gen_length=GEN,
        block_length=BLOCK,
        steps=_steps(name),
    )
    want, want_nfe = _plain_decode(model, prompt, cfg)
    got = dlm_decode.generate(model, prompt.unsqueeze(0), config=cfg)
    assert torch.equal(got.sequences[0], want)
    assert got.nfe == want_nfe


def test_none_cache_fixed_equals_llada_original_loop(model):
    prompt = _prompts(model)[1]
    got = dlm_decode.generate(
        model,
        [prompt],
        policy="fixed",
        cache="none",
        gen_length=GEN,
        block_length=BLOCK,
        steps=GEN // 2,
    )
    want = _llada_original(model, prompt, GEN, BLOCK, GEN // 2)
    assert torch.equal(got.sequences[0], want)
    assert got.nfe == GEN // 2


@pytest.mark.parametrize(("cache", "policy"), list(itertools.product(CACHES, POLICIES)))
def test_batched_equals_each_prompt_alone(model, cache, policy):
    name, args = policy
    prompts = _prompts(model)
    kw = dict(
        policy=name,
        policy_args=args,
        cache=cache,
        gen_length=GEN,
        block_length=BLOCK,
        steps=_steps(name),
    )
    batched = dlm_decode.generate(model, prompts, **kw)
    p = batched.prompt_length
    for i, pr in enumerate(prompts):
        alone = dlm_decode.generate(model, [pr], **kw)
        assert torch.equal(batched.responses[i], alone.responses[0]), (i, cache, name)
        assert torch.equal(batched.sequences[i, p - pr.numel() : p], pr)
        assert int(batched.nfe_per_row[i]) == alone.nfe
        assert torch.equal(
            batched.commit_counts[:, i][: alone.commit_counts.shape[0]].sum(),
            alone.commit_counts[:, 0].sum(),
        )


def test_result_fields_are_consistent(model):
    out = dlm_decode.generate(
        model,
        _prompts(model),
        policy="frechet",
        cache="dual",
        gen_length=GEN,
        block_length=BLOCK,
        trace=True,
    )
    b = len(_prompts(model))
    assert out.sequences.shape == (b, out.prompt_length + GEN)
    assert (out.responses != model.mask_token_id).all()
    assert out.commit_counts.shape == (out.nfe, b)
    assert (out.commit_counts.sum(0) == GEN).all()
    assert out.nfe <= GEN and out.nfe >= GEN // BLOCK
    assert len(out.trace) == out.nfe
    for st in out.trace:
        for r in range(b):
            prof = st.profiles[r]
            assert prof == sorted(prof, reverse=True)
            assert st.committed[r] == len(st.positions[r]) == len(st.tokens[r])


def test_mask_token_is_never_proposed():
    logits = torch.zeros(1, 3, 5)
    logits[..., 4] = 10.0  # the mask id has the highest logit everywhere
    x0, conf = propose(logits, mask_token_id=4)
    assert (x0 != 4).all()
    assert torch.allclose(conf, torch.full_like(conf, 0.25))
    assert conf.dtype == torch.float32


def test_temperature_sampling_is_seeded_and_differs_from_argmax(model):
    prompts = _prompts(model)
    kw = dict(policy="frechet", cache="dual", gen_length=GEN, block_length=BLOCK)
    a = dlm_decode.generate(model, prompts, temperature=1.0, seed=7, **kw)
    b = dlm_decode.generate(model, prompts, temperature=1.0, seed=7, **kw)
    c = dlm_decode.generate(model, prompts, temperature=1.0, seed=8, **kw)
    g = dlm_decode.generate(model, prompts, temperature=0.0, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert not torch.equal(a.sequences, c.sequences) or not torch.equal(a.sequences, g.sequences)


def test_early_stop_fills_eos_and_saves_forwards(model):
    eos = model.eos_token_ids[0]

    class EosFirst(CommitPolicy):
        """Commits the first masked position each step; the test forces EOS there."""

        name = "eos_first"

        def select(self, confidence, masked, state):
            first = masked.float().argmax(-1, keepdim=True)
            out = torch.zeros_like(masked)
            out.scatter_(-1, first, True)
            return out & masked

    prompt = _prompts(model)[0]
    # Make the model predict EOS everywhere: patch this instance's forward for the test.
    orig = model.forward

    def forward(*a, **k):
        out = orig(*a, **k).clone()
        out[..., eos] = 1e4
        return out

    model.forward = forward
    try:
        full = dlm_decode.generate(
            model, [prompt], policy=EosFirst(), cache="none", gen_length=GEN, block_length=BLOCK
        )
        stop = dlm_decode.generate(
            model,
            [prompt],
            policy=EosFirst(),
            cache="none",
            gen_length=GEN,
            block_length=BLOCK,
            early_stop=True,
        )
    finally:
        del model.forward
    assert full.nfe == GEN
    assert stop.nfe == 1
    assert (stop.responses == eos).all()
    assert int(stop.response_lengths()[0]) == 0


class _Lazy(CommitPolicy):
    name = "lazy"

    def select(self, confidence, masked, state):
        return torch.zeros_like(masked)


class _Overreach(CommitPolicy):
    """Commits one position at step 0, then every position, committed ones included."""

    name = "overreach"

    def select(self, confidence, masked, state):
        if state.step == 0:
            first = masked.float().argmax(-1, keepdim=True)
            return torch.zeros_like(masked).scatter_(-1, first, True) & masked
        return torch.ones_like(masked)


@pytest.mark.parametrize("bad", [_Lazy, _Overreach])
def test_policy_breaking_contract_raises_not_hangs(model, bad):
    with pytest.raises(PolicyContractError, match=bad.name):
        dlm_decode.generate(
            model, _prompts(model), policy=bad(), cache="dual", gen_length=GEN, block_length=BLOCK
        )


def test_bad_input_errors(model):
    pr = _prompts(model)
    with pytest.raises(ValueError, match="exceeds the model's max length"):
        dlm_decode.generate(model, pr, gen_length=model.max_length, block_length=1)
    with pytest.raises(ValueError, match="not a multiple of block_length"):
        dlm_decode.generate(model, pr, gen_length=20, block_length=8)
    with pytest.raises(ValueError, match="not a multiple of the number of blocks"):
        dlm_decode.generate(model, pr, policy="fixed", gen_length=16, block_length=8, steps=5)
    with pytest.raises(ValueError, match="needs 'steps'"):
        dlm_decode.generate(model, pr, policy="fixed", gen_length=16, block_length=8)
    with pytest.raises(ValueError, match="empty prompt"):
        dlm_decode.generate(model, [pr[0], []], gen_length=16, block_length=8)
    with pytest.raises(ValueError, match="empty prompt"):
        dlm_decode.generate(model, torch.zeros((1, 0), dtype=torch.long))
    with pytest.raises(KeyError, match="Did you mean"):
        dlm_decode.generate(model, pr, cache="duall")


def test_positions_from_left_padding():
    am = torch.tensor([[False, False, True, True], [True, True, True, True]])
    assert positions_from_mask(am).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
