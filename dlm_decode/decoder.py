"""The Decoder: composes a Model, a Cache and a CommitPolicy into semi-autoregressive
block decoding.

For each block of ``block_length`` positions, loop until the block has no mask: the first
step of the block is a cache refresh, later steps a cache step (each one forward, one NFE);
propose ``x0 = argmax(logits [+ gumbel])`` and compute the signals the policy declared
([`dlm_decode.signals`][dlm_decode.signals]), let the policy decide (a commit mask, or a
[`Decision`][dlm_decode.signals.Decision] that may also edit or remask positions committed
earlier in the block), apply it, count it and record it. At most one host sync per step
(the "is the block done?" check, which also carries the policy-contract checks). A block
that does not finish within ``max_steps_per_block`` steps is an error that names the
policy and the budget.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

import torch

from dlm_decode.config import DecodeConfig
from dlm_decode.interfaces import (
    CacheContext,
    CacheStep,
    ForwardCounter,
    Model,
    MultimodalPrompt,
    StepState,
    positions_from_mask,
)
from dlm_decode.models.memory import check_memory
from dlm_decode.settings import CacheLike, PolicyLike, resolve
from dlm_decode.signals import (
    Decision,
    History,
    SignalSpec,
    StepSignals,
    compute_signals,
    parse_needs,
)
from dlm_decode.trace_view import Trace

__all__ = [
    "FLAGS",
    "Applied",
    "CacheContractError",
    "DecodeRun",
    "Decoder",
    "GenerationResult",
    "NonFiniteLogitsError",
    "PolicyContractError",
    "SelectOut",
    "TraceStep",
    "apply_decision",
    "check_prompt_ids",
    "generate",
    "pad_prompts",
    "propose",
]


class CacheContractError(RuntimeError):
    """A cache broke its contract (wrote the sequence, returned misaligned logits)."""


class PolicyContractError(RuntimeError):
    """A commit policy broke its contract (committed nothing, or an unmasked position)."""


class NonFiniteLogitsError(RuntimeError):
    """The logits of a step held NaN or infinite values (broken weights or a broken cache)."""


@dataclass
class TraceStep:
    """One denoising step of a traced decode (host-side copies), position by position.

    The per-position fields hold one list per row, with one entry per position of the
    active block (``L = block_length`` entries, the block's first position first). The
    per-row summaries that earlier versions stored (``profiles``, ``committed``,
    ``positions``, ``tokens``, ``edited``, ``remasked``) are derived from them.

    Attributes:
        block: block index.
        step: step index within the block.
        block_start: absolute position of the block's first position.
        before: per row and position, the token id before the step, ``None`` where masked.
        after: per row and position, the token id after the step (``None`` where masked),
            early stop's EOS fill included.
        proposals: per row and position, the proposal ``x0`` (the argmax, or the sampled
            token at ``temperature > 0``).
        confidences: per row and position, ``p(x0)``.
        actions: per row and position, what the step did there: ``"commit"`` (a masked
            position filled), ``"edit"`` (a committed token changed), ``"remask"`` (a
            committed token turned back into the mask), ``"fill"`` (written by early
            stop: the EOS fill after a row's first EOS) or ``"none"``.
        written: per row and position, the token the decision wrote at ``commit`` and
            ``edit`` positions (``None`` elsewhere).
        signals: the extra signals the policy declared (``current``, ``entropy``,
            ``top2``, ``uniform``: a float per position; ``topk``: ``[id, p]`` pairs per
            position), by name, per row; empty when it declared none.
        active: per row, whether the row took part in the step.
        criteria: per row, what the policy compares along the sorted profile (its
            [`ProfileCriterion`][dlm_decode.interfaces.ProfileCriterion] as a dict:
            ``name``, ``values``, ``bound``, ``bound_name``, ``passes``), or ``None``
            where the policy declares none.
    """

    block: int
    step: int
    block_start: int
    before: list[list[int | None]]
    after: list[list[int | None]]
    proposals: list[list[int]]
    confidences: list[list[float]]
    actions: list[list[str]]
    written: list[list[int | None]]
    signals: dict[str, list[list[Any]]] = field(default_factory=dict)
    active: list[bool] = field(default_factory=list)
    criteria: list[dict[str, Any] | None] = field(default_factory=list)

    def _where(self, action: str) -> list[list[int]]:
        """Per row, the block offsets where the step did ``action``."""
        return [[i for i, a in enumerate(row) if a == action] for row in self.actions]

    @cached_property
    def profiles(self) -> list[list[float]]:
        """Per row, the sorted confidences (descending) of the positions masked before
        the step."""
        return [
            sorted((c for c, b in zip(conf, before, strict=True) if b is None), reverse=True)
            for conf, before in zip(self.confidences, self.before, strict=True)
        ]

    @property
    def committed(self) -> list[int]:
        """Per row, how many positions were committed."""
        return [len(r) for r in self._where("commit")]

    @property
    def positions(self) -> list[list[int]]:
        """Per row, the absolute positions committed (ascending)."""
        return [[self.block_start + i for i in r] for r in self._where("commit")]

    @property
    def tokens(self) -> list[list[int]]:
        """Per row, the token ids committed at ``positions``."""
        return [
            [int(w[i] or 0) for i in r]
            for w, r in zip(self.written, self._where("commit"), strict=True)
        ]

    @property
    def edited(self) -> list[list[int]]:
        """Per row, the absolute positions whose token was edited."""
        return [[self.block_start + i for i in r] for r in self._where("edit")]

    @property
    def remasked(self) -> list[list[int]]:
        """Per row, the absolute positions turned back into the mask."""
        return [[self.block_start + i for i in r] for r in self._where("remask")]


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
        edit_counts: ``(steps, B)`` long, committed tokens edited (changed) per step and row.
        remask_counts: ``(steps, B)`` long, committed tokens turned back into the mask.
        token_forwards: token positions the batch's forwards computed (rows × positions,
            padding included): the cost beside NFE, which counts calls.
        token_forwards_per_row: ``(B,)`` long, each row's own token positions (not its
            left padding) computed in the forwards where it had work: what the row costs
            in its own right, the same whatever it is batched with (a finished row rides
            along in its batch's later forwards without being counted).
        token_forwards_per_step: ``(steps,)`` long, positions each row computed at each
            step.
        step_blocks: ``(steps,)`` long, the block index of each step.
        timings: wall-clock seconds: ``total_s`` (and ``forward_s``/``select_s`` when
            profiled).
        trace: when tracing was requested, a [`Trace`][dlm_decode.trace_view.Trace]: the
            list of per-step [`TraceStep`][dlm_decode.decoder.TraceStep] records, with
            ``to_html()`` and a notebook view.
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
    edit_counts: torch.Tensor | None = None
    remask_counts: torch.Tensor | None = None
    token_forwards: int = 0
    token_forwards_per_row: torch.Tensor | None = None
    token_forwards_per_step: torch.Tensor | None = None

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


FLAGS = (
    "committed_unmasked",
    "no_progress",
    "continue",
    "revoked_uneditable",
    "sets_overlap",
    "bad_tokens",
    "masked_mutated",
    "changed",
    "cache_wrote_x",
    "refresh_next",
    "nonfinite",
)
"""Names of the step's contract and termination flags, in their order in ``SelectOut.flags``."""


class SelectOut(NamedTuple):
    """Outputs of one select stage (static tensors when a FastDecoder replays a graph).

    Attributes:
        flags: ``(11,)`` bool, in [`FLAGS`][dlm_decode.decoder.FLAGS] order: committed an
            unmasked position; a row with work made no progress; some row takes part in the
            next step (it has a mask, or it is still refining); edited or remasked a position that
            was not committed earlier in the
            block; the commit/edit/remask sets overlap; a written token is the mask id or
            outside the vocabulary; ``select`` modified its ``masked`` argument; an edit or
            remask changed the block; the cache wrote the sequence; the cache asked for a
            refresh at the next step; an active row's logits were not finite.
        count: ``(B,)`` long, positions committed per row.
        edits: ``(B,)`` long, committed positions whose token an edit changed, per row.
        remasks: ``(B,)`` long, positions remasked per row.
        conf: ``(B, L)`` float32 confidences (for traces).
        masked: ``(B, L)`` bool, masked positions before the step (for traces).
        commit: ``(B, L)`` bool, the positions committed (for traces).
        x0: ``(B, L)`` long, the tokens written at committed and edited positions.
        edit: ``(B, L)`` bool, the positions an edit changed.
        remask: ``(B, L)`` bool, the positions remasked.
        active: ``(B,)`` bool, the rows that took part in the step.
    """

    flags: torch.Tensor
    count: torch.Tensor
    edits: torch.Tensor
    remasks: torch.Tensor
    conf: torch.Tensor
    masked: torch.Tensor
    commit: torch.Tensor
    x0: torch.Tensor
    edit: torch.Tensor
    remask: torch.Tensor
    active: torch.Tensor


@dataclass
class DecodeRun:
    """The state of one ``generate`` call that the loop's stages read and write.

    Attributes:
        x: ``(B, T)`` long, the sequence being decoded.
        ctx: the cache context (key mask, positions, KV buffer).
        prompt_length: ``P``, the padded prompt length.
        nfe_row: ``(B,)`` long, forwards in which each row had work.
        eos: ``(E,)`` long EOS ids (``-1`` when the model has none).
        history: the active block's [`History`][dlm_decode.signals.History].
        policy_state: the policy's tensors (from ``make_state``).
        logits: ``(B, L, V)`` logits of the active block, set by the forward stage.
        generator: the random generator (sampling, ``uniform`` signals).
        x_before: ``(B, T)`` long, the sequence before the forward (the read-only check).
        x_written: ``()`` bool, the cache wrote the sequence during the forward.
        own_row: ``(B,)`` long, each row's own token positions computed in the steps where
            it had work (``GenerationResult.token_forwards_per_row``).
    """

    x: torch.Tensor
    ctx: CacheContext
    prompt_length: int
    nfe_row: torch.Tensor
    eos: torch.Tensor
    history: History
    policy_state: dict[str, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None
    generator: torch.Generator | None = None
    x_before: torch.Tensor | None = None
    x_written: torch.Tensor | None = None
    own_row: torch.Tensor | None = None


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
    if isinstance(prompts, (str, bytes)):
        raise ValueError(
            "prompts must be token ids, not text: encode them first (dlm_decode.evaluate."
            "encode_prompts, or the tokenizer)"
        )
    rows = [_prompt_row(p, i) for i, p in enumerate(prompts)]
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


def _prompt_row(prompt: Any, row: int) -> torch.Tensor:
    """One prompt as a 1-D long tensor; floats, booleans and text are refused (a float
    would otherwise be truncated to an id)."""
    if isinstance(prompt, (str, bytes)):
        raise ValueError(
            f"prompt {row} is text ({prompt[:20]!r}…); give token ids (encode it with the "
            f"model's tokenizer first)"
        )
    try:
        t = prompt if isinstance(prompt, torch.Tensor) else torch.as_tensor(prompt)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"prompt {row} is not a flat list of token ids: {exc}") from None
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.long)  # refused as an empty prompt by the caller
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(
            f"prompt {row} holds {t.dtype} values; token ids are integers (a float such as "
            f"12.7 is not an id)"
        )
    if t.dim() > 1:
        raise ValueError(f"prompt {row} has shape {tuple(t.shape)}; give one flat list of ids")
    return t.to(torch.long).flatten()


def check_prompt_ids(
    ids: torch.Tensor, am: torch.Tensor | None, vocab_size: int, mask_token_id: int
) -> None:
    """Refuse token ids the model cannot embed and the mask token in a prompt (one host
    read of the prompt, before any forward).

    Args:
        ids: ``(B, P)`` long, the left-padded prompts.
        am: ``(B, P)`` bool, true at real tokens (``None``: no padding).
        vocab_size: the model's vocabulary size.
        mask_token_id: the model's mask id.

    Raises:
        ValueError: names the row, the position and the id.
    """
    real = torch.ones_like(ids, dtype=torch.bool) if am is None else am.to(ids.device)
    bad = real & ((ids < 0) | (ids >= vocab_size))
    if bool(bad.any()):
        r, c = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"prompt {r} holds token id {int(ids[r, c])} at position {c}, outside the "
            f"model's vocabulary [0, {vocab_size}); check the tokenizer matches the model"
        )
    masked = real & (ids == mask_token_id)
    if bool(masked.any()):
        r, c = (int(v) for v in masked.nonzero()[0])
        raise ValueError(
            f"prompt {r} holds the mask token (id {mask_token_id}) at position {c}; prompts "
            f"are conditioning text, and dlm_decode does not infill inside them: remove it "
            f"(every generated position is masked already)"
        )


