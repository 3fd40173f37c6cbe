"""The Decoder: composes a Model, a Cache and a CommitPolicy into semi-autoregressive
block decoding.

For each block of ``block_length`` positions, loop until the block has no mask: the first
step of the block is a cache refresh, later steps a cache step (each one forward, one NFE);
propose ``x0 = argmax(logits [+ gumbel])``, take the confidence ``p(x0)`` in float32 for
the block's masked positions, let the policy choose the commit mask, write the commits.
At most one host sync per step (the "is the block done?" check, which also carries the
policy-contract check).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from dlm_decode.config import DecodeConfig
from dlm_decode.interfaces import (
    Cache,
    CacheContext,
    CommitPolicy,
    Model,
    StepState,
    positions_from_mask,
)

__all__ = [
    "DecodeRun",
    "Decoder",
    "GenerationResult",
    "PolicyContractError",
    "SelectOut",
    "TraceStep",
    "generate",
    "pad_prompts",
    "propose",
]


class PolicyContractError(RuntimeError):
    """A commit policy broke its contract (committed nothing, or an unmasked position)."""


@dataclass
class TraceStep:
    """One denoising step of a traced decode (host-side copies).

    Attributes:
        block: block index.
        step: step index within the block.
        profiles: per row, the sorted confidences of the masked positions before the commit.
        committed: per row, how many positions were committed.
        positions: per row, the absolute positions committed.
        tokens: per row, the token ids committed there.
    """

    block: int
    step: int
    profiles: list[list[float]]
    committed: list[int]
    positions: list[list[int]]
    tokens: list[list[int]]


@dataclass
class GenerationResult:
    """What [`generate`][dlm_decode.decoder.generate] returns.

    Attributes:
        sequences: ``(B, P + gen_length)`` long; prompts left-padded to a common length ``P``.
        prompt_length: ``P``, the padded prompt length.
        attention_mask: ``(B, P + gen_length)`` bool, false at left padding.
        nfe: number of model forwards (function evaluations) the batch ran.
        nfe_per_row: ``(B,)`` long, forwards in which each row still had work.
        commit_counts: ``(steps, B)`` long, tokens committed per step and row.
        step_blocks: ``(steps,)`` long, the block index of each step.
        timings: wall-clock seconds: ``total_s`` (and ``forward_s``/``select_s`` when
            profiled).
        trace: per-step :class:`TraceStep` records when tracing was requested.
        config: the decode config that produced this result.
    """

    sequences: torch.Tensor
    prompt_length: int
    attention_mask: torch.Tensor
    nfe: int
    nfe_per_row: torch.Tensor
    commit_counts: torch.Tensor
    step_blocks: torch.Tensor
    timings: dict[str, float]
    config: DecodeConfig
    trace: list[TraceStep] | None = None
    eos_token_ids: tuple[int, ...] = field(default=())

    @property
    def responses(self) -> torch.Tensor:
        """``(B, gen_length)`` generated ids."""
        return self.sequences[:, self.prompt_length :]

    def response_lengths(self) -> torch.Tensor:
        """``(B,)`` response tokens before the first EOS (EOS padding excluded)."""
        resp = self.responses
        if not self.eos_token_ids:
            return torch.full((resp.shape[0],), resp.shape[1], dtype=torch.long)
        eos = torch.isin(resp, torch.tensor(self.eos_token_ids, device=resp.device))
        first = torch.where(eos.any(-1), eos.float().argmax(-1), resp.shape[1])
        return first.cpu()

    def texts(self, tokenizer: Any) -> list[str]:
        """Decode each response up to its first EOS."""
        lengths = self.response_lengths().tolist()
        return [
            tokenizer.decode(row[:n].tolist(), skip_special_tokens=True)
            for row, n in zip(self.responses.cpu(), lengths, strict=True)
        ]


class SelectOut(NamedTuple):
    """Outputs of one select stage (static tensors when a FastDecoder replays a graph).

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
class DecodeRun:
    """The state of one ``generate`` call that the loop's stages read and write.

    Attributes:
        x: ``(B, T)`` long, the sequence being decoded.
        ctx: the cache context (key mask, positions, KV buffer).
        prompt_length: ``P``, the padded prompt length.
        nfe_row: ``(B,)`` long, forwards in which each row had work.
        eos: ``(E,)`` long EOS ids (``-1`` when the model has none).
        logits: ``(B, L, V)`` logits of the active block, set by the forward stage.
        generator: the sampling noise's generator (``temperature > 0``).
    """

    x: torch.Tensor
    ctx: CacheContext
    prompt_length: int
    nfe_row: torch.Tensor
    eos: torch.Tensor
    logits: torch.Tensor | None = None
    generator: torch.Generator | None = None


