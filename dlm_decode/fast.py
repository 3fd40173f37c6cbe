"""``FastDecoder``: the Decoder's loop over static buffers, replayed as CUDA graphs on a GPU.

Two paths decode the same way and must commit the same tokens:

* the **reference path** is [`Decoder`][dlm_decode.decoder.Decoder]: every step calls the
  cache eagerly, allocates its tensors afresh and builds a new KV buffer per ``generate``;
* the **fast path** is :class:`FastDecoder`: one :class:`StaticState` per decode shape
  ``(B, T, padded)`` holds the sequence ``x``, positions, key mask, KV buffer and one
  ``(B, L, V)`` logits buffer, all at fixed addresses and reused across ``generate`` calls.
  Each step is two *stages* over those buffers:

  1. ``forward`` — the cache's refresh or step, its logits copied into the logits buffer;
  2. ``select`` — ``propose`` (argmax, float32 max/logsumexp confidence), the policy,
     the commit into ``x``, the per-row NFE count and the three contract/termination flags.

  On CUDA each stage, keyed by ``(stage, block_start, block_end)``, runs eagerly the first
  time it is met (on the capture stream: the warm-up), is captured into a CUDA graph the
  second time and replayed from then on. All graphs share one memory pool. The step reads
  its three flags with one ``tolist()``: the loop's single host sync, as in the reference.
  On CPU (or with ``graphs=False``) the very same stage functions run eagerly, so the CPU
  tests check the static-buffer logic that the graphs capture.

What is captured, and when it falls back to eager:

* ``forward``: the built-in caches ``none``, ``prefix`` and ``dual`` (exact classes), whose
  spans depend only on the block; a plugin cache runs eagerly (it may keep Python state)
  and its ``setup`` is called on every ``generate``.
* ``select``: greedy decoding (``temperature == 0``) with a state-free built-in policy
  (``threshold``, ``factor``, ``frechet``, ``frechet_robust``) and ``early_stop`` off.
  ``fixed`` reads the step index, sampling needs a generator, and early stop uses
  ``isin``; those run the same function eagerly.

The refresh (first step of each block) is captured too: its shape is fixed per block, so a
benchmark that repeats a decode replays it. Graph memory: one pool; a stage's temporaries
are freed when its capture ends and reused by the next capture.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from dlm_decode.config import DecodeConfig
from dlm_decode.decoder import (
    Decoder,
    GenerationResult,
    PolicyContractError,
    TraceStep,
    _early_stop,
    _trace_step,
    pad_prompts,
    propose,
)
from dlm_decode.interfaces import (
    Cache,
    CacheContext,
    CommitPolicy,
    Model,
    StepState,
    positions_from_mask,
)

__all__ = ["FastDecoder", "SelectOut", "StaticState", "graphs_available"]

StageKey = tuple[str, int, int]


def graphs_available(device: torch.device | str) -> bool:
    """Whether CUDA graphs can be used on ``device`` (a CUDA device with CUDA present)."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def _graph_safe_cache(cache: Cache) -> bool:
    from caches import DualCache, NoCache, PrefixCache

    return type(cache) in (NoCache, PrefixCache, DualCache)


def _graph_safe_policy(policy: CommitPolicy) -> bool:
    from policies.rules import FactorPolicy, FrechetPolicy, FrechetRobustPolicy, ThresholdPolicy

    return type(policy) in (ThresholdPolicy, FactorPolicy, FrechetPolicy, FrechetRobustPolicy)


class SelectOut(NamedTuple):
    """Outputs of one ``select`` stage (static tensors when replayed from a graph).

    Attributes:
        flags: ``(3,)`` bool: committed an unmasked position, committed nothing in a row
            with work, the block still has a mask after the commit.
        count: ``(B,)`` long, positions committed per row.
        conf: ``(B, L)`` float32 confidences (for traces).
        masked: ``(B, L)`` bool, masked positions before the commit (for traces).
        commit: ``(B, L)`` bool, the policy's mask (for traces).
        x0: ``(B, L)`` long proposals (for traces).
    """

    flags: torch.Tensor
    count: torch.Tensor
    conf: torch.Tensor
    masked: torch.Tensor
    commit: torch.Tensor
    x0: torch.Tensor


@dataclass
class _Captured:
    graph: Any  # torch.cuda.CUDAGraph
    output: Any


