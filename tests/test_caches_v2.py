"""Cache contract v2: the built-in caches against plain, one-row-at-a-time
reimplementations, step awareness, any-positions forwards, features on request, cost
accounting and the read-only sequence.

Each reference recomputes what the cache's semantics say a step sees, for one row alone
and without padding: the refresh-based caches rebuild a fresh KV buffer from the sequence
as it was at the last refresh; ``dkv`` and ``drift``, whose buffers depend on their whole
history, keep their own buffer and compute exactly the positions their rules name. The
policy side is the library's (``compute_signals``, ``apply_decision``), so what is tested
is the cache. Models are tiny random LLaDA (unshifted) and Dream (shifted) checkpoints in
float64; prompts are ragged and decoded as one batch.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import pytest
import torch

import dlm_decode
from dlm_decode.decoder import CacheContractError, Decoder, apply_decision
from dlm_decode.interfaces import Cache
from dlm_decode.models import load_model
from dlm_decode.models.testing import write_random_checkpoint
from dlm_decode.signals import History, compute_signals, parse_needs

GEN, BLOCK = 16, 8


@pytest.fixture(scope="module", params=["llada", "dream"])
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    write_random_checkpoint(path, arch=request.param, seed=7)
    m = load_model(str(path), dtype=torch.float64)
    head = m.module.head if m.module.head is not None else m.module.embed
    head.weight.mul_(12.0)  # confident, varied profiles
    return m


def prompts(model) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    hi = min(model.mask_token_id, model.vocab_size - 1)
    return [torch.randint(0, hi, (n,), generator=g) for n in (5, 9, 3)]


# --------------------------------------------------------------------------------------
# Plain references: the logits a step sees, for one row
# --------------------------------------------------------------------------------------


class Plain:
    """One row's cache, written plainly. ``logits(x, block, step, last)`` returns the block's
    ``(1, L, V)`` logits; ``x`` is the row's current sequence."""

    def __init__(self, model, name: str, args: dict[str, Any]) -> None:
        self.m, self.name, self.args = model, name, args
        self.shift = model.logits_shift
        self.x_ref: torch.Tensor | None = None  # the sequence at the last refresh
        self.kv = None
        self.blk_logits = None
        self.ref_feat = None
        self.drifted = False
        self.cost = 0  # positions the cache computes for this row, alone and unpadded

    def _pos(self, x):
        return torch.arange(x.shape[1]).unsqueeze(0)

    def _refresh_from(self, x_ref):
        kv = self.m.new_kv(1, x_ref.shape[1])
        self.m.forward(x_ref, start=0, kv=kv, position_ids=self._pos(x_ref))
        return kv

    def _span(self, x, kv, s, e, bs, be):
        pos = self._pos(x)
        out = self.m.forward(x[:, s:e], start=s, kv=kv, position_ids=pos[:, s:e])
        return out[:, bs - self.shift - s : be - self.shift - s]

    def is_refresh(self, block, step, forward_index) -> bool:
        a = self.args
        if step == 0:
            return True
        if self.name in ("prefix", "dual"):
            k = a.get("refresh_every")
            return k is not None and step % k == 0
        if self.name == "vicinity":
            return block == 0 and step <= a.get("warmup_steps", 4)
        if self.name == "dkv":
            return step == 1 or step % a.get("cache_reloading_step", 8) == 0
        return False

    def logits(self, x, bs, be, block, step, changed):
        full = self.m.logits(x)[:, bs:be]
        t, sh = x.shape[1], self.shift
        if self.name == "none":
            self.cost += t
            return full
        if self.name in ("dkv", "drift"):
            return getattr(self, f"_{self.name}")(x, bs, be, block, step, changed)
        if self.is_refresh(block, step, None):
            self.x_ref = x.clone()
            self.cost += t
            return full
        kv = self._refresh_from(self.x_ref)
        if self.name == "prefix":
            self.cost += t - (bs - sh)
            return self._span(x, kv, bs - sh, t, bs, be)
        if self.name == "dual":
            self.cost += be - (bs - sh)
            return self._span(x, kv, bs - sh, be, bs, be)
        a = self.args  # vicinity
        lo = max(0, bs - sh - a.get("prefix_look", 16))
        hi = min(t, be + a.get("after_look", 16))
        self.cost += hi - lo
        return self._span(x, kv, lo, hi, bs, be)

    def _dkv(self, x, bs, be, block, step, changed):
        mask_id, t, sh = self.m.mask_token_id, x.shape[1], self.shift
        if self.is_refresh(block, step, None):
            self.kv = self.m.new_kv(1, t)
            out = self.m.forward(x, start=0, kv=self.kv, position_ids=self._pos(x))
            self.cost += t
            self.blk_logits = out[:, bs - sh : be - sh].clone()
            return self.blk_logits.clone()
        compute = {j for j in range(t) if int(x[0, j]) == mask_id}
        compute |= {bs + j for j in changed}
        if sh:
            need = [j for j in range(be - bs) if int(x[0, bs + j]) == mask_id or j in changed]
            compute |= {bs + j - sh for j in need}
        pos = sorted(compute)
        self.cost += len(pos)
        if pos:
            p = torch.tensor([pos])
            out = self.m.forward(x[:, pos], positions=p, kv=self.kv, position_ids=p)
            for r, q in enumerate(pos):
                if 0 <= q + sh - bs < be - bs:
                    self.blk_logits[0, q + sh - bs] = out[0, r]
        return self.blk_logits.clone()

    def _drift(self, x, bs, be, block, step, changed):
        a, t, sh = self.args, x.shape[1], self.shift
        layer, lo, hi = a.get("layer", -1), bs - sh, be - sh
        if step == 0 or self.drifted:
            if step == 0:
                self.kv = self.m.new_kv(1, t)
            self.cost += t
            out, hid = self.m.forward(
                x, start=0, kv=self.kv, position_ids=self._pos(x), hidden_layers=(layer,)
            )
            logits, feat = out[:, lo:hi], hid[layer][:, lo:hi]
            self.ref_feat = feat.clone()
        else:
            self.cost += hi - lo
            out, hid = self.m.forward(
                x[:, lo:hi],
                start=lo,
                kv=self.kv,
                position_ids=self._pos(x)[:, lo:hi],
                hidden_layers=(layer,),
            )
            logits, feat = out, hid[layer]
        if step > 0:
            cos = torch.nn.functional.cosine_similarity(feat, self.ref_feat, dim=-1).mean()
            self.drifted = bool(cos < a.get("threshold", 0.9))
        else:
            self.drifted = False
        return logits