def pad_prompts(
    prompts: torch.Tensor | Sequence[Sequence[int] | torch.Tensor],
    pad_token_id: int,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Left-pad prompts of different lengths into one ``(B, P)`` tensor.

    Args:
        prompts: a ``(B, P)`` or ``(P,)`` long tensor, or a list of id lists / 1-D tensors.
        pad_token_id: id written at padding.
        attention_mask: ``(B, P)`` mask for an already padded tensor (true at real tokens).

    Returns:
        ``ids`` ``(B, P)`` and the attention mask ``(B, P)`` bool, or ``None`` when no row
        is padded.

    Raises:
        ValueError: on an empty batch or an empty prompt.
    """
    if isinstance(prompts, torch.Tensor):
        ids = prompts.unsqueeze(0) if prompts.dim() == 1 else prompts
        if ids.dim() != 2:
            raise ValueError(f"prompt_ids must be (B, P) or (P,), got shape {tuple(ids.shape)}")
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(
                f"empty prompt (shape {tuple(ids.shape)}): give at least one token per row, "
                f"e.g. a BOS token"
            )
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"prompt_ids must be integer token ids, got dtype {ids.dtype}")
        ids = ids.long()
        if attention_mask is not None:
            am = attention_mask.to(torch.bool)
            if am.shape != ids.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(am.shape)} != prompt shape {tuple(ids.shape)}"
                )
            if (~am.any(-1)).any():
                raise ValueError("a row of attention_mask is all padding: empty prompt")
            return ids, (None if bool(am.all()) else am)
        return ids, None
    rows = [torch.as_tensor(p, dtype=torch.long).flatten() for p in prompts]
    if not rows:
        raise ValueError("no prompts given")
    empty = [i for i, r in enumerate(rows) if r.numel() == 0]
    if empty:
        raise ValueError(f"empty prompt at rows {empty}: give at least one token per row")
    p = max(r.numel() for r in rows)
    ids = torch.full((len(rows), p), pad_token_id, dtype=torch.long)
    am = torch.zeros((len(rows), p), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, p - r.numel() :] = r
        am[i, p - r.numel() :] = True
    return ids, (None if bool(am.all()) else am)


def propose(
    logits: torch.Tensor,
    mask_token_id: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Propose a token per position and its confidence.

    The mask token is never proposed. Confidence is the model's probability of the proposed
    token, computed as ``exp(logit[x0] − logsumexp(logits))`` in float32 (no float64
    softmax over the vocabulary).

    Args:
        logits: ``(B, L, V)`` logits of the block.
        mask_token_id: id excluded from proposals.
        temperature: 0 → argmax; > 0 → Gumbel-max sampling at that temperature, noise in
            float64.
        generator: random generator for the noise.

    Returns:
        ``x0`` ``(B, L)`` long and ``confidence`` ``(B, L)`` float32.
    """
    lf = logits.float()  # (B, L, V)
    lf[..., mask_token_id] = float("-inf")
    lse = torch.logsumexp(lf, dim=-1)  # (B, L)
    if temperature > 0:
        u = torch.rand(lf.shape, dtype=torch.float64, device=lf.device, generator=generator)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))  # (B, L, V) float64
        x0 = (lf.double() / temperature + gumbel).argmax(-1)  # (B, L)
        top = lf.gather(-1, x0.unsqueeze(-1)).squeeze(-1)  # (B, L)
    else:
        top, x0 = lf.max(-1)  # (B, L)
    return x0, torch.exp(top - lse)