def propose(
    logits: torch.Tensor,
    mask_token_id: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Propose a token per position and its confidence (the always-present signals).

    The mask token is never proposed. Confidence is the model's probability of the proposed
    token, ``exp(logit[x0] − logsumexp(logits))`` in float32 (no float64 softmax over the
    vocabulary); see [`compute_signals`][dlm_decode.signals.compute_signals].

    Args:
        logits: ``(B, L, V)`` logits of the block.
        mask_token_id: id excluded from proposals.
        temperature: 0 → argmax; > 0 → Gumbel-max sampling at that temperature, noise in
            float64.
        generator: random generator for the noise.

    Returns:
        ``x0`` ``(B, L)`` long and ``confidence`` ``(B, L)`` float32.
    """
    block = torch.zeros(logits.shape[:2], dtype=torch.long, device=logits.device)
    sig = compute_signals(
        logits, block, mask_token_id, SignalSpec(), temperature=temperature, generator=generator
    )
    return sig.x0, sig.confidence


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


def _prompt_input(
    model: Model, prompts: Any, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Padded prompt ids, their key mask and, for prompts with images, the embeddings the
    model made of them (once, before the first forward).

    Args:
        model: the model (its pad id, its
            [`embed_prompt`][dlm_decode.interfaces.Model.embed_prompt]).
        prompts: token ids (see [`pad_prompts`][dlm_decode.decoder.pad_prompts]) or a list
            of [`MultimodalPrompt`][dlm_decode.interfaces.MultimodalPrompt].
        attention_mask: ``(B, P)`` mask of already padded ids.

    Returns:
        ``ids`` ``(B, P)``, the mask ``(B, P)`` (or ``None``), and ``embeds`` ``(B, P, d)``
        (``None`` when no prompt has an image).
    """
    multi = (
        not isinstance(prompts, (torch.Tensor, str, bytes))
        and isinstance(prompts, Sequence)
        and any(isinstance(p, MultimodalPrompt) for p in prompts)
    )
    if not multi:
        return (*pad_prompts(prompts, model.pad_token_id, attention_mask), None)
    if attention_mask is not None:
        raise ValueError("attention_mask is for padded token ids; MultimodalPrompt rows are not")
    rows = [p if isinstance(p, MultimodalPrompt) else MultimodalPrompt(list(p)) for p in prompts]
    if not any(r.images for r in rows):  # text only: plain token ids
        return (*pad_prompts([list(r.ids) for r in rows], model.pad_token_id), None)
    out = model.embed_prompt(rows)
    return out.ids.long(), out.attention_mask, out.embeds


def _attach_prompt_embeds(run: DecodeRun, embeds: torch.Tensor | None) -> None:
    """Hand a multimodal prompt's embeddings to the cache context's model view (in place
    when reused buffers already hold ones of that shape, so captured graphs stay valid)."""
    counter = run.ctx.model
    if not hasattr(counter, "prompt_embeds"):
        return
    dev = run.x.device
    old = counter.prompt_embeds
    if embeds is None:
        counter.prompt_embeds = None
    elif old is not None and old.shape == embeds.shape and old.dtype == embeds.dtype:
        old.copy_(embeds)
    else:
        counter.prompt_embeds = embeds.to(dev)


class Decoder:
    """A resolved decode: model + cache + policy objects, reusable across prompts.

    Plugins are resolved and their params validated once, here (through
    [`resolve`][dlm_decode.settings.resolve]); [`generate`][dlm_decode.decoder.Decoder.generate]
    only calls plain objects.
    ``policy`` and ``cache`` take the same forms as in
    [`generate`][dlm_decode.decoder.generate]: a name (with ``policy_args`` /
    ``cache_args``), ``"name:k=v"``, a [`PolicyRef`][dlm_decode.config.PolicyRef] /
    [`CacheRef`][dlm_decode.config.CacheRef], or a ready object.

    Args:
        model: the model.
        config: the decode config; the keyword arguments below override its fields.
        policy: the commit policy (overrides ``config.policy``).
        policy_args: the named policy's parameters.
        cache: the cache (overrides ``config.cache``).
        cache_args: the named cache's parameters.
        **fields: other [`DecodeConfig`][dlm_decode.config.DecodeConfig] fields.

    Attributes:
        config: the resolved config (versioned keys, every parameter with its default).
        policy: the policy object.
        cache: the cache object.
        settings: the [`Resolved`][dlm_decode.settings.Resolved] settings, with the
            policy's and cache's references and labels.
    """

    def __init__(
        self,
        model: Model,
        config: DecodeConfig | None = None,
        *,
        policy: PolicyLike | None = None,
        policy_args: dict[str, Any] | None = None,
        cache: CacheLike | None = None,
        cache_args: dict[str, Any] | None = None,
        **fields: Any,
    ) -> None:
        self.model = model
        self.settings = resolve(
            config,
            policy=policy,
            policy_args=policy_args,
            cache=cache,
            cache_args=cache_args,
            **fields,
        )
        self.config = self.settings.config
        self.policy = self.settings.policy
        self.cache = self.settings.cache
        self.signal_spec = parse_needs(self.policy.needs, owner=f"policy {self.policy.key}")
        refine = self.policy.refine_steps
        if not isinstance(refine, int) or refine < 0:
            raise ValueError(
                f"policy {self.policy.key}: refine_steps must be an int ≥ 0, got {refine!r}"
            )
        self.step_budget = self.config.max_steps_per_block or self.policy.step_budget(
            self.config.block_length
        )
        grid = getattr(model, "attention", None)
        size = getattr(grid, "block_size", None)
        bl = self.config.block_length
        # a divisor of the attention block: sub-blocks (Fast-dLLM v2 decodes its blocks of
        # 32 as sub-blocks of 8), aligned to the model's grid like whole blocks
        if size is not None and bl % size and size % bl:
            raise ValueError(
                f"block_length={bl} is not a multiple of the block size "
                f"{size} of the block-causal model {type(model).__name__}, nor a divisor of it "
                f"(sub-blocks); use block_length={max(1, bl // size) * size}"
            )

    def block_layout(self, prompt_length: int) -> tuple[int, int, int]:
        """Where the decode's blocks lie for a padded prompt of ``prompt_length``.

        Full attention: ``num_blocks`` blocks of ``block_length`` right after the prompt.
        Block-causal model (block size ``m``): blocks aligned to the model's grid, as
        SDAR's ``block_diffusion_generate`` does: the first starts at the attention block
        holding the prompt's end (``⌊P / m⌋ · m``), so a partial last prompt block is
        decoded together with the first generated positions (its prompt tokens stay
        fixed), and the last block ends on the grid; the buffer may hold up to
        ``block_length − 1`` positions past ``P + gen_length``, which the result drops.
        A ``block_length`` that divides ``m`` decodes each attention block as sub-blocks
        of ``block_length`` (Fast-dLLM v2's ``batch_sample``), on the same grid: a
        sub-block holding only prompt tokens is skipped, every forward still runs the
        whole attention block (its later sub-blocks as mask tokens).

        Args:
            prompt_length: ``P``.

        Returns:
            ``(first_start, num_blocks, total_length)``.
        """
        cfg = self.config
        grid = getattr(self.model, "attention", None)
        if grid is None or grid.block_size is None:
            return prompt_length, cfg.num_blocks, prompt_length + cfg.gen_length
        first = grid.block_grid_start(prompt_length)
        n = -(-(prompt_length + cfg.gen_length - first) // cfg.block_length)
        return first, n, first + n * cfg.block_length

    # -- the loop's stages (FastDecoder overrides these, not the loop) ---------------
    def _begin(self, ids: torch.Tensor, am: torch.Tensor | None) -> DecodeRun:
        """Allocate the decode's state: sequence, key mask, positions, cache buffers,
        the block history and the policy's tensors."""
        cfg, model = self.config, self.model
        bsz, p = ids.shape
        total = self.block_layout(p)[2]
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
        ctx = CacheContext(
            model=ForwardCounter(model, full_am, total, bsz),
            attention_mask=full_am,
            position_ids=positions,
            refresh_flag=torch.zeros((), dtype=torch.bool, device=dev),
        )
        self.cache.setup(ctx, bsz, total)
        return DecodeRun(
            x=x,
            ctx=ctx,
            prompt_length=p,
            nfe_row=torch.zeros(bsz, dtype=torch.long, device=dev),
            eos=torch.tensor(model.eos_token_ids or (-1,), device=dev),
            history=History.empty(bsz, cfg.block_length, dev),
            policy_state=self._policy_state(bsz, dev),
            x_before=torch.empty_like(x),
            x_written=torch.zeros((), dtype=torch.bool, device=dev),
            own_row=torch.zeros(bsz, dtype=torch.long, device=dev),
        )

    def _policy_state(self, bsz: int, dev: torch.device) -> dict[str, torch.Tensor]:
        state = self.policy.make_state(bsz, self.config.block_length, self.model.vocab_size, dev)
        if not isinstance(state, dict) or not all(
            isinstance(t, torch.Tensor) for t in state.values()
        ):
            raise PolicyContractError(
                f"policy {self.policy.key}: make_state must return a dict of tensors, got "
                f"{type(state).__name__}"
            )
        return state

    def _begin_block(self, run: DecodeRun, bs: int, be: int) -> None:
        """Reset the block's history and the policy's tensors (in place)."""
        masked = run.x[:, bs:be] == self.model.mask_token_id  # (B, L)
        run.history.reset(masked)
        self.policy.reset_state(run.policy_state, masked)

    def _cache_call(self, run: DecodeRun, refresh: bool, bs: int, be: int) -> torch.Tensor:
        """The cache's refresh or step, with the read-only check of ``x`` around it."""
        run.x_before.copy_(run.x)
        run.ctx.refresh_flag.zero_()
        call = self.cache.refresh if refresh else self.cache.step
        # a block-causal shifted model's first block may start at 0, whose logit no row
        # predicts; the cache is asked from position `lo`, and the leading rows copy the
        # first one, as batch_sample does (they are prompt tokens: P ≥ shift, never masked)
        lo = max(bs, self.model.logits_shift)
        logits = call(run.ctx, run.x, lo, be)  # (B, L - (lo - bs), V)
        run.x_written.copy_((run.x != run.x_before).any())
        self._check_logits(logits, run.x.shape[0], be - lo, "refresh" if refresh else "step")
        if lo > bs:
            logits = torch.cat([logits[:, :1].expand(-1, lo - bs, -1), logits], 1)  # (B, L, V)
        return logits

    def _greedy_block_head(self, run: DecodeRun, b: int, bs: int, nfe: int) -> torch.Tensor:
        """Commit position ``bs`` (the first of an attention block) to the argmax of its
        logit, the previous attention block's last row, in one forward of its own: what a
        model with ``block_head_greedy`` asks for (Fast-dLLM v2's ``batch_sample``).

        Its forward and positions are counted with the block's first step (the ``block``
        cache fuses it with the write of the finished block's K/V).

        Returns:
            ``(B,)`` long, 1 where a row's position ``bs`` was committed.
        """
        run.ctx.step = CacheStep(
            block_index=b,
            step=0,
            forward_index=nfe,
            block_start=bs,
            block_end=bs + 1,
            refresh_requested=False,
            last_commit=None,
            last_edit=None,
            last_remask=None,
        )
        logits = self._cache_call(run, True, bs, bs + 1)[:, 0].clone()  # (B, V)
        mask_id = self.model.mask_token_id
        logits[:, mask_id] = float("-inf")  # never commit the mask token (as the signals)
        col = run.x[:, bs]  # (B,) view
        masked = col == mask_id  # (B,)
        col.copy_(torch.where(masked, logits.argmax(-1), col))
        return masked.long()

    def _check_logits(self, logits: Any, bsz: int, length: int, call: str) -> None:
        """The cache returned a ``(B, L, V)`` floating tensor on the model's device
        (host-side: shapes only, no sync)."""
        want = (bsz, length, self.model.vocab_size)
        if not isinstance(logits, torch.Tensor):
            raise CacheContractError(
                f"cache {self.cache.key}.{call} returned a {type(logits).__name__}; it must "
                f"return the active block's logits, a {want} (B, L, V) tensor"
            )
        if tuple(logits.shape) != want or not logits.is_floating_point():
            raise CacheContractError(
                f"cache {self.cache.key}.{call} returned logits of shape "
                f"{tuple(logits.shape)} {logits.dtype}; they must be {want} (B, L, V) floats: "
                f"one row per position of the active block"
            )
        dev, got = torch.device(self.model.device), logits.device
        if got.type != dev.type or (dev.index is not None and got.index != dev.index):
            raise CacheContractError(
                f"cache {self.cache.key}.{call} returned logits on {logits.device}, not on "
                f"the model's device {self.model.device}"
            )

    def _forward(self, run: DecodeRun, refresh: bool, bs: int, be: int) -> int:
        """One NFE: the cache's refresh or step; sets ``run.logits``.

        Returns:
            The token positions each row computed (``S``, from ``ctx.model``'s counter).
        """
        run.logits = self._cache_call(run, refresh, bs, be)
        return run.ctx.model.reset()[1]

    def _decide(self, masked: torch.Tensor, state: StepState) -> Decision:
        """Call the policy and check the shape of what it returned (host-side, no sync)."""
        policy = self.policy
        out = policy.select(state.signals.confidence, masked, state)
        dec = out if isinstance(out, Decision) else Decision(out)
        if (dec.edit is not None or dec.remask is not None) and not policy.revokes:
            raise PolicyContractError(
                f"policy {policy.key} returned edit/remask sets but does not declare "
                f"`revokes = True`; declare it (the Decoder then allows a larger step budget)"
            )
        for name in ("commit", "edit", "remask", "tokens"):
            t = getattr(dec, name)
            if t is None:
                continue
            want = torch.long if name == "tokens" else torch.bool
            if not isinstance(t, torch.Tensor) or t.shape != masked.shape or t.dtype != want:
                got = (
                    f"{tuple(t.shape)} {t.dtype}"
                    if isinstance(t, torch.Tensor)
                    else type(t).__name__
                )
                raise PolicyContractError(
                    f"policy {policy.key} returned {name} as {got}; it must be a "
                    f"{tuple(masked.shape)} {want} tensor (B, L) on {masked.device}"
                )
            if t.device != masked.device:
                raise PolicyContractError(
                    f"policy {policy.key} returned {name} on {t.device}, not {masked.device}"
                )
        return dec

    def _select(self, run: DecodeRun, bs: int, be: int, state: StepState) -> SelectOut:
        """Signals, the policy's decision, the update of ``run.x`` and the history, and the
        step's flags; tensor-only (the fast path captures it)."""
        cfg, mask_id, refine = self.config, self.model.mask_token_id, self.policy.refine_steps
        x, hist = run.x, run.history
        blk = x[:, bs:be]  # (B, L) view
        masked = blk == mask_id  # (B, L)
        had_mask = masked.any(-1)  # (B,)
        act = hist.active.clone()  # (B,) rows taking part in this step
        hist.post.add_(act & ~had_mask)
        run.nfe_row.add_(act)
        own = run.ctx.model.own_positions  # (B,) the forward's own positions per row
        run.own_row.add_(torch.where(act, own, 0))
        own.zero_()
        sig = compute_signals(
            run.logits,
            blk,
            mask_id,
            self.signal_spec,
            temperature=cfg.temperature,
            generator=run.generator,
            history=hist,
            owner=f"policy {self.policy.key}",
        )
        state = dataclasses.replace(
            state, signals=sig, policy_state=run.policy_state, block_start=bs
        )
        given = masked.clone()  # the policy's copy: a policy that writes it changes nothing
        dec = self._decide(given, state)
        rows = act.unsqueeze(-1)  # (B, 1): a finished row is never changed again
        dec = dec._replace(
            edit=None if dec.edit is None else dec.edit & rows,
            remask=None if dec.remask is None else dec.remask & rows,
        )
        app = apply_decision(dec, sig, masked, hist.editable, mask_id, run.logits.shape[-1])
        blk.copy_(app.block)
        hist.committed_at.copy_(
            torch.where(
                app.commit | app.edit, hist.step, torch.where(app.remask, -1, hist.committed_at)
            )
        )
        hist.revoked.add_(app.remask)
        hist.prev_confidence.copy_(sig.confidence)
        hist.prev_x0.copy_(sig.x0)
        hist.step.add_(1)
        if cfg.early_stop:
            _early_stop(x, run.prompt_length, mask_id, run.eos)
        has_mask = (x[:, bs:be] == mask_id).any(-1)  # (B,)
        changed = (app.edit | app.remask).any(-1)  # (B,)
        refining = (had_mask | changed) & (hist.post < refine)  # (B,) another post-step
        hist.active.copy_(act & (has_mask | refining))
        flags = torch.cat([app.flags, torch.zeros(3, dtype=torch.bool, device=masked.device)])
        flags[FLAGS.index("continue")] = hist.active.any()
        flags[FLAGS.index("masked_mutated")] = (given != masked).any()
        flags[FLAGS.index("cache_wrote_x")] = run.x_written
        flags[FLAGS.index("refresh_next")] = run.ctx.refresh_flag
        # NaN/inf anywhere in a row's logits makes its confidences NaN: one (B, L) check.
        flags[FLAGS.index("nonfinite")] = (~torch.isfinite(sig.confidence) & rows).any()
        return SelectOut(
            flags,
            app.commit.sum(-1),
            app.edit.sum(-1),
            app.remask.sum(-1),
            sig.confidence,
            masked,
            app.commit,
            app.tokens,
            app.edit,
            app.remask,
            act,
        )

    def _finish(self, run: DecodeRun) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The result's ``sequences`` and key mask (FastDecoder copies its static buffers)."""
        return run.x, run.ctx.attention_mask

    # -- the loop ---------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor | Sequence[Sequence[int] | torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        *,
        on_step: Callable[[TraceStep], None] | None = None,
    ) -> GenerationResult:
        """Decode a batch of prompts.

        Args:
            prompt_ids: ``(B, P)`` long tensor, or a list of prompts of different lengths
                (left-padded here with the model's pad id), or a list of
                [`MultimodalPrompt`][dlm_decode.interfaces.MultimodalPrompt] (text ids and
                images), which the model embeds once through
                [`embed_prompt`][dlm_decode.interfaces.Model.embed_prompt].
            attention_mask: ``(B, P)`` mask for an already left-padded tensor.
            on_step: called after every step with its
                [`TraceStep`][dlm_decode.decoder.TraceStep] (a live view); ``None``, the
                default, costs nothing. It observes only: the decode is the same.

        Returns:
            A [`GenerationResult`][dlm_decode.decoder.GenerationResult].
        """
        cfg, model, policy = self.config, self.model, self.policy
        t0 = time.perf_counter()
        ids, am, embeds = _prompt_input(model, prompt_ids, attention_mask)
        check_prompt_ids(ids, am, model.vocab_size, model.mask_token_id)
        bsz, p = ids.shape
        first, n_blocks, total = self.block_layout(p)
        if total > model.max_length:
            raise ValueError(
                f"prompt length {p} + gen_length {cfg.gen_length} = {total} exceeds the "
                f"model's max length {model.max_length}; shorten the prompt or gen_length"
            )
        if p < model.logits_shift:
            raise ValueError("a shifted-logits model needs a prompt of at least one token")
        # before any buffer is allocated
        check_memory(model, bsz, total, self.cache, logits_length=cfg.block_length + 1)
        kind = None if embeds is None else tuple(embeds.shape)
        if kind != getattr(self, "_prompt_kind", None) and hasattr(self, "release"):
            self.release()  # a FastDecoder's graphs read the prompt embeddings (or not)
        self._prompt_kind = kind
        run = self._begin(ids, am)
        _attach_prompt_embeds(run, embeds)
        dev = model.device
        if cfg.temperature > 0 or "uniform" in self.signal_spec:
            run.generator = torch.Generator(device=dev)
            run.generator.manual_seed(cfg.seed)
        sync = torch.cuda.synchronize if dev.type == "cuda" and cfg.profile else (lambda: None)

        nfe = 0
        counts: list[torch.Tensor] = []
        edits: list[torch.Tensor] = []
        remasks: list[torch.Tensor] = []
        step_blocks: list[int] = []
        positions: list[int] = []  # token positions each row computed, per step
        trace = (
            Trace(policy=self.settings.policy_ref.label, block_length=cfg.block_length)
            if cfg.trace
            else None
        )
        watch = trace is not None or on_step is not None  # per-step records wanted
        t_fwd = t_sel = 0.0
        bl, budget, cache = cfg.block_length, self.step_budget, self.cache
        requested = False
        if run.x.shape[1] != total:
            raise ValueError(
                f"{type(self).__name__} allocated {run.x.shape[1]} positions, but the "
                f"block-causal model needs {total} (blocks aligned to its grid); use Decoder"
            )
        grid_size = getattr(getattr(model, "attention", None), "block_size", None)
        head_greedy = bool(getattr(model, "block_head_greedy", False)) and grid_size is not None
        for b in range(n_blocks):
            bs, be = first + b * bl, first + (b + 1) * bl
            head = None
            if (
                head_greedy
                and bs % grid_size == 0
                and bs >= model.logits_shift
                and bool((run.x[:, bs] == model.mask_token_id).any())
            ):
                head = self._greedy_block_head(run, b, bs, nfe)
            m0 = (run.x[:, bs:be] == model.mask_token_id).sum(-1)  # (B,)
            if not bool(m0.any()):  # rows finished by early stop
                if head is not None:  # the head's forward, with no step to count it
                    run.ctx.model.reset()
                    nfe += max(1, run.ctx.model.last_forwards)
                continue
            self._begin_block(run, bs, be)
            step = 0
            last: SelectOut | None = None
            while True:
                if step >= budget:
                    raise PolicyContractError(
                        f"block {b} did not finish within the step budget of {budget} steps "
                        f"(max_steps_per_block) under policy {policy.key}, which keeps "
                        f"revoking or editing; raise max_steps_per_block or make the rule "
                        f"revoke less"
                    )
                run.ctx.step = CacheStep(
                    block_index=b,
                    step=step,
                    forward_index=nfe,
                    block_start=bs,
                    block_end=be,
                    refresh_requested=requested,
                    last_commit=None if last is None else last.commit,
                    last_edit=None if last is None else last.edit,
                    last_remask=None if last is None else last.remask,
                )
                refresh = (
                    step == 0
                    or cache.wants_refresh(run.ctx)
                    or (requested and cache.refresh_on_request)
                )
                ta = time.perf_counter()
                positions.append(self._forward(run, refresh, bs, be))
                sync()
                tb = time.perf_counter()
                nfe += max(1, getattr(run.ctx.model, "last_forwards", 1))
                state = StepState(
                    step=step,
                    block_index=b,
                    num_blocks=n_blocks,
                    steps_per_block=cfg.steps_per_block,
                    block_masked_at_start=m0,
                    block_start=bs,
                )
                if watch:  # what the step starts from (the signals are recomputed from it)
                    before = run.x[:, bs:be].clone()  # (B, L)
                    rng = None if run.generator is None else run.generator.get_state()
                out = self._select(run, bs, be, state)
                if watch:
                    sig = _trace_signals(run.logits, before, model, self.signal_spec, cfg, rng)
                    after = run.x[:, bs:be]
                    rec = _trace_step(
                        b, step, bs, out, before, after, model.mask_token_id, sig, policy
                    )
                    if trace is not None:
                        trace.append(rec)
                    if on_step is not None:
                        on_step(rec)
                counts.append(out.count if head is None or step else out.count + head)
                edits.append(out.edits)
                remasks.append(out.remasks)
                step_blocks.append(b)
                flags = dict(zip(FLAGS, out.flags.tolist(), strict=True))  # the one host sync
                sync()
                t_sel += time.perf_counter() - tb
                t_fwd += tb - ta
                if flags["cache_wrote_x"]:
                    raise CacheContractError(
                        f"cache {cache.key} wrote the sequence x (block {b}, step {step}); a "
                        f"cache reads x and returns logits, the Decoder alone writes tokens"
                    )
                if flags["nonfinite"]:
                    raise NonFiniteLogitsError(
                        f"the logits of block {b}, step {step} hold NaN or inf (model "
                        f"{type(model).__name__}, cache {cache.key}); check the checkpoint's "
                        f"weights (load_model checks them unless check_weights=False) and the "
                        f"cache's forward"
                    )
                _raise_for_flags(flags, policy.key, b, step)
                requested = flags["refresh_next"]
                last = out
                if not flags["continue"]:
                    break
                step += 1
        timings = {"total_s": time.perf_counter() - t0}
        if cfg.profile or dev.type == "cpu":
            timings.update(forward_s=t_fwd, select_s=t_sel)
        sequences, full_am = self._finish(run)
        if total > p + cfg.gen_length:  # a block-causal grid's tail past gen_length
            sequences = sequences[:, : p + cfg.gen_length]
            full_am = None if full_am is None else full_am[:, : p + cfg.gen_length]
            total = p + cfg.gen_length
        per_step = torch.tensor(positions, dtype=torch.long)  # (steps,)
        return GenerationResult(
            sequences=sequences,
            prompt_length=p,
            attention_mask=full_am
            if full_am is not None
            else torch.ones((bsz, total), dtype=torch.bool, device=dev),
            nfe=nfe,
            nfe_per_row=run.nfe_row.cpu(),
            commit_counts=_stack(counts, bsz),
            step_blocks=torch.tensor(step_blocks, dtype=torch.long),
            timings=timings,
            config=cfg,
            trace=trace,
            eos_token_ids=tuple(model.eos_token_ids),
            edit_counts=_stack(edits, bsz),
            remask_counts=_stack(remasks, bsz),
            token_forwards=int(per_step.sum()) * bsz,
            token_forwards_per_row=run.own_row.cpu().clone(),
            token_forwards_per_step=per_step,
        )


class Applied(NamedTuple):
    """A decision applied to the active block (see
    [`apply_decision`][dlm_decode.decoder.apply_decision])."""

    block: torch.Tensor
    """``(B, L)`` long, the block after the step."""
    commit: torch.Tensor
    """``(B, L)`` bool, masked positions filled."""
    edit: torch.Tensor
    """``(B, L)`` bool, committed positions whose token changed."""
    remask: torch.Tensor
    """``(B, L)`` bool, committed positions turned back into the mask."""
    tokens: torch.Tensor
    """``(B, L)`` long, the tokens written at ``commit`` and ``edit`` positions."""
    flags: torch.Tensor
    """``(8,)`` bool: the first eight of [`FLAGS`][dlm_decode.decoder.FLAGS] (``continue``
    and ``masked_mutated`` left false: the caller sets them)."""


def apply_decision(
    dec: Decision,
    signals: Any,
    masked: torch.Tensor,
    editable: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
) -> Applied:
    """Apply a policy's decision to the block and check it against the contract
    (tensor-only, no host sync; the Decoder and
    [`check_policy`][dlm_decode.testing.check_policy] share it).

    Args:
        dec: the decision (``commit`` at least).
        signals: the step's [`StepSignals`][dlm_decode.signals.StepSignals] (``x0``,
            ``block``).
        masked: ``(B, L)`` bool, the block's masked positions before the step.
        editable: ``(B, L)`` bool, positions committed earlier in this block.
        mask_token_id: the mask id.
        vocab_size: ``V`` (written tokens must lie in ``[0, V)``).

    Returns:
        The [`Applied`][dlm_decode.decoder.Applied] step.
    """
    blk = signals.block
    none = torch.zeros_like(masked)
    commit = dec.commit
    edit = dec.edit if dec.edit is not None else none
    remask = dec.remask if dec.remask is not None else none
    tokens = dec.tokens if dec.tokens is not None else signals.x0  # (B, L)
    take = commit & masked
    ed = edit & editable & (tokens != blk)  # edits that change a token
    rm = remask & editable
    has_mask = masked.any(-1)  # (B,)
    written = take | ed
    bad_tok = (tokens < 0) | (tokens >= vocab_size) | (tokens == mask_token_id)
    false = torch.zeros((), dtype=torch.bool, device=masked.device)
    flags = torch.stack(
        [
            (commit & ~masked).any(),
            (has_mask & ~(take.any(-1) | ed.any(-1) | rm.any(-1))).any(),
            false,
            ((edit | remask) & ~editable).any(),
            ((commit & edit) | (commit & remask) | (edit & remask)).any(),
            (written & bad_tok).any(),
            false,
            ed.any() | rm.any(),
        ]
    )  # (8,)
    new = torch.where(written, tokens, blk)
    new = torch.where(rm, torch.full_like(new, mask_token_id), new)
    return Applied(new, take, ed, rm, tokens, flags)


def _stack(rows: list[torch.Tensor], bsz: int) -> torch.Tensor:
    return torch.stack(rows).cpu() if rows else torch.zeros((0, bsz), dtype=torch.long)


def _raise_for_flags(flags: dict[str, bool], key: str, block: int, step: int) -> None:
    """Turn a step's contract flags into a
    [`PolicyContractError`][dlm_decode.decoder.PolicyContractError]."""
    where = f"(block {block}, step {step})"
    if flags["masked_mutated"]:
        raise PolicyContractError(
            f"policy {key} wrote into its `masked` argument {where}; treat it as read only"
        )
    if flags["committed_unmasked"]:
        raise PolicyContractError(
            f"policy {key} committed a position that is not masked {where}; select() must "
            f"return commit & masked (use a Decision's edit set to change committed tokens)"
        )
    if flags["revoked_uneditable"]:
        raise PolicyContractError(
            f"policy {key} edited or remasked a position that was not committed earlier in "
            f"this block {where}; only history.editable positions may be revoked"
        )
    if flags["sets_overlap"]:
        raise PolicyContractError(
            f"policy {key} put a position in more than one of commit, edit and remask "
            f"{where}; the three sets must be disjoint"
        )
    if flags["bad_tokens"]:
        raise PolicyContractError(
            f"policy {key} wrote the mask token or an id outside the vocabulary {where}"
        )
    if flags["no_progress"]:
        raise PolicyContractError(
            f"policy {key} committed nothing in a row that still has masked positions "
            f"{where}; it must commit at least one per such row"
        )


#: Signals a trace records when the policy declared them (``logits`` is too large to keep,
#: ``history`` is the trace itself).
_TRACED_SIGNALS = frozenset({"current", "entropy", "top2", "topk", "uniform"})


def _trace_signals(
    logits: torch.Tensor,
    before: torch.Tensor,
    model: Model,
    spec: SignalSpec,
    config: DecodeConfig,
    rng: torch.Tensor | None,
) -> StepSignals | None:
    """The step's proposals and declared signals again, for a trace (the decode's own
    generator is never touched: a copy replays its state from before the step).

    Args:
        logits: ``(B, L, V)`` the step's logits.
        before: ``(B, L)`` long, the block before the step.
        model: the model (its mask id).
        spec: the policy's declared signals.
        config: the decode config (its temperature).
        rng: the decode generator's state before the step, or ``None`` without one.

    Returns:
        The signals, or ``None`` when the generator state cannot be replayed.
    """
    gen = None
    if rng is not None:
        try:
            gen = torch.Generator(device=logits.device)
            gen.set_state(rng)
        except RuntimeError:
            return None
    names = spec.names & _TRACED_SIGNALS
    return compute_signals(
        logits,
        before,
        model.mask_token_id,
        SignalSpec(names, spec.topk if "topk" in names else 0),
        temperature=config.temperature,
        generator=gen,
    )


def _trace_step(
    block: int,
    step: int,
    block_start: int,
    out: SelectOut,
    before: torch.Tensor,
    after: torch.Tensor,
    mask_token_id: int,
    signals: StepSignals | None = None,
    policy: Any = None,
) -> TraceStep:
    """A step's [`TraceStep`][dlm_decode.decoder.TraceStep] (host copies, one per row).

    Args:
        block: block index.
        step: step index within the block.
        block_start: absolute position of the block's first position.
        out: the step's select outputs.
        before: ``(B, L)`` long, the block before the step.
        after: ``(B, L)`` long, the block after the step.
        mask_token_id: the mask id.
        signals: the recomputed signals (``None``: the proposals are ``out.x0``).
        policy: the policy (its ``criterion``, when it has one, is evaluated on each row's
            sorted profile).
    """
    x0 = out.x0 if signals is None else signals.x0  # (B, L)
    host = [
        t.cpu() for t in (before, after, out.masked, out.conf, x0, out.commit, out.edit, out.remask)
    ]
    before_c, after_c, masked_c, conf_c, x0_c, commit_c, edit_c, remask_c = host
    written_c = out.x0.cpu()
    code = torch.zeros(before_c.shape, dtype=torch.long)  # (B, L) 0: none
    code[after_c != before_c] = 4  # changed, not by the decision: early stop's EOS fill
    code[remask_c] = 3
    code[edit_c] = 2
    code[commit_c] = 1
    names = ("none", "commit", "edit", "remask", "fill")
    actions = [[names[c] for c in row] for row in code.tolist()]

    def ids(t: torch.Tensor) -> list[list[int | None]]:
        return [[None if v == mask_token_id else v for v in row] for row in t.tolist()]

    writes = commit_c | edit_c  # (B, L)
    written = [
        [w if k else None for w, k in zip(wr, kr, strict=True)]
        for wr, kr in zip(written_c.tolist(), writes.tolist(), strict=True)
    ]
    extra: dict[str, list[list[Any]]] = {}
    if signals is not None:
        for name in ("current", "entropy", "top2", "uniform"):
            if name in signals.declared:
                extra[name] = getattr(signals, name).float().cpu().tolist()
        if "topk" in signals.declared:
            probs = signals.topk_probs.float().cpu().tolist()  # (B, L, K)
            tops = signals.topk_ids.cpu().tolist()
            extra["topk"] = [
                [
                    [[i, p] for i, p in zip(ip, pp, strict=True)]
                    for ip, pp in zip(ir, pr, strict=True)
                ]
                for ir, pr in zip(tops, probs, strict=True)
            ]
    criteria: list[dict[str, Any] | None] = []
    crit = getattr(policy, "criterion", None)
    for r in range(conf_c.shape[0]):
        prof = conf_c[r][masked_c[r]].sort(descending=True).values  # (m,)
        c = crit(prof) if callable(crit) and prof.numel() else None
        criteria.append(
            None
            if c is None
            else {
                "name": c.name,
                "values": [float(v) for v in c.values.flatten()],
                "bound": float(c.bound),
                "bound_name": c.bound_name,
                "passes": c.passes,
            }
        )
    return TraceStep(
        block=block,
        step=step,
        block_start=block_start,
        before=ids(before_c),
        after=ids(after_c),
        proposals=x0_c.tolist(),
        confidences=conf_c.float().tolist(),
        actions=actions,
        written=written,
        signals=extra,
        active=out.active.cpu().tolist(),
        criteria=criteria,
    )


def generate(
    model: Model,
    prompt_ids: torch.Tensor | Sequence[Sequence[int] | torch.Tensor],
    *,
    policy: PolicyLike | None = None,
    policy_args: dict[str, Any] | None = None,
    cache: CacheLike | None = None,
    cache_args: dict[str, Any] | None = None,
    attention_mask: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
    **fields: Any,
) -> GenerationResult:
    """Decode prompts with a commit policy and a KV cache.

    Args:
        model: a loaded [`Model`][dlm_decode.interfaces.Model] (see ``load_model``).
        prompt_ids: ``(B, P)`` long tensor, or a list of prompts of different lengths.
        policy: the commit policy: a name (``frechet``, ``threshold``, ``factor``,
            ``fixed``, a plugin's), ``"name:k=v"``, a
            [`PolicyRef`][dlm_decode.config.PolicyRef] or a ready object; default
            ``config.policy``.
        policy_args: the named policy's params; empty or ``None`` means its defaults.
        cache: ``none``, ``prefix``, ``dual``, a plugin's name, a
            [`CacheRef`][dlm_decode.config.CacheRef] or a ready object.
        cache_args: the named cache's params.
        attention_mask: ``(B, P)`` mask when ``prompt_ids`` is already left-padded.
        config: a [`DecodeConfig`][dlm_decode.config.DecodeConfig]; the other keyword
            arguments override its fields.
        **fields: other ``DecodeConfig`` fields: ``gen_length`` (default 256),
            ``block_length`` (32), ``steps`` (required by ``fixed``), ``temperature``,
            ``seed``, ``early_stop``, ``trace``, ``profile``.

    Returns:
        A [`GenerationResult`][dlm_decode.decoder.GenerationResult].

    Examples:
        >>> import dlm_decode
        >>> model = dlm_decode.load_model("tiny")
        >>> ids = model.tokenizer("copy: jigiuroujgttdoky\\n")["input_ids"]
        >>> out = dlm_decode.generate(model, [ids], policy="threshold", gen_length=32,
        ...                           block_length=16)
        >>> out.config.policy, out.texts(model.tokenizer)[0], out.nfe
        ('threshold.v1', 'jigiuroujgttdoky', 2)
    """
    dec = Decoder(
        model,
        config,
        policy=policy,
        policy_args=policy_args,
        cache=cache,
        cache_args=cache_args,
        **fields,
    )
    return dec.generate(prompt_ids, attention_mask=attention_mask)