def plain_decode(model, prompt, policy, cache_name, cache_args) -> tuple[torch.Tensor, int, int]:
    """One row decoded with the plain cache and the library's policy machinery: its
    tokens, NFE and token positions computed."""
    mask_id = model.mask_token_id
    p = prompt.numel()
    x = torch.full((1, p + GEN), mask_id, dtype=torch.long)
    x[0, :p] = prompt
    spec = parse_needs(policy.needs)
    pstate = policy.make_state(1, BLOCK, model.vocab_size, torch.device("cpu"))
    ref = Plain(model, cache_name, cache_args)
    nfe = 0
    for b in range(GEN // BLOCK):
        bs, be = p + b * BLOCK, p + (b + 1) * BLOCK
        hist = History.empty(1, BLOCK, "cpu")
        masked = x[:, bs:be] == mask_id
        hist.reset(masked)
        policy.reset_state(pstate, masked)
        m0 = masked.sum(-1)
        step, changed = 0, set()
        while hist.active.any():
            logits = ref.logits(x, bs, be, b, step, changed)
            nfe += 1
            blk = x[:, bs:be]
            masked = blk == mask_id
            had = masked.any(-1)
            hist.post.add_(~had)
            sig = compute_signals(logits, blk, mask_id, spec, history=hist)
            spb = BLOCK if "steps" in policy.requires else None  # steps = GEN over 2 blocks
            st = dlm_decode.StepState(step, b, GEN // BLOCK, spb, m0, sig, pstate, bs)
            out = policy.select(sig.confidence, masked.clone(), st)
            dec = (
                out
                if isinstance(out, dlm_decode.signals.Decision)
                else dlm_decode.signals.Decision(out)
            )
            app = apply_decision(dec, sig, masked, hist.editable, mask_id, model.vocab_size)
            x[:, bs:be] = app.block
            hist.committed_at.copy_(
                torch.where(
                    app.commit | app.edit, hist.step, torch.where(app.remask, -1, hist.committed_at)
                )
            )
            hist.prev_confidence.copy_(sig.confidence)
            hist.prev_x0.copy_(sig.x0)
            hist.step.add_(1)
            changed = {int(j) for j in (app.commit | app.edit)[0].nonzero().flatten()}
            has = (x[:, bs:be] == mask_id).any(-1)
            ch = (app.edit | app.remask).any(-1)
            hist.active.copy_(has | ((had | ch) & (hist.post < policy.refine_steps)))
            step += 1
    return x[0], nfe, ref.cost


CACHES = [
    ("none", {}),
    ("prefix", {}),
    ("prefix", {"refresh_every": 3}),
    ("dual", {}),
    ("dual", {"refresh_every": 2}),
    ("vicinity", {"prefix_look": 2, "after_look": 3, "warmup_steps": 2}),
    ("dkv", {"cache_reloading_step": 3}),
    ("drift", {"threshold": 0.95}),
]
POLICIES = ["fixed", "threshold:threshold=0.5", "frechet:margin=0.1", "wino:draft_threshold=0.3"]


@pytest.mark.parametrize(("cache", "args"), CACHES, ids=[f"{c}{a or ''}" for c, a in CACHES])
@pytest.mark.parametrize("policy", POLICIES)
def test_cache_matches_its_plain_reimplementation(model, cache, args, policy) -> None:
    steps = GEN if policy == "fixed" else None
    dec = Decoder(
        model,
        policy=policy,
        cache=cache,
        cache_args=args,
        gen_length=GEN,
        block_length=BLOCK,
        steps=steps,
    )
    out = dec.generate(prompts(model))
    for r, pr in enumerate(prompts(model)):
        want, want_nfe, want_cost = plain_decode(model, pr, dec.policy, cache, args)
        got = out.sequences[r, out.prompt_length - pr.numel() :]
        assert torch.equal(got, want), f"row {r}"
        assert int(out.nfe_per_row[r]) == want_nfe
        # A row's token-forwards: what it computes alone, whatever the batch's padding.
        assert int(out.token_forwards_per_row[r]) == want_cost, f"row {r}"


def test_dual_with_refresh_every_1_commits_exactly_the_tokens_of_none(model) -> None:
    for policy in POLICIES:
        kw = dict(policy=policy, gen_length=GEN, block_length=BLOCK)
        if policy == "fixed":
            kw["steps"] = GEN
        none = dlm_decode.generate(model, prompts(model), cache="none", **kw)
        dual = dlm_decode.generate(model, prompts(model), cache="dual:refresh_every=1", **kw)
        assert torch.equal(none.sequences, dual.sequences) and none.nfe == dual.nfe
        assert dual.token_forwards == none.token_forwards  # every step a full forward


# --------------------------------------------------------------------------------------
# Contract mechanics
# --------------------------------------------------------------------------------------


def test_token_forwards_count_what_each_forward_computed(model) -> None:
    prs = prompts(model)
    kw = dict(policy="fixed", steps=GEN, gen_length=GEN, block_length=BLOCK)
    t = max(p.numel() for p in prs) + GEN
    none = dlm_decode.generate(model, prs, cache="none", **kw)
    assert none.token_forwards == none.nfe * len(prs) * t
    assert none.token_forwards_per_step.tolist() == [t] * none.nfe
    dual = dlm_decode.generate(model, prs, cache="dual", **kw)
    shift = model.logits_shift
    per_step = [t if s % BLOCK == 0 else BLOCK + shift for s in range(dual.nfe)]
    assert dual.token_forwards_per_step.tolist() == per_step
    refreshes = sum(1 for n in per_step if n == t)
    own = [refreshes * (p.numel() + GEN) + (dual.nfe - refreshes) * (BLOCK + shift) for p in prs]
    assert dual.token_forwards_per_row.tolist() == own  # a row's own positions, not padding
    # vicinity: refreshes over the first block's warm-up, then the window around the block
    vic = dlm_decode.generate(
        model, prs, cache="vicinity:prefix_look=2,after_look=3,warmup_steps=1", **kw
    )
    p = t - GEN
    window = [
        min(t, p + b * BLOCK + BLOCK + 3) - max(0, p + b * BLOCK - shift - 2) for b in range(2)
    ]
    want = [t, t] + [window[0]] * (BLOCK - 2) + [t] + [window[1]] * (BLOCK - 1)
    assert vic.token_forwards_per_step.tolist() == want


def test_caches_see_the_step_and_the_last_decision(model) -> None:
    seen: list[tuple[int, int, int | None]] = []

    class Spy(dlm_decode.caches.DualCache):
        name: ClassVar[str] = "spy"

        def step(self, ctx, x, bs, be):
            st = ctx.step
            seen.append(
                (
                    st.block_index,
                    st.step,
                    None if st.last_commit is None else int(st.last_commit.sum()),
                )
            )
            return super().step(ctx, x, bs, be)

    dlm_decode.generate(
        model,
        prompts(model)[:1],
        policy="fixed",
        steps=GEN,
        cache=Spy(),
        gen_length=GEN,
        block_length=BLOCK,
    )
    assert seen[0] == (0, 1, 1) and seen[BLOCK - 2] == (0, BLOCK - 1, 1)
    assert seen[BLOCK - 1][:2] == (1, 1)


def test_a_cache_that_writes_the_sequence_is_named(model) -> None:
    class Writer(Cache):
        name: ClassVar[str] = "writer"

        def refresh(self, ctx, x, bs, be):
            x[:, bs] = 0
            return ctx.model.logits(x)[:, bs:be]

        step = refresh

    with pytest.raises(CacheContractError, match=r"cache writer\.v1 wrote the sequence x"):
        dlm_decode.generate(
            model, prompts(model), cache=Writer(), gen_length=GEN, block_length=BLOCK
        )


def test_a_device_side_refresh_request_becomes_a_refresh(model) -> None:
    refreshed: list[int] = []

    class Ask(dlm_decode.caches.DualCache):
        name: ClassVar[str] = "ask"

        def refresh(self, ctx, x, bs, be):
            refreshed.append(ctx.step.step)
            return super().refresh(ctx, x, bs, be)

        def step(self, ctx, x, bs, be):
            ctx.request_refresh(torch.tensor(ctx.step.step == 2))
            return super().step(ctx, x, bs, be)

    dlm_decode.generate(
        model,
        prompts(model)[:1],
        policy="fixed",
        steps=GEN,
        cache=Ask(),
        gen_length=GEN,
        block_length=BLOCK,
    )
    assert refreshed == [0, 3, 0, 3]


def test_positions_forward_writes_only_its_slots_and_features_come_on_request(model) -> None:
    x = torch.randint(0, 50, (2, 12))
    pos = torch.arange(12).expand(2, 12)
    kv = model.new_kv(2, 12)
    full = model.forward(x, start=0, kv=kv, position_ids=pos)
    kv2 = model.new_kv(2, 12)
    model.forward(x, start=0, kv=kv2, position_ids=pos)
    sel = torch.tensor([[1, 4, 7], [0, 5, 11]])
    out, hid = model.forward(
        x.gather(1, sel), positions=sel, kv=kv2, position_ids=sel, hidden_layers=(0, -1)
    )
    assert torch.allclose(out, full.gather(1, sel.unsqueeze(-1).expand(-1, -1, full.shape[-1])))
    assert torch.allclose(kv2.k, kv.k) and torch.allclose(kv2.v, kv.v)
    assert set(hid) == {0, -1} and hid[-1].shape == (2, 3, model.spec.d_model)
    assert not isinstance(model.forward(x, start=0, kv=kv, position_ids=pos), tuple)
    assert math.isfinite(float(out.sum()))
