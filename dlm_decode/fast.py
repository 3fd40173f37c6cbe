"""``FastDecoder``: the Decoder's loop over static buffers, replayed as CUDA graphs on a GPU.

Two paths decode the same way and must commit the same tokens:

* the **reference path** is [`Decoder`][dlm_decode.decoder.Decoder]: every step calls the
  cache eagerly, allocates its tensors afresh and builds a new KV buffer per ``generate``;
* the **fast path** is [`FastDecoder`][dlm_decode.fast.FastDecoder]: one
  [`StaticState`][dlm_decode.fast.StaticState] per decode shape
  ``(B, T, padded)`` holds the sequence ``x``, positions, key mask, KV buffer and one
  ``(B, L, V)`` logits buffer, all at fixed addresses and reused across ``generate`` calls.
  Each step is two *stages* over those buffers:

  1. ``forward`` — the cache's refresh or step, its logits copied into the logits buffer;
  2. ``select`` — the proposals and the signals the policy declared (argmax, float32
     max/logsumexp confidence, entropy, top-k, …), the policy, its commits, edits and
     remasks into ``x``, the block history, the per-row NFE count and the step's
     contract/termination flags.

  On CUDA each stage, keyed by ``(stage, block_start, block_end)``, runs eagerly the first
  time it is met (on the capture stream: the warm-up), is captured into a CUDA graph the
  second time and replayed from then on. All graphs share one memory pool. The step reads
  its three flags with one ``tolist()``: the loop's single host sync, as in the reference.
  On CPU (or with ``graphs=False``) the very same stage functions run eagerly, so the CPU
  tests check the static-buffer logic that the graphs capture.

What is captured, and when it falls back to eager:

* ``forward``: a cache whose class declares
  [`capturable`][dlm_decode.interfaces.Cache.capturable] (its spans depend only on the
  block, it keeps no Python state between steps, and its buffers can be allocated once
  per shape): the built-ins ``none``, ``prefix`` and ``dual`` declare it. Any other cache
  runs eagerly and its ``setup`` is called on every ``generate``.
* ``select``: greedy decoding (``temperature == 0``) with ``early_stop`` off and a policy
  whose class declares [`capturable`][dlm_decode.interfaces.CommitPolicy.capturable]
  (tensor-only, no Python step state): the built-ins ``threshold``, ``factor``,
  ``frechet`` and ``frechet_robust`` declare it; ``fixed`` does not (it reads the step
  index). Sampling needs a generator and early stop uses ``isin``; those run the same
  function eagerly.

The refresh (first step of each block) is captured too: its shape is fixed per block, so a
benchmark that repeats a decode replays it. Graph memory: one pool; a stage's temporaries
are freed when its capture ends and reused by the next capture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dlm_decode.config import DecodeConfig
from dlm_decode.decoder import Decoder, DecodeRun, SelectOut
from dlm_decode.interfaces import (
    Cache,
    CacheContext,
    ForwardCounter,
    Model,
    StepState,
    positions_from_mask,
)
from dlm_decode.signals import History

__all__ = ["FastDecoder", "StaticState", "graphs_available"]

StageKey = tuple[str, int, int]


def graphs_available(device: torch.device | str) -> bool:
    """Whether CUDA graphs can be used on ``device`` (a CUDA device with CUDA present)."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def _capturable(plugin: Any) -> bool:
    """What the plugin's class declares (``capturable``); never a list of known classes."""
    return bool(getattr(type(plugin), "capturable", False))