@dataclass
class StaticState:
    """Buffers of one decode shape, at fixed addresses, reused by every ``generate``.

    Attributes:
        batch_size: ``B``.
        total_length: ``T``, prompt plus generation.
        padded: whether the rows carry a key mask (left padding).
        x: ``(B, T)`` long, the sequence being decoded.
        logits: ``(B, L, V)`` logits of the active block, written by the forward stage.
        nfe_row: ``(B,)`` long, forwards in which each row had work.
        eos: ``(E,)`` long EOS ids (``-1`` when the model has none).
        ctx: the cache context over ``x``'s position ids, key mask and KV buffer.
        static_cache: the KV buffer is allocated once here (built-in caches) rather than
            by ``Cache.setup`` on every decode.
        graphs: captured stages.
        seen: stages run once eagerly (warm-up), to be captured on their next call.
    """

    batch_size: int
    total_length: int
    padded: bool
    x: torch.Tensor
    logits: torch.Tensor
    nfe_row: torch.Tensor
    eos: torch.Tensor
    ctx: CacheContext
    static_cache: bool
    graphs: dict[StageKey, _Captured] = field(default_factory=dict)
    seen: set[StageKey] = field(default_factory=set)

    @classmethod
    def allocate(
        cls,
        model: Model,
        cache: Cache,
        batch_size: int,
        total_length: int,
        block_length: int,
        padded: bool,
    ) -> StaticState:
        """Allocate every buffer of a ``(B, T)`` decode on the model's device."""
        dev, b, t = model.device, batch_size, total_length
        am = torch.ones((b, t), dtype=torch.bool, device=dev) if padded else None  # (B, T)
        pos = torch.arange(t, device=dev).repeat(b, 1)  # (B, T)
        ctx = CacheContext(model=model, attention_mask=am, position_ids=pos)
        static = _graph_safe_cache(cache)
        if static:
            cache.setup(ctx, b, t)  # allocates the KV buffer once (none: nothing)
        return cls(
            batch_size=b,
            total_length=t,
            padded=padded,
            x=torch.empty((b, t), dtype=torch.long, device=dev),
            logits=torch.empty((b, block_length, model.vocab_size), dtype=model.dtype, device=dev),
            nfe_row=torch.zeros(b, dtype=torch.long, device=dev),
            eos=torch.tensor(model.eos_token_ids or (-1,), device=dev),
            ctx=ctx,
            static_cache=static,
        )

    def load(self, ids: torch.Tensor, am: torch.Tensor | None, mask_id: int) -> None:
        """Write a new batch of prompts into the buffers (in place; addresses unchanged).

        Args:
            ids: ``(B, P)`` left-padded prompt ids.
            am: ``(B, P)`` bool key mask, or ``None`` when no row is padded.
            mask_id: the mask token id that fills the generation.
        """
        p = ids.shape[1]
        self.x.fill_(mask_id)
        self.x[:, :p].copy_(ids)
        self.nfe_row.zero_()
        if self.ctx.attention_mask is not None:
            full = self.ctx.attention_mask  # (B, T)
            full.fill_(True)
            if am is not None:
                full[:, :p].copy_(am)
            self.ctx.position_ids.copy_(positions_from_mask(full))
        else:
            self.ctx.position_ids.copy_(
                torch.arange(self.total_length, device=self.x.device).expand_as(self.x)
            )


