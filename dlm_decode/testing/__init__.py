"""The plugin contract checks, public: what the project runs on its own built-ins, for a
plugin author to run on theirs.

* [`check_policy`][dlm_decode.testing.check_policy] — a commit policy class, on inputs drawn
  by Hypothesis ([`strategies`][dlm_decode.testing.strategies]): the declared signals
  honoured, decision sets within their rules (commits at masked positions, at least one
  per row that has one; edits and remasks only where the block committed earlier;
  disjoint), no host sync inside ``select``, inputs untouched, progress within the step
  budget in a real decode, and the same tokens on the fast path;
* [`check_cache`][dlm_decode.testing.check_cache] — a cache class, on tiny random LLaDA and
  Dream models: logits of the active block with the right shape, dtype and device, finite,
  aligned (a refresh equals a plain full forward), the sequence never written, and a
  batched ragged decode that finishes.

Both start with the registry's load-time checks
([`check_plugin_class`][dlm_decode.registry.check_plugin_class]) and raise
``AssertionError`` (or the registry's ``TypeError``) with a message that names the broken
rule. Hypothesis is needed (``pip install hypothesis``, part of ``dlm-decode[dev]``).

Example:
    ```python
    # a test module of your plugin package
    from dlm_decode.testing import check_policy

    from my_package import MyPolicy


    def test_my_policy_honours_the_contract():
        check_policy(MyPolicy, {"k": 2})
    ```
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from unittest import mock

import torch
from hypothesis import HealthCheck, given, settings

from dlm_decode.config import DecodeConfig
from dlm_decode.decoder import FLAGS, Decoder, apply_decision, pad_prompts
from dlm_decode.fast import FastDecoder
from dlm_decode.interfaces import (
    Cache,
    CacheContext,
    CacheStep,
    CommitPolicy,
    ForwardCounter,
    Model,
    StepState,
    positions_from_mask,
)
from dlm_decode.models.loading import build_model
from dlm_decode.registry import check_plugin_class
from dlm_decode.settings import validate_params
from dlm_decode.signals import Decision, History, compute_signals, parse_needs
from dlm_decode.testing.strategies import PolicyInput, StepInput, policy_inputs, step_inputs

__all__ = [
    "CACHE_CHECK_PRESETS",
    "HOST_SYNC_METHODS",
    "HostSyncError",
    "check_cache",
    "check_commit_mask",
    "check_policy",
    "check_policy_on",
    "check_step",
    "no_host_sync",
    "select_without_sync",
]

HOST_SYNC_METHODS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__")
"""Tensor methods that copy device data to the host (a sync on CUDA)."""


class HostSyncError(AssertionError):
    """A policy read tensor data on the host inside ``select``."""


def _forbidden(name: str) -> Callable[..., Any]:
    def raiser(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        raise HostSyncError(
            f"select() called Tensor.{name}(): policies must stay on the device "
            f"(no .item(), .tolist(), bool(tensor), …); return a tensor mask instead"
        )

    return raiser


@contextlib.contextmanager
def no_host_sync(device: str | torch.device) -> Iterator[None]:
    """Fail on any host read of tensor data inside the block.

    Patches [`HOST_SYNC_METHODS`][dlm_decode.testing.HOST_SYNC_METHODS] on ``torch.Tensor``
    to raise [`HostSyncError`][dlm_decode.testing.HostSyncError]; on CUDA also sets
    ``torch.cuda.set_sync_debug_mode("error")`` so that syncs made in C++ (``nonzero``,
    copies to the host, …) fail too.
    """
    with contextlib.ExitStack() as stack:
        for name in HOST_SYNC_METHODS:
            stack.enter_context(mock.patch.object(torch.Tensor, name, _forbidden(name)))
        if torch.device(device).type == "cuda":
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            stack.callback(torch.cuda.set_sync_debug_mode, previous)
        yield


def select_without_sync(policy: CommitPolicy, inp: PolicyInput) -> torch.Tensor:
    """``policy.select`` on ``inp`` under [`no_host_sync`][dlm_decode.testing.no_host_sync]."""
    with no_host_sync(inp.confidence.device):
        return policy.select(inp.confidence, inp.masked, inp.state)


def check_commit_mask(commit: Any, inp: PolicyInput) -> None:
    """Assert the contract on one ``select`` result.

    Bool tensor, same shape and device; commits only masked positions; at least one
    commit in every row with a masked position and none in a row without.
    """
    assert isinstance(commit, torch.Tensor), f"select returned {type(commit).__name__}"
    assert commit.dtype == torch.bool, f"commit mask has dtype {commit.dtype}, not bool"
    assert commit.shape == inp.masked.shape, (
        f"commit mask has shape {tuple(commit.shape)}, not {tuple(inp.masked.shape)}"
    )
    assert commit.device.type == inp.masked.device.type, "commit mask is on another device"
    commit, masked = commit.cpu(), inp.masked.cpu()
    assert not (commit & ~masked).any(), "committed a position that is not masked"
    has_masked = masked.any(-1)
    per_row = commit.sum(-1)
    assert (per_row[has_masked] >= 1).all(), "a row with masked positions committed nothing"
    assert (per_row[~has_masked] == 0).all(), "a row with nothing masked committed something"


def check_policy_on(policy: CommitPolicy, inp: PolicyInput) -> torch.Tensor:
    """Every contract check on one input: mask contract, no host sync, inputs untouched,
    unmasked confidence values ignored, deterministic.

    Returns:
        The commit mask.
    """
    conf_before, masked_before = inp.confidence.clone(), inp.masked.clone()
    commit = select_without_sync(policy, inp)
    check_commit_mask(commit, inp)
    assert torch.equal(inp.confidence, conf_before), "select modified the confidences"
    assert torch.equal(inp.masked, masked_before), "select modified the mask"
    # Values at unmasked positions are meaningless: overwrite them, same answer.
    scrambled = torch.where(inp.masked, inp.confidence, 1 - inp.confidence)
    again = policy.select(scrambled, inp.masked, inp.state)
    assert torch.equal(again, commit), "select depends on values at unmasked positions"
    return commit


def _instance(kind: str, cls: type, params: Any) -> Any:
    check_plugin_class(kind, cls, cls.__module__)
    if isinstance(params, cls):
        return params
    return cls(validate_params(cls, dict(params or {})))


def _is_v1(policy: CommitPolicy) -> bool:
    """A policy that reads only the confidences of masked positions (contract v1)."""
    return not tuple(policy.needs) and not policy.revokes


def check_step(policy: CommitPolicy, inp: StepInput, device: str | torch.device = "cpu") -> None:
    """Every contract-v2 check on one step: signals computed for exactly what the policy
    declared (reading another raises), its tensor state made and reset, ``select`` without
    host syncs, a decision whose sets are within their rules (commits at masked positions,
    edits and remasks only at positions committed earlier in the block, disjoint, valid
    tokens, progress in every row with a mask) and arguments left untouched.

    Raises:
        AssertionError: a broken rule, named.
    """
    logits, block = inp.logits.to(device), inp.block.to(device)
    masked = inp.masked.to(device)
    b, n, v = logits.shape
    spec = parse_needs(policy.needs, owner=f"policy {policy.key}")
    hist = History.empty(b, n, device)
    hist.reset(masked)
    hist.committed_at.copy_(inp.committed_at.to(device))
    hist.step.fill_(inp.step)
    gen = torch.Generator(device=device).manual_seed(0)
    sig = compute_signals(
        logits, block, inp.mask_token_id, spec, generator=gen, history=hist, owner=policy.key
    )
    pstate = policy.make_state(b, n, v, torch.device(device))
    assert isinstance(pstate, dict) and all(isinstance(t, torch.Tensor) for t in pstate.values()), (
        "make_state must return a dict of tensors"
    )
    policy.reset_state(pstate, masked)
    state = StepState(
        inp.step, 0, 1, inp.steps_per_block, masked.sum(-1), sig, pstate, block_start=0
    )
    given, before = masked.clone(), logits.clone()
    with no_host_sync(device):
        out = policy.select(sig.confidence, given, state)
    assert torch.equal(given, masked), "select modified its masked argument"
    assert torch.equal(logits, before), "select modified the logits"
    dec = out if isinstance(out, Decision) else Decision(out)
    if not policy.revokes:
        assert dec.edit is None and dec.remask is None, (
            "select returned edit/remask sets without declaring revokes = True"
        )
    for name in ("commit", "edit", "remask", "tokens"):
        t = getattr(dec, name)
        if t is not None:
            assert isinstance(t, torch.Tensor) and t.shape == masked.shape, (
                f"decision {name} must be a (B, L) tensor, got {getattr(t, 'shape', type(t))}"
            )
            want = torch.long if name == "tokens" else torch.bool
            assert t.dtype == want, f"decision {name} has dtype {t.dtype}, not {want}"
    app = apply_decision(dec, sig, masked, hist.editable, inp.mask_token_id, v)
    flags = dict(zip(FLAGS[: len(app.flags)], app.flags.cpu().tolist(), strict=True))
    assert not flags["committed_unmasked"], "committed a position that is not masked"
    assert not flags["revoked_uneditable"], (
        "edited or remasked a position that was not committed earlier in this block"
    )
    assert not flags["sets_overlap"], "commit, edit and remask sets overlap"
    assert not flags["bad_tokens"], "wrote the mask token or an id outside the vocabulary"
    assert not flags["no_progress"], "a row with masked positions made no progress"


def check_policy(
    cls: type[CommitPolicy],
    params: Mapping[str, Any] | None = None,
    *,
    max_examples: int = 200,
    device: str | torch.device = "cpu",
    decode: bool = True,
) -> None:
    """Check a commit policy class against the contract (v1 and v2).

    Runs the registry's load-time checks, then:

    * [`check_step`][dlm_decode.testing.check_step] on ``max_examples`` contract-v2 steps
      drawn by [`step_inputs`][dlm_decode.testing.strategies.step_inputs] (ragged block
      states, committed and prefilled positions, peaked, flat and tied logits);
    * for a policy that reads only ``p(x0)`` (no ``needs``, no revocation), also
      [`check_policy_on`][dlm_decode.testing.check_policy_on] on inputs from
      [`policy_inputs`][dlm_decode.testing.strategies.policy_inputs] (float32 and float64,
      exact 0 and 1, values at unmasked positions ignored) and blocks of one position;
    * with ``decode``, a batched decode with ragged prompts on a tiny random model through
      the [`Decoder`][dlm_decode.decoder.Decoder] (progress within the step budget; the
      Decoder checks every step) and, for a ``capturable`` policy, the same tokens from the
      fast path's static buffers.

    Args:
        cls: the policy class.
        params: its parameters (validated by its ``Params``); default its defaults.
        max_examples: Hypothesis examples per property.
        device: where the inputs live (``cuda`` also turns on CUDA's sync debug mode).
        decode: run the end-to-end decode check.

    Raises:
        AssertionError: a broken rule of the contract, named (Hypothesis prints the
            smallest input that breaks it).
        TypeError: the class fails the registry's load-time checks.
    """
    policy = _instance("policy", cls, params)
    options = dict(
        max_examples=max_examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )

    @settings(**options)
    @given(inp=step_inputs())
    def contract_v2(inp: StepInput) -> None:
        check_step(policy, inp, device)

    contract_v2()
    if _is_v1(policy):

        @settings(**options)
        @given(inp=policy_inputs())
        def contract(inp: PolicyInput) -> None:
            check_policy_on(policy, inp.to(device))

        contract()
        for masked in ([[True]], [[False]], [[True], [False]]):
            m = torch.tensor(masked)
            state = StepState(0, 0, 1, 1, m.sum(-1))
            inp = PolicyInput(torch.full(m.shape, 0.5), m, state, [], [])
            check_policy_on(policy, inp.to(device))
    if decode:
        _check_policy_decode(policy, device)


def _check_policy_decode(policy: CommitPolicy, device: str | torch.device) -> None:
    model = _peaky_model("llada-tiny", device)
    g = torch.Generator().manual_seed(1)
    hi = min(model.mask_token_id, model.vocab_size - 1)
    prompts = [torch.randint(0, hi, (k,), generator=g) for k in (4, 7, 2)]
    steps = 16 if "steps" in policy.requires else None
    kw = dict(gen_length=16, block_length=8, steps=steps, cache="none")
    out = Decoder(model, policy=policy, **kw).generate(prompts)
    assert not (out.responses == model.mask_token_id).any(), "the decode left masked positions"
    if policy.capturable:
        fast = FastDecoder(model, policy=policy, graphs=False, **kw).generate(prompts)
        assert torch.equal(fast.sequences, out.sequences), (
            "a capturable policy decodes differently on the fast path's static buffers"
        )


# --------------------------------------------------------------------------------------
# Caches
# --------------------------------------------------------------------------------------

CACHE_CHECK_PRESETS = ("llada-tiny", "dream-tiny")
"""Tiny random architectures [`check_cache`][dlm_decode.testing.check_cache] runs a cache on
(unshifted and shifted logits)."""


def _peaky_model(preset: str, device: str | torch.device) -> Model:
    """A tiny random float64 model whose LM head is scaled so profiles are confident."""
    model = build_model(preset, device=device, dtype=torch.float64, seed=5)
    head = model.module.head if model.module.head is not None else model.module.embed
    head.weight.mul_(12.0)
    return model


def _context(model: Model, ids: torch.Tensor, am: torch.Tensor | None, gen: int) -> Any:
    bsz, p = ids.shape
    total = p + gen
    x = torch.full((bsz, total), model.mask_token_id, dtype=torch.long, device=model.device)
    x[:, :p] = ids
    full_am = None
    positions = torch.arange(total, device=model.device).expand(bsz, total)
    if am is not None:
        full_am = torch.ones((bsz, total), dtype=torch.bool, device=model.device)
        full_am[:, :p] = am
        positions = positions_from_mask(full_am)
    ctx = CacheContext(
        model=ForwardCounter(model),
        attention_mask=full_am,
        position_ids=positions,
        refresh_flag=torch.zeros((), dtype=torch.bool, device=model.device),
    )
    return x, ctx


def _check_logits(name: str, logits: Any, model: Model, bsz: int, length: int) -> None:
    assert isinstance(logits, torch.Tensor), f"{name} returned {type(logits).__name__}"
    want = (bsz, length, model.vocab_size)
    assert tuple(logits.shape) == want, (
        f"{name} returned logits of shape {tuple(logits.shape)}, not (B, L, V) = {want}: one "
        f"row per position of the active block, aligned so row j predicts block_start + j"
    )
    assert logits.device.type == model.device.type, f"{name} returned logits on another device"
    assert logits.is_floating_point(), f"{name} returned {logits.dtype} logits"
    assert torch.isfinite(logits).all(), f"{name} returned non-finite logits"


def check_cache(
    cls: type[Cache],
    params: Mapping[str, Any] | None = None,
    *,
    device: str | torch.device = "cpu",
    gen_length: int = 16,
    block_length: int = 8,
) -> None:
    """Check a cache class against the contract, on tiny random LLaDA and Dream models.

    For each architecture (unshifted and shifted logits), with a batch of left-padded
    prompts of different lengths:

    * ``refresh`` at the first block returns ``(B, L, V)`` finite logits that equal a plain
      full forward of the same sequence (to 1e-9 in float64);
    * after commits, ``step`` (given the step state of contract v2) returns ``(B, L, V)``
      finite logits, equal to a plain full forward when the cache declares ``exact``;
    * neither ``refresh`` nor ``step`` writes the sequence ``x``;
    * a whole batched decode through the [`Decoder`][dlm_decode.decoder.Decoder] finishes
      with no mask left.

    Args:
        cls: the cache class.
        params: its parameters; default its defaults.
        device: where the models run.
        gen_length: tokens generated by the checked decodes.
        block_length: tokens per block.

    Raises:
        AssertionError: a broken rule, named.
        TypeError: the class fails the registry's load-time checks.
    """
    check_plugin_class("cache", cls, cls.__module__)
    for preset in CACHE_CHECK_PRESETS:
        model = _peaky_model(preset, device)
        g = torch.Generator().manual_seed(0)
        hi = min(model.mask_token_id, model.vocab_size - 1)
        prompts = [torch.randint(0, hi, (n,), generator=g) for n in (5, 9, 3)]
        ids, am = pad_prompts(prompts, model.pad_token_id)
        ids = ids.to(device)
        am = am.to(device) if am is not None else None
        cache = _instance("cache", cls, params)
        x, ctx = _context(model, ids, am, gen_length)
        bsz, p = ids.shape
        bs, be = p, p + block_length
        cache.setup(ctx, bsz, x.shape[1])
        commit = torch.zeros((bsz, block_length), dtype=torch.bool, device=x.device)
        for k in range(3):  # a refresh, then two steps (with the previous commits known)
            ctx.step = CacheStep(0, k, k, bs, be, last_commit=None if k == 0 else commit)
            before = x.clone()
            call = cache.refresh if k == 0 else cache.step
            logits = call(ctx, x, bs, be)
            name = f"{cls.__name__}.{'refresh' if k == 0 else 'step'}"
            assert torch.equal(x, before), f"{name} wrote the sequence x"
            _check_logits(name, logits, model, bsz, block_length)
            if k == 0 or cache.exact:
                plain = model.logits(x, ctx.attention_mask)[:, bs:be]
                gap = float((logits.double() - plain.double()).abs().max())
                assert gap < 1e-9, (
                    f"{name} logits differ from a plain full forward of the same sequence "
                    f"(max |Δ| {gap:.3g}): "
                    + ("the cache declares exact" if k else "a refresh must see every position")
                )
            commit = torch.zeros_like(commit)
            commit[:, k] = True  # commit one position of the block per step
            x[:, bs + k] = logits[:, k].argmax(-1)
        # A whole decode through the Decoder, batched with ragged prompts.
        cfg = DecodeConfig(
            policy="fixed", steps=gen_length, gen_length=gen_length, block_length=block_length
        )
        dec = Decoder(model, cfg, cache=cache)
        out = dec.generate(prompts)
        assert not (out.responses == model.mask_token_id).any(), (
            f"a decode with {cls.__name__} left masked positions"
        )
        assert out.nfe == gen_length, f"one token per step took {out.nfe} forwards"