def _early_stop(x: torch.Tensor, prompt_length: int, mask_id: int, eos: torch.Tensor) -> None:
    """Fill rows that have committed EOS with all earlier positions decided (in place)."""
    gen = x[:, prompt_length:]  # (B, G)
    g = gen.shape[1]
    ar = torch.arange(g, device=x.device)  # (G,)
    is_mask = gen == mask_id
    first_mask = torch.where(is_mask.any(-1), is_mask.float().argmax(-1), g)  # (B,)
    eos_ok = torch.isin(gen, eos) & (ar < first_mask.unsqueeze(-1))  # (B, G)
    has = eos_ok.any(-1)  # (B,)
    first_eos = eos_ok.float().argmax(-1)  # (B,)
    eos_tok = gen.gather(-1, first_eos.unsqueeze(-1))  # (B, 1)
    fill = has.unsqueeze(-1) & (ar > first_eos.unsqueeze(-1))  # (B, G)
    gen.copy_(torch.where(fill, eos_tok, gen))


class Decoder:
    """A resolved decode: model + cache + policy objects, reusable across prompts.

    Plugins are resolved and their params validated once, here; :meth:`generate` only
    calls plain objects.

    Args:
        model: the model.
        config: the decode config (or keyword fields of one).
        policy: a ready policy object overriding ``config.policy`` (e.g. a test's fake).
        cache: a ready cache object overriding ``config.cache``.
    """

    def __init__(
        self,
        model: Model,
        config: DecodeConfig | None = None,
        *,
        policy: CommitPolicy | None = None,
        cache: Cache | None = None,
        **fields: Any,
    ) -> None:
        from dlm_decode.api import get_cache, get_policy

        if config is None:
            config = DecodeConfig(**fields)
        elif fields:
            config = config.model_copy(update=fields)
            config = DecodeConfig.model_validate(config.model_dump())
        self.model = model
        self.config = config
        self.policy = (
            policy if policy is not None else get_policy(config.policy, **config.policy_args)
        )
        self.cache = cache if cache is not None else get_cache(config.cache, **config.cache_args)
        for need in getattr(self.policy, "requires", ()):
            if getattr(config, need, None) is None:
                raise ValueError(
                    f"policy {self.policy.key!r} needs {need!r} to be set; for one token per "
                    f"step use steps=gen_length ({config.gen_length})"
                )

    # -- the loop's stages (FastDecoder overrides these, not the loop) ---------------
    def _begin(self, ids: torch.Tensor, am: torch.Tensor | None) -> DecodeRun:
        """Allocate the decode's state: sequence, key mask, positions, cache buffers."""
        cfg, model = self.config, self.model
        bsz, p = ids.shape
        total = p + cfg.gen_length
        dev = model.device
        x = torch.full((bsz, total), model.mask_token_id, dtype=torch.long, device=dev)
        x[:, :p] = ids.to(dev)  # (B, T)
        if am is not None:
            full_am = torch.ones((bsz, total), dtype=torch.bool, device=dev)
            full_am[:, :p] = am.to(dev)
            positions = positions_from_mask(full_am)  # (B, T)
        else:
            full_am = None
            positions = torch.arange(total, device=dev).expand(bsz, total)
        ctx = CacheContext(model=model, attention_mask=full_am, position_ids=positions)
        self.cache.setup(ctx, bsz, total)
        return DecodeRun(
            x=x,
            ctx=ctx,
            prompt_length=p,
            nfe_row=torch.zeros(bsz, dtype=torch.long, device=dev),
            eos=torch.tensor(model.eos_token_ids or (-1,), device=dev),
        )

    def _forward(self, run: DecodeRun, refresh: bool, bs: int, be: int) -> None:
        """One NFE: the cache's refresh (block start) or step; sets ``run.logits``."""
        if refresh:
            run.logits = self.cache.refresh(run.ctx, run.x, bs, be)  # (B, L, V)
        else:
            run.logits = self.cache.step(run.ctx, run.x, bs, be)  # (B, L, V)

    def _select(self, run: DecodeRun, bs: int, be: int, state: StepState) -> SelectOut:
        """Propose, let the policy choose, commit into ``run.x``, compute the step's flags."""
        cfg, mask_id = self.config, self.model.mask_token_id
        x = run.x  # (B, T)
        blk = x[:, bs:be]  # (B, L) view
        masked = blk == mask_id  # (B, L)
        has_work = masked.any(-1)  # (B,)
        run.nfe_row.add_(has_work)
        x0, conf = propose(run.logits, mask_id, cfg.temperature, run.generator)  # (B, L) ×2
        commit = self.policy.select(conf, masked, state)  # (B, L) bool
        take = commit & masked  # (B, L)
        bad_unmasked = (commit != take).any()
        bad_none = (has_work & ~take.any(-1)).any()
        blk.copy_(torch.where(take, x0, blk))
        if cfg.early_stop:
            _early_stop(x, run.prompt_length, mask_id, run.eos)
        left = (x[:, bs:be] == mask_id).any()
        flags = torch.stack([bad_unmasked, bad_none, left])  # (3,)
        return SelectOut(flags, take.sum(-1), conf, masked, commit, x0)

    def _finish(self, run: DecodeRun) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The result's ``sequences`` and key mask (FastDecoder copies its static buffers)."""
        return run.x, run.ctx.attention_mask

    # -- the loop ---------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor | Sequence[Sequence[int] | torch.Tensor],
        attention_mask: torch.Tensor | None = None,
    ) -> GenerationResult:
        """Decode a batch of prompts.

        Args:
            prompt_ids: ``(B, P)`` long tensor, or a list of prompts of different lengths
                (left-padded here with the model's pad id).
            attention_mask: ``(B, P)`` mask for an already left-padded tensor.

        Returns:
            A :class:`GenerationResult`.
        """
        cfg, model, policy = self.config, self.model, self.policy
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
        run = self._begin(ids, am)
        dev = model.device
        if cfg.temperature > 0:
            run.generator = torch.Generator(device=dev)
            run.generator.manual_seed(cfg.seed)
        sync = torch.cuda.synchronize if dev.type == "cuda" and cfg.profile else (lambda: None)

        nfe = 0
        counts: list[torch.Tensor] = []
        step_blocks: list[int] = []
        trace: list[TraceStep] | None = [] if cfg.trace else None
        t_fwd = t_sel = 0.0
        bl = cfg.block_length
        for b in range(cfg.num_blocks):
            bs, be = p + b * bl, p + (b + 1) * bl
            m0 = (run.x[:, bs:be] == model.mask_token_id).sum(-1)  # (B,)
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
                self._forward(run, step == 0, bs, be)
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
                out = self._select(run, bs, be, state)
                if trace is not None:
                    trace.append(_trace_step(b, step, bs, out.conf, out.masked, out.commit, out.x0))
                counts.append(out.count)
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
        if cfg.profile or dev.type == "cpu":
            timings.update(forward_s=t_fwd, select_s=t_sel)
        commit_counts = (
            torch.stack(counts).cpu() if counts else torch.zeros((0, bsz), dtype=torch.long)
        )
        sequences, full_am = self._finish(run)
        return GenerationResult(
            sequences=sequences,
            prompt_length=p,
            attention_mask=full_am
            if full_am is not None
            else torch.ones((bsz, total), dtype=torch.bool, device=dev),
            nfe=nfe,
            nfe_per_row=run.nfe_row.cpu(),
            commit_counts=commit_counts,
            step_blocks=torch.tensor(step_blocks, dtype=torch.long),
            timings=timings,
            config=cfg,
            trace=trace,
            eos_token_ids=tuple(model.eos_token_ids),
        )