class FastDecoder(Decoder):
    """The [`Decoder`][dlm_decode.decoder.Decoder] over static buffers and CUDA graphs.

    Same constructor and same results as ``Decoder`` (the tests check that the committed
    sequences are equal); see the module docstring for what is captured.

    Args:
        model: the model.
        config: the decode config (or keyword fields of one).
        policy: a ready policy object overriding ``config.policy``.
        cache: a ready cache object overriding ``config.cache``.
        graphs: use CUDA graphs; ``None`` (default) uses them when the model is on a CUDA
            device. ``True`` on a CPU model raises ``ValueError``.
        **fields: decode-config fields.

    Attributes:
        stats: counters of the last ``generate``: ``captures``, ``replays``, ``eager``
            (stage runs that were neither).
    """

    def __init__(
        self,
        model: Model,
        config: DecodeConfig | None = None,
        *,
        policy: CommitPolicy | None = None,
        cache: Cache | None = None,
        graphs: bool | None = None,
        **fields: Any,
    ) -> None:
        super().__init__(model, config, policy=policy, cache=cache, **fields)
        avail = graphs_available(model.device)
        if graphs and not avail:
            raise ValueError(
                f"graphs=True needs a model on a CUDA device; this one is on {model.device}"
            )
        self.graphs = avail if graphs is None else bool(graphs)
        self._state: StaticState | None = None
        self._pool: Any = None
        self._stream: Any = None
        self.stats: dict[str, int] = {"captures": 0, "replays": 0, "eager": 0}

    # -- buffers and graphs -----------------------------------------------------------
    def release(self) -> None:
        """Drop the static buffers and captured graphs (the next decode reallocates)."""
        self._state = None
        self._pool = None
        self._stream = None

    def _state_for(self, bsz: int, total: int, padded: bool) -> StaticState:
        st = self._state
        if st is not None and (st.batch_size, st.total_length, st.padded) == (
            bsz,
            total,
            padded,
        ):
            return st
        self.release()  # one shape at a time: free the old buffers and graphs first
        st = StaticState.allocate(
            self.model, self.cache, bsz, total, self.config.block_length, padded
        )
        self._state = st
        if self.graphs:
            self._pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream(device=self.model.device)
        return st

    def _run(self, st: StaticState, key: StageKey, fn: Callable[[], Any], capture: bool) -> Any:
        """Run a stage: eagerly, or warm-up → capture → replay when ``capture``."""
        if not (capture and self.graphs):
            self.stats["eager"] += 1
            return fn()
        done = st.graphs.get(key)
        if done is not None:
            done.graph.replay()
            self.stats["replays"] += 1
            return done.output
        cur = torch.cuda.current_stream(self.model.device)
        side = self._stream
        if key not in st.seen:  # warm-up: the first call runs eagerly on the capture stream
            st.seen.add(key)
            side.wait_stream(cur)
            with torch.cuda.stream(side):
                out = fn()
            cur.wait_stream(side)
            for t in _tensors(out):
                t.record_stream(cur)
            self.stats["eager"] += 1
            return out
        graph = torch.cuda.CUDAGraph()  # torch.cuda.graph synchronizes before capturing
        with torch.cuda.graph(graph, pool=self._pool, stream=side):
            out = fn()
        st.graphs[key] = _Captured(graph, out)
        graph.replay()
        self.stats["captures"] += 1
        return out

    # -- the two stages ---------------------------------------------------------------
    def _select(
        self,
        st: StaticState,
        bs: int,
        be: int,
        prompt_length: int,
        state: StepState,
        gen: torch.Generator | None,
    ) -> SelectOut:
        """Propose, select, commit into ``st.x`` and compute the step's flags."""
        cfg, mask_id = self.config, self.model.mask_token_id
        x = st.x  # (B, T)
        blk = x[:, bs:be]  # (B, L) view
        masked = blk == mask_id  # (B, L)
        has_work = masked.any(-1)  # (B,)
        st.nfe_row.add_(has_work)
        x0, conf = propose(st.logits, mask_id, cfg.temperature, gen)  # (B, L) ×2
        commit = self.policy.select(conf, masked, state)  # (B, L) bool
        bad_unmasked = (commit & ~masked).any()
        bad_none = (has_work & ~commit.any(-1)).any()
        take = commit & masked  # (B, L)
        blk.copy_(torch.where(take, x0, blk))
        count = take.sum(-1)  # (B,)
        if cfg.early_stop:
            _early_stop(x, prompt_length, mask_id, st.eos)
        left = (x[:, bs:be] == mask_id).any()
        flags = torch.stack([bad_unmasked, bad_none, left])  # (3,)
        return SelectOut(flags, count, conf, masked, commit, x0)

    # -- generate ---------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor | Sequence[Sequence[int] | torch.Tensor],
        attention_mask: torch.Tensor | None = None,
    ) -> GenerationResult:
        """Decode a batch of prompts; same contract as
        [`Decoder.generate`][dlm_decode.decoder.Decoder.generate].

        ``sequences`` of the result is a copy: the static buffer is reused by the next call.
        """
        cfg, model, policy, cache = self.config, self.model, self.policy, self.cache
        t0 = time.perf_counter()
        ids, am = pad_prompts(prompt_ids, model.pad_token_id, attention_mask)
        bsz, p = ids.shape
        total = p + cfg.gen_length
        if total > model.max_length:
            raise ValueError(
                f"prompt length {p} + gen_length {cfg.gen_length} = {total} exceeds the "
                f"model's max length {model.max_length}; shorten the prompt or gen_length"
            )
        if p < model.logits_shift:
            raise ValueError("a shifted-logits model needs a prompt of at least one token")
        dev = model.device
        mask_id = model.mask_token_id
        st = self._state_for(bsz, total, am is not None)
        st.load(ids.to(dev), None if am is None else am.to(dev), mask_id)
        ctx, x = st.ctx, st.x
        if not st.static_cache:
            cache.setup(ctx, bsz, total)
        self.stats = {"captures": 0, "replays": 0, "eager": 0}
        gen = None
        if cfg.temperature > 0:
            gen = torch.Generator(device=dev)
            gen.manual_seed(cfg.seed)
        profile = cfg.profile
        sync = torch.cuda.synchronize if dev.type == "cuda" and profile else (lambda: None)
        fwd_graph = st.static_cache
        sel_graph = cfg.temperature == 0 and not cfg.early_stop and _graph_safe_policy(policy)
        from caches import NoCache

        same_fwd = type(cache) is NoCache  # refresh and step are one forward

        nfe = 0
        counts: list[torch.Tensor] = []
        step_blocks: list[int] = []
        trace: list[TraceStep] | None = [] if cfg.trace else None
        t_fwd = t_sel = 0.0
        bl = cfg.block_length
        logits = st.logits  # (B, L, V)
        for b in range(cfg.num_blocks):
            bs, be = p + b * bl, p + (b + 1) * bl
            m0 = (x[:, bs:be] == mask_id).sum(-1)  # (B,)
            if not bool(m0.any()):  # rows finished by early stop
                continue
            step = 0
            while True:
                if step > bl:
                    raise PolicyContractError(
                        f"block {b} still has masks after {step} steps; the policy "
                        f"{policy.key} is not committing"
                    )
                ta = time.perf_counter()
                if step == 0 or same_fwd:
                    self._run(
                        st,
                        ("refresh", bs, be),
                        lambda bs=bs, be=be: logits.copy_(cache.refresh(ctx, x, bs, be)),
                        fwd_graph,
                    )
                else:
                    self._run(
                        st,
                        ("step", bs, be),
                        lambda bs=bs, be=be: logits.copy_(cache.step(ctx, x, bs, be)),
                        fwd_graph,
                    )
                sync()
                tb = time.perf_counter()
                nfe += 1
                state = StepState(
                    step=step,
                    block_index=b,
                    num_blocks=cfg.num_blocks,
                    steps_per_block=cfg.steps_per_block,
                    block_masked_at_start=m0,
                )
                out: SelectOut = self._run(
                    st,
                    ("select", bs, be),
                    lambda bs=bs, be=be, state=state: self._select(st, bs, be, p, state, gen),
                    sel_graph,
                )
                if trace is not None:
                    trace.append(_trace_step(b, step, bs, out.conf, out.masked, out.commit, out.x0))
                counts.append(out.count.clone() if sel_graph and self.graphs else out.count)
                step_blocks.append(b)
                flags = out.flags.tolist()  # the step's one host sync
                sync()
                t_sel += time.perf_counter() - tb
                t_fwd += tb - ta
                if flags[0]:
                    raise PolicyContractError(
                        f"policy {policy.key} committed a position that is not masked "
                        f"(block {b}, step {step}); select() must return commit & masked"
                    )
                if flags[1]:
                    raise PolicyContractError(
                        f"policy {policy.key} committed nothing in a row that still has "
                        f"masked positions (block {b}, step {step}); it must commit at least "
                        f"one per such row"
                    )
                if not flags[2]:
                    break
                step += 1
        timings = {"total_s": time.perf_counter() - t0}
        if profile or dev.type == "cpu":
            timings.update(forward_s=t_fwd, select_s=t_sel)
        commit_counts = (
            torch.stack(counts).cpu() if counts else torch.zeros((0, bsz), dtype=torch.long)
        )
        full_am = ctx.attention_mask
        return GenerationResult(
            sequences=x.clone(),
            prompt_length=p,
            attention_mask=full_am.clone()
            if full_am is not None
            else torch.ones((bsz, total), dtype=torch.bool, device=dev),
            nfe=nfe,
            nfe_per_row=st.nfe_row.cpu(),
            commit_counts=commit_counts,
            step_blocks=torch.tensor(step_blocks, dtype=torch.long),
            timings=timings,
            config=cfg,
            trace=trace,
            eos_token_ids=tuple(model.eos_token_ids),
        )


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    return []