def _step_is_refresh(cache: Cache) -> bool:
    """A cache whose step is its refresh (``none``) shares one captured forward for both."""
    return type(cache).step is type(cache).refresh


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
        history: the block history (reset in place at every block start).
        policy_state: the policy's tensors, allocated once per shape.
        x_before: ``(B, T)`` the sequence before a forward (the read-only check).
        x_written: ``()`` bool, the cache wrote the sequence.
        own_row: ``(B,)`` long, each row's own positions computed (token-forwards per row).
        positions: token positions per row each captured forward stage computes (a
            replayed graph runs no Python, so the count measured at capture is reused).
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
    history: History
    policy_state: dict[str, torch.Tensor]
    x_before: torch.Tensor
    x_written: torch.Tensor
    own_row: torch.Tensor
    graphs: dict[StageKey, _Captured] = field(default_factory=dict)
    positions: dict[StageKey, int] = field(default_factory=dict)
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
        policy_state: dict[str, torch.Tensor],
    ) -> StaticState:
        """Allocate every buffer of a ``(B, T)`` decode on the model's device (the policy's
        tensors come allocated)."""
        dev, b, t = model.device, batch_size, total_length
        am = torch.ones((b, t), dtype=torch.bool, device=dev) if padded else None  # (B, T)
        pos = torch.arange(t, device=dev).repeat(b, 1)  # (B, T)
        ctx = CacheContext(
            model=ForwardCounter(model, am, t, b),
            attention_mask=am,
            position_ids=pos,
            refresh_flag=torch.zeros((), dtype=torch.bool, device=dev),
        )
        static = _capturable(cache)
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
            history=History.empty(b, block_length, dev),
            policy_state=policy_state,
            x_before=torch.empty((b, t), dtype=torch.long, device=dev),
            x_written=torch.zeros((), dtype=torch.bool, device=dev),
            own_row=torch.zeros(b, dtype=torch.long, device=dev),
        )

    def load(self, ids: torch.Tensor, am: torch.Tensor | None, mask_id: int) -> None:
        """Write a new batch of prompts into the buffers (in place; addresses unchanged).

        Args:
            ids: ``(B, P)`` left-padded prompt ids.
            am: ``(B, P)`` bool key mask, or ``None`` when no row is padded.
            mask_id: the mask token id that fills the generation.
        """
        p = ids.shape[1]
        self.ctx.extra.clear()  # ``extra`` lives for one decode
        self.x.fill_(mask_id)
        self.x[:, :p].copy_(ids)
        self.nfe_row.zero_()
        self.own_row.zero_()
        self.ctx.model.own_positions.zero_()
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
        config: the decode config.
        graphs: use CUDA graphs; ``None`` (default) uses them when the model is on a CUDA
            device. ``True`` on a CPU model raises ``ValueError``.
        **settings: ``policy``, ``policy_args``, ``cache``, ``cache_args`` and config fields,
            as in [`Decoder`][dlm_decode.decoder.Decoder].

    Attributes:
        stats: counters of the last ``generate``: ``captures``, ``replays``, ``eager``
            (stage runs that were neither).
    """

    def __init__(
        self,
        model: Model,
        config: DecodeConfig | None = None,
        *,
        graphs: bool | None = None,
        **settings: Any,
    ) -> None:
        super().__init__(model, config, **settings)
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
            self.model,
            self.cache,
            bsz,
            total,
            self.config.block_length,
            padded,
            self._policy_state(bsz, self.model.device),
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

    # -- the loop's stages over the static buffers ------------------------------------
    def _begin(self, ids: torch.Tensor, am: torch.Tensor | None) -> DecodeRun:
        bsz, p = ids.shape
        total = self.block_layout(p)[2]  # P + gen_length, or up to the grid's end
        st = self._state_for(bsz, total, am is not None)
        st.load(
            ids.to(self.model.device),
            None if am is None else am.to(self.model.device),
            self.model.mask_token_id,
        )
        if not st.static_cache:
            self.cache.setup(st.ctx, bsz, total)
        self.stats = {"captures": 0, "replays": 0, "eager": 0}
        cfg = self.config
        self._sel_graph = (
            cfg.temperature == 0
            and not cfg.early_stop
            and "uniform" not in self.signal_spec
            and _capturable(self.policy)
        )
        return DecodeRun(
            x=st.x,
            ctx=st.ctx,
            prompt_length=p,
            nfe_row=st.nfe_row,
            eos=st.eos,
            history=st.history,
            policy_state=st.policy_state,
            logits=st.logits,
            x_before=st.x_before,
            x_written=st.x_written,
            own_row=st.own_row,
        )

    def _forward(self, run: DecodeRun, refresh: bool, bs: int, be: int) -> int:
        st, logits = self._state, run.logits
        refresh = refresh or _step_is_refresh(self.cache)  # one forward (one graph) for both
        key = ("refresh" if refresh else "step", bs, be)
        fn = lambda: logits.copy_(self._cache_call(run, refresh, bs, be))
        self._run(st, key, fn, st.static_cache)
        counted = run.ctx.model.reset()[1]
        if counted or key not in st.positions:  # a replay runs no Python: reuse the count
            st.positions[key] = counted
        return st.positions[key]

    def _select(self, run: DecodeRun, bs: int, be: int, state: StepState) -> SelectOut:
        sel = super()._select
        out: SelectOut = self._run(
            self._state, ("select", bs, be), lambda: sel(run, bs, be, state), self._sel_graph
        )
        if self._sel_graph and self.graphs:  # the graph's output buffers are rewritten next step
            out = out._replace(
                count=out.count.clone(), edits=out.edits.clone(), remasks=out.remasks.clone()
            )
        return out

    def _finish(self, run: DecodeRun) -> tuple[torch.Tensor, torch.Tensor | None]:
        am = run.ctx.attention_mask
        return run.x.clone(), None if am is None else am.clone()


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    return []