def _trace_step(
    block: int,
    step: int,
    block_start: int,
    conf: torch.Tensor,
    masked: torch.Tensor,
    commit: torch.Tensor,
    x0: torch.Tensor,
) -> TraceStep:
    conf_c, masked_c, commit_c, x0_c = (t.cpu() for t in (conf, masked, commit, x0))
    profiles, committed, positions, tokens = [], [], [], []
    for r in range(conf_c.shape[0]):
        vals = conf_c[r][masked_c[r]].sort(descending=True).values
        profiles.append([float(v) for v in vals])
        idx = commit_c[r].nonzero().flatten()
        committed.append(int(idx.numel()))
        positions.append([block_start + int(i) for i in idx])
        tokens.append([int(t) for t in x0_c[r][idx]])
    return TraceStep(block, step, profiles, committed, positions, tokens)


def generate(
    model: Model,
    prompt_ids: torch.Tensor | Sequence[Sequence[int] | torch.Tensor],
    *,
    policy: str | CommitPolicy = "frechet",
    policy_args: dict[str, Any] | None = None,
    cache: str | Cache = "dual",
    cache_args: dict[str, Any] | None = None,
    gen_length: int = 256,
    block_length: int = 32,
    steps: int | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    early_stop: bool = False,
    trace: bool = False,
    attention_mask: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
) -> GenerationResult:
    """Decode prompts with a commit policy and a KV cache.

    Args:
        model: a loaded [`Model`][dlm_decode.interfaces.Model] (see ``load_model``).
        prompt_ids: ``(B, P)`` long tensor, or a list of prompts of different lengths.
        policy: policy name (``frechet``, ``threshold``, ``factor``, ``fixed``, …) or object.
        policy_args: the policy's params; default ``{"margin": 0.25}`` for ``frechet``.
        cache: ``none``, ``prefix``, ``dual`` or a plugin's name, or a cache object.
        cache_args: the cache's params.
        gen_length: tokens to generate (a multiple of ``block_length``).
        block_length: tokens per block.
        steps: total steps over all blocks (required by ``fixed``).
        temperature: 0 for argmax, > 0 for Gumbel-max sampling.
        seed: seed of the sampling noise.
        early_stop: stop spending forwards on rows that have finished with EOS.
        trace: record the confidence profile and commits of every step.
        attention_mask: ``(B, P)`` mask when ``prompt_ids`` is already left-padded.
        config: a full [`DecodeConfig`][dlm_decode.config.DecodeConfig]; when given, the
            keyword fields above are ignored.

    Returns:
        A [`GenerationResult`][dlm_decode.decoder.GenerationResult].

    Examples:
        >>> import dlm_decode
        >>> model = dlm_decode.load_model("tiny")  # doctest: +SKIP
        >>> out = dlm_decode.generate(model, [[1, 2, 3]], policy="frechet",
        ...                           policy_args={"margin": 0.25})  # doctest: +SKIP
    """
    pol_obj = policy if isinstance(policy, CommitPolicy) else None
    cache_obj = cache if isinstance(cache, Cache) else None
    if config is None:
        if policy_args is None:
            policy_args = {"margin": 0.25} if policy in ("frechet", "frechet.v1") else {}
        config = DecodeConfig(
            policy=pol_obj.key if pol_obj else policy,
            policy_args=pol_obj.params.model_dump() if pol_obj else policy_args,
            cache=cache_obj.key if cache_obj else cache,
            cache_args=cache_obj.params.model_dump() if cache_obj else (cache_args or {}),
            gen_length=gen_length,
            block_length=block_length,
            steps=steps,
            temperature=temperature,
            seed=seed,
            early_stop=early_stop,
            trace=trace,
        )
    dec = Decoder(model, config, policy=pol_obj, cache=cache_obj)
    return dec.generate(prompt_ids, attention_mask=attention_mask)
