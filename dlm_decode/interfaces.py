"""The three plugin interfaces: [`Model`][dlm_decode.interfaces.Model],
[`Cache`][dlm_decode.interfaces.Cache] and [`CommitPolicy`][dlm_decode.interfaces.CommitPolicy].

Everything the Decoder composes is one of these. Plugins subclass them and register the
subclass through a hook in [`dlm_decode.hookspecs`][dlm_decode.hookspecs].

Shapes used throughout (written once here, as transformers does for its logits processors):

* ``B`` — batch size (rows);
* ``T`` — total sequence length, prompt plus generation;
* ``S`` — length of the span a forward pass recomputes;
* ``L`` — length of the active block (``block_length``);
* ``V`` — vocabulary size.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict

from dlm_decode.frechet import commit_top_n, sorted_profile
from dlm_decode.signals import Decision, StepSignals

__all__ = [
    "FULL_ATTENTION",
    "IMAGE_PLACEHOLDER",
    "AttentionPattern",
    "Cache",
    "CacheContext",
    "CacheStep",
    "CommitPolicy",
    "CountPolicy",
    "ForwardCounter",
    "KVBuffer",
    "Model",
    "MultimodalPrompt",
    "NoParams",
    "ProfileCriterion",
    "PromptEmbedding",
    "StepState",
]


class NoParams(BaseModel):
    """Params model for plugins that take no parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------
# Commit policies
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepState:
    """What a policy may know about the step besides the confidences.

    The first five fields are contract v1 (positional, unchanged); the rest are v2.

    Attributes:
        step: index of this denoising step within the active block (0 at block start).
        block_index: index of the active block.
        num_blocks: number of blocks in the generation.
        steps_per_block: steps the decode config allots per block (``steps // num_blocks``),
            or ``None`` when the config sets no step budget.
        block_masked_at_start: ``(B,)`` long tensor, masked positions in each row's block
            when the block started (LLaDA's schedule divides this count over the steps).
        signals: the step's [`StepSignals`][dlm_decode.signals.StepSignals] (contract v2):
            the proposals, their confidence and every signal the policy declared in
            ``needs``; ``None`` when a v1 caller builds the state by hand.
        policy_state: the tensors the policy's
            [`make_state`][dlm_decode.interfaces.CommitPolicy.make_state] allocated (updated
            in place by the policy), or ``None``.
        block_start: absolute position of the block's first position.
    """

    step: int
    block_index: int
    num_blocks: int
    steps_per_block: int | None
    block_masked_at_start: torch.Tensor
    signals: StepSignals | None = None
    policy_state: dict[str, torch.Tensor] | None = None
    block_start: int = 0


class CommitPolicy(ABC):
    """Chooses which masked positions of the active block to commit this step (and, in
    contract v2, which committed ones to edit or remask).

    Contract (checked for every registered policy by
    [`check_policy`][dlm_decode.testing.check_policy]):

    * tensors in, a bool tensor out, on the same device; no Python loop over rows and no
      host sync (``.item()``, ``.tolist()``) inside
      [`select`][dlm_decode.interfaces.CommitPolicy.select];
    * commits only positions where ``masked`` is true;
    * commits at least one position in every row that still has a masked position, and
      none in a row that has none.

    Subclasses set ``name``, ``version`` and ``Params`` (a pydantic model with
    ``extra="forbid"``), and implement [`select`][dlm_decode.interfaces.CommitPolicy.select].

    Contract v2 adds, all optional and backward compatible:

    * [`needs`][dlm_decode.interfaces.CommitPolicy.needs]: the signals the policy reads
      from ``state.signals`` (entropy, top-2, top-k, logits, history, …);
    * [`make_state`][dlm_decode.interfaces.CommitPolicy.make_state] /
      [`reset_state`][dlm_decode.interfaces.CommitPolicy.reset_state]: tensors the policy
      owns and updates in place every step (a running credit, the previous distribution);
    * a [`Decision`][dlm_decode.signals.Decision] as the return value, with ``edit`` and
      ``remask`` sets when the class declares
      [`revokes`][dlm_decode.interfaces.CommitPolicy.revokes];
    * [`refine_steps`][dlm_decode.interfaces.CommitPolicy.refine_steps] and
      [`step_budget`][dlm_decode.interfaces.CommitPolicy.step_budget]: how long a block may
      run.
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1
    Params: ClassVar[type[BaseModel]] = NoParams
    requires: ClassVar[tuple[str, ...]] = ()
    """Decode-config fields the policy needs (``fixed`` needs ``steps``)."""
    capturable: ClassVar[bool] = False
    """Capability: ``select`` may be captured in a CUDA graph and replayed. Declare it only
    when ``select`` reads nothing but its tensor inputs, its tensor state and fixed params
    (no Python step state such as ``state.step``, no allocation that depends on values);
    the fast path then captures the whole select stage, signals included. Subclasses
    inherit it: a subclass that adds Python state sets it back to ``False``."""
    needs: ClassVar[tuple[str, ...]] = ()
    """Signals ``select`` reads from ``state.signals`` besides ``x0`` and ``confidence``:
    ``current``, ``entropy``, ``top2``, ``topk:K``, ``logits``, ``uniform``, ``history``
    (see [`dlm_decode.signals`][dlm_decode.signals]). Only these are computed. A policy
    whose needs depend on its params overrides this with a property."""
    revokes: ClassVar[bool] = False
    """Capability: ``select`` may return a [`Decision`][dlm_decode.signals.Decision] with
    ``edit`` or ``remask`` sets (positions committed earlier in the block). The default step
    budget is then larger, and a row may make progress by revoking instead of committing."""
    refine_steps: int = 0
    """Steps a block may keep running after its last mask is filled, while the policy keeps
    editing (LLaDA 2.1's post-steps): after the block fills, each further step runs only if
    the step before changed something, at most this many. 0: the block ends when it fills."""

    def __init__(self, params: BaseModel | None = None) -> None:
        self.params = params if params is not None else self.Params()

    @property
    def key(self) -> str:
        """Versioned registry name, e.g. ``"frechet.v1"``."""
        return f"{self.name}.v{self.version}"

    def make_state(
        self, batch_size: int, block_length: int, vocab_size: int, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Allocate the tensors this policy keeps across steps (once per decode shape).

        The Decoder hands them back in ``state.policy_state`` every step; ``select`` updates
        them in place (so a captured graph keeps working). Only tensors: no Python state.

        Args:
            batch_size: ``B``.
            block_length: ``L``.
            vocab_size: ``V``.
            device: where the decode runs.

        Returns:
            Name → tensor; the default is none.
        """
        return {}

    def reset_state(self, state: dict[str, torch.Tensor], masked: torch.Tensor) -> None:
        """Reset the policy's tensors at the start of each block (default: zero them).

        Args:
            state: what [`make_state`][dlm_decode.interfaces.CommitPolicy.make_state]
                returned.
            masked: ``(B, L)`` bool, the new block's masked positions.
        """
        for t in state.values():
            t.zero_()

    def step_budget(self, block_length: int) -> int:
        """The default ``max_steps_per_block``: ``block_length`` (every step commits at least
        one position), or ``4 × block_length`` for a policy that
        [`revokes`][dlm_decode.interfaces.CommitPolicy.revokes]; plus ``refine_steps``."""
        base = 4 * block_length if self.revokes else block_length
        return base + self.refine_steps

    @classmethod
    def params_for_margin(cls, margin: float) -> dict[str, Any] | None:
        """The parameters at which this rule demands a margin ``δ`` (for matched sweeps).

        Fast-dLLM++ compares rules at matched strictness: ``frechet`` with margin ``δ``
        beside ``factor`` with ``f = 1 − δ``. A policy that has such a parameter says how
        to set it; the default ``None`` means the policy cannot be matched.

        Args:
            margin: ``δ`` in ``[0, 1)``.
        """
        return None

    @abstractmethod
    def select(
        self, confidence: torch.Tensor, masked: torch.Tensor, state: StepState
    ) -> torch.Tensor | Decision:
        """Choose the positions to commit (and, for a revoking policy, to edit or remask).

        Args:
            confidence: ``(B, L)`` float32 or float64, probability of each proposed token;
                a v1 policy ignores the values at unmasked positions.
            masked: ``(B, L)`` bool, true where the position is still masked (read only).
            state: step information (see [`StepState`][dlm_decode.interfaces.StepState]),
                with ``state.signals`` in contract v2.

        Returns:
            ``(B, L)`` bool commit mask on the same device, or a
            [`Decision`][dlm_decode.signals.Decision].
        """

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump().items())
        return f"{type(self).__name__}[{self.key}]({args})"


class ProfileCriterion(NamedTuple):
    """What a count rule compares along the sorted confidence profile, for plots, traces
    and the trace viewer: the rule commits the prefix sizes ``n`` whose value passes the
    bound.

    Attributes:
        name: what ``values`` is, e.g. ``"G_n (Fréchet score)"``.
        values: ``(..., L)`` one value per prefix size (index ``n - 1``).
        bound: the parameter it is compared with.
        bound_name: the parameter's symbol, e.g. ``"δ"``.
        passes: ``"above"`` (``value > bound``), ``"at_least"`` (``≥``) or ``"below"``
            (``<``).
    """

    name: str
    values: torch.Tensor
    bound: float
    bound_name: str
    passes: str

    def passing(self) -> torch.Tensor:
        """``(..., L)`` bool, where the value passes the bound."""
        if self.passes == "above":
            return self.values > self.bound
        if self.passes == "at_least":
            return self.values >= self.bound
        if self.passes == "below":
            return self.values < self.bound
        raise ValueError(f"passes must be 'above', 'at_least' or 'below', got {self.passes!r}")


class CountPolicy(CommitPolicy):
    """A policy that commits the ``n`` most confident masked positions of each row.

    Subclasses implement [`commit_count`][dlm_decode.interfaces.CountPolicy.commit_count] on the
    sorted confidence profile; this class
    sorts, clamps the count to ``[1, masked count]`` and builds the mask. The same
    [`commit_count`][dlm_decode.interfaces.CountPolicy.commit_count] serves counterfactual traces
    ("how many would each rule commit?").
    """

    @abstractmethod
    def commit_count(
        self, sorted_conf: torch.Tensor, valid: torch.Tensor, state: StepState
    ) -> torch.Tensor:
        """How many of the top positions to commit, per row.

        Args:
            sorted_conf: ``(B, L)`` confidences of masked positions sorted descending;
                entries past a row's masked count are 0 and must be ignored.
            valid: ``(B, L)`` bool, true for the first ``m_b`` entries of row ``b`` where
                ``m_b`` is the row's masked count.
            state: step information.

        Returns:
            ``(B,)`` long count; the caller clamps it to ``[1, m_b]`` (0 where ``m_b = 0``).
        """

    def select(
        self, confidence: torch.Tensor, masked: torch.Tensor, state: StepState
    ) -> torch.Tensor:
        sorted_conf, valid, order = sorted_profile(confidence, masked)
        n = self.commit_count(sorted_conf, valid, state)
        return commit_top_n(n, masked, order)

    def criterion(self, sorted_conf: torch.Tensor) -> ProfileCriterion | None:
        """What the rule compares along a sorted profile (``None``: nothing to draw, e.g. a
        fixed schedule). Used by plots and traces, never by
        [`select`][dlm_decode.interfaces.CommitPolicy.select].

        Args:
            sorted_conf: ``(..., L)`` confidences sorted descending.
        """
        return None

    def counts(
        self, confidence: torch.Tensor, masked: torch.Tensor, state: StepState
    ) -> torch.Tensor:
        """``(B,)`` number of positions [`select`][dlm_decode.interfaces.CommitPolicy.select] would
        commit, without the mask."""
        sorted_conf, valid, _ = sorted_profile(confidence, masked)
        m = valid.sum(-1)
        n = self.commit_count(sorted_conf, valid, state)
        return torch.minimum(torch.clamp(n, min=1), m)


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionPattern:
    """Which keys a query may attend to: a property of the model.

    * full bidirectional attention (``block_size=None``, LLaDA, Dream, the tiny model);
    * block-causal attention (SDAR, Fast-dLLM v2, LLaDA2): the sequence is cut into blocks
      of ``block_size`` positions at absolute multiples of ``block_size`` (slot ``i`` of the
      decode buffer lies in block ``i // block_size``, as the references number them); a
      query attends to every key of its own block and of all earlier blocks. The K/V of a
      finished block therefore never change, and can be cached exactly (the
      [`block`][dlm_decode.caches.block.BlockCache] cache).

    Attributes:
        block_size: positions per attention block, or ``None`` for full attention.
    """

    block_size: int | None = None

    def __post_init__(self) -> None:
        b = self.block_size
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ValueError(f"AttentionPattern.block_size must be None or an int ≥ 1, got {b!r}")

    @property
    def block_causal(self) -> bool:
        """Whether attention is block-causal (``block_size`` is set)."""
        return self.block_size is not None

    def block_grid_start(self, position: int) -> int:
        """The first position of the attention block holding ``position`` (``position``
        itself under full attention)."""
        if self.block_size is None:
            return position
        return position // self.block_size * self.block_size

    def __str__(self) -> str:
        return "full" if self.block_size is None else f"block-causal({self.block_size})"


FULL_ATTENTION = AttentionPattern()
"""Full bidirectional attention, the default of every [`Model`][dlm_decode.interfaces.Model]."""


@dataclass
class KVBuffer:
    """Preallocated key/value storage for every layer.

    ``k`` and ``v`` are ``(n_layers, B, H_kv, T, hd)``; a forward over positions
    ``[start, start + S)`` writes its keys and values there, then attends over ``[0, T)``.
    Nothing grows during a decode.
    """

    k: torch.Tensor
    v: torch.Tensor

    @property
    def max_length(self) -> int:
        """Number of positions the buffer holds (``T``)."""
        return self.k.shape[3]


IMAGE_PLACEHOLDER = -200
"""The id that stands for an image in the ids of a
[`MultimodalPrompt`][dlm_decode.interfaces.MultimodalPrompt] (LLaVA's
``IMAGE_TOKEN_INDEX``): never a token id, expanded by the model into the image's
features."""


@dataclass(frozen=True)
class MultimodalPrompt:
    """A prompt that is not only token ids: text ids with image placeholders, and the images.

    A model whose [`embed_prompt`][dlm_decode.interfaces.Model.embed_prompt] accepts it turns
    it into embeddings once, before the first forward; everything after the prompt (the
    generated positions) stays token ids, so caches, policies, the fast path and traces are
    unchanged.

    Attributes:
        ids: token ids, with [`IMAGE_PLACEHOLDER`][dlm_decode.interfaces.IMAGE_PLACEHOLDER]
            (``-200``) where each image goes, in order.
        images: one image per placeholder: a ``PIL.Image``, a path to an image file, or a
            model-specific preprocessed tensor.
    """

    ids: Sequence[int]
    images: Sequence[Any] = ()

    def __post_init__(self) -> None:
        n = sum(1 for t in self.ids if int(t) == IMAGE_PLACEHOLDER)
        if n != len(self.images):
            raise ValueError(
                f"MultimodalPrompt has {n} image placeholder(s) ({IMAGE_PLACEHOLDER}) in its ids "
                f"but {len(self.images)} image(s); give one image per placeholder"
            )


class PromptEmbedding(NamedTuple):
    """What [`Model.embed_prompt`][dlm_decode.interfaces.Model.embed_prompt] returns: a batch
    of prompts as the first forward's input, left-padded to a common length ``P``.

    Attributes:
        ids: ``(B, P)`` long, the prompt's token ids where it has text and a placeholder id
            (a valid, non-mask id, e.g. the pad id) where it has image features; the
            Decoder's sequence holds these, and no forward reads them.
        embeds: ``(B, P, d)`` the input embedding of every prompt position (zeros at
            padding), in the model's dtype.
        attention_mask: ``(B, P)`` bool, false at left padding; ``None`` when no row is
            padded.
    """

    ids: torch.Tensor
    embeds: torch.Tensor
    attention_mask: torch.Tensor | None


class Model(ABC):
    """A bidirectional mask predictor (LLaDA, Dream, the shipped tiny model, …).

    Subclasses set ``name`` (the registry name) and ``config_model_types``
    (the ``model_type`` values of ``config.json`` they load), and implement
    [`from_pretrained`][dlm_decode.interfaces.Model.from_pretrained],
    [`new_kv`][dlm_decode.interfaces.Model.new_kv] and
    [`forward`][dlm_decode.interfaces.Model.forward].

    Attributes:
        mask_token_id: id of the mask token.
        eos_token_ids: ids that end a response (EOS and end-of-turn).
        pad_token_id: id used for left padding of batched prompts.
        vocab_size: size of the logits' last dimension.
        max_length: longest sequence the model accepts (prompt + generation).
        logits_shift: 0 when output row ``i`` predicts position ``i`` (LLaDA); 1 when it
            predicts position ``i + 1`` (Dream, whose logit for ``i`` comes from ``i - 1``).
        tokenizer: a transformers tokenizer, or ``None``.
        attention: the model's [`AttentionPattern`][dlm_decode.interfaces.AttentionPattern]:
            full bidirectional (the default) or block-causal with a block size. The
            Decoder aligns its blocks to a block-causal model's grid, and ``forward``
            applies the pattern in every call (with or without a KV buffer).
        preferred_cache: the cache plugin the CLI uses for this model when ``--cache``
            is not given (``None``: the [`DecodeConfig`][dlm_decode.config.DecodeConfig]
            default). Block-causal models name ``block``, their exact cache.
        accepts_images: the model takes image prompts
            ([`image_prompt`][dlm_decode.interfaces.Model.image_prompt]); multimodal
            tasks and ``generate --image`` check it before any work.
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1
    config_model_types: ClassVar[tuple[str, ...]] = ()
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    """Named ``config.json`` dicts this architecture offers to
    [`build_model`][dlm_decode.models.loading.build_model] and ``bench --arch`` (random
    weights), e.g. ``{"llada-8b": {...}}``; names are unique across model plugins."""

    mask_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    vocab_size: int
    max_length: int
    logits_shift: int = 0
    tokenizer: Any = None
    attention: AttentionPattern = FULL_ATTENTION
    preferred_cache: ClassVar[str | None] = None
    accepts_images: ClassVar[bool] = False

    def image_prompt(self, text: str, images: Sequence[Any] = ()) -> MultimodalPrompt:
        """The prompt for a question about images, in the model's own chat format.

        Only a model that declares ``accepts_images`` implements it.

        Args:
            text: the user's question.
            images: ``PIL.Image`` objects or image paths.

        Raises:
            ValueError: the model takes text only.
        """
        raise ValueError(
            f"{type(self).__name__} takes text prompts only; image prompts need a "
            f"multimodal model (one with accepts_images, such as llada_v)"
        )

    @classmethod
    @abstractmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> Model:
        """Load a checkpoint folder in the Hugging Face layout."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Device of the weights."""

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """Floating dtype of the weights."""

    @abstractmethod
    def new_kv(self, batch_size: int, max_length: int) -> KVBuffer:
        """Allocate an empty [`KVBuffer`][dlm_decode.interfaces.KVBuffer] for ``batch_size`` rows of
        ``max_length``."""

    @abstractmethod
    def forward(
        self,
        ids: torch.Tensor,
        *,
        start: int = 0,
        positions: torch.Tensor | None = None,
        kv: KVBuffer | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_rows: tuple[int, int] | None = None,
        hidden_layers: Sequence[int] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run the transformer over a span and return logits for some of its rows.

        Args:
            ids: ``(B, S)`` token ids at absolute positions ``[start, start + S)``, or at
                ``positions``.
            start: absolute position of ``ids[:, 0]`` (the contiguous span: the fast,
                common case).
            positions: ``(B, S)`` long, any set of buffer slots per row instead of the
                contiguous span (contract v2): the rows' keys and values are written at those
                slots of ``kv`` and attention reads the whole buffer. A cache pads rows of
                unequal size by pointing the padding at a scratch slot that the key mask hides.
            kv: when given, keys/values of the span are written to ``kv[..., start:start+S, :]``
                and attention reads all ``T = kv.max_length`` cached positions; when ``None``,
                the span attends to itself only (``start`` must then be 0 and ``S = T``).
            attention_mask: ``(B, T)`` bool key mask over all positions (false = padding),
                or ``None`` for no padding.
            position_ids: ``(B, S)`` RoPE positions of the span; default ``start + arange(S)``
                (or ``positions``).
            logits_rows: ``(lo, hi)`` rows of the span (relative to ``start``) whose output
                goes through the final norm and LM head; default all rows. These are raw
                output rows: for a shifted model row ``r`` predicts position ``start + r + 1``.
            hidden_layers: block indices (negative from the end) whose outputs to return
                for every row of the span (features on request; nothing extra when
                ``None``).

        Returns:
            ``(B, hi - lo, V)`` logits in the model's dtype; with ``hidden_layers``, the
            pair ``(logits, hidden)`` with ``hidden[i]`` ``(B, S, d)``.

        A model that implements
        [`embed_prompt`][dlm_decode.interfaces.Model.embed_prompt] also takes
        ``prompt_embeds``: ``(B, P, d)`` input embeddings used instead of the token
        embedding at every buffer slot below ``P`` (the Decoder passes them through the
        [`ForwardCounter`][dlm_decode.interfaces.ForwardCounter]; caches never see them).
        """

    def embed_prompt(self, prompts: Sequence[MultimodalPrompt]) -> PromptEmbedding:
        """Turn prompts that are not only token ids into the first forward's input, once.

        Optional: a multimodal model (``llada_v``) implements it; the default refuses.
        The Decoder calls it when a prompt is a
        [`MultimodalPrompt`][dlm_decode.interfaces.MultimodalPrompt] with images, then
        decodes as for token ids: the returned ``ids`` fill the prompt slots of the
        sequence and ``forward`` receives ``embeds`` as ``prompt_embeds``.

        Args:
            prompts: ``B`` prompts, each with its own text and number of images.

        Returns:
            The left-padded [`PromptEmbedding`][dlm_decode.interfaces.PromptEmbedding].

        Raises:
            TypeError: the model takes token-id prompts only.
        """
        raise TypeError(
            f"{type(self).__name__} takes token-id prompts only, not images; use a multimodal "
            f"model (e.g. llada_v) or give the prompt's token ids"
        )

    def logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One plain full forward, logits aligned so row ``i`` predicts position ``i``.

        For a shifted model (Dream) the outputs are shifted right by one and the first row is
        kept, as Dream's own generation code does.

        Args:
            input_ids: ``(B, T)`` token ids.
            attention_mask: ``(B, T)`` bool, false at padding; ``None`` for no padding.

        Returns:
            ``(B, T, V)`` logits.
        """
        position_ids = None
        if attention_mask is not None:
            position_ids = positions_from_mask(attention_mask)
        out = self.forward(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        if self.logits_shift:
            out = torch.cat([out[:, :1], out[:, :-1]], dim=1)
        return out


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions for left-padded rows: real tokens count from 0, padding gets 0.

    Args:
        attention_mask: ``(B, T)`` bool, false at padding.

    Returns:
        ``(B, T)`` long positions.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# --------------------------------------------------------------------------------------
# Caches
# --------------------------------------------------------------------------------------


@dataclass
class CacheStep:
    """What a cache knows of the step it serves (contract v2), set by the Decoder before
    each forward.

    Attributes:
        block_index: the active block.
        step: the step within the block (0 at its start).
        forward_index: forwards this decode ran before this one (0 at the first).
        block_start: absolute position of the block's first position.
        block_end: one past its last.
        refresh_requested: the cache asked (through
            [`request_refresh`][dlm_decode.interfaces.CacheContext.request_refresh]) during
            the previous forward for a refresh now.
        last_commit: ``(B, L)`` bool, what the policy committed at the previous step of this
            block (``None`` at the block's first step).
        last_edit: ``(B, L)`` bool, the previous step's edits, or ``None``.
        last_remask: ``(B, L)`` bool, the previous step's remasks, or ``None``.
    """

    block_index: int
    step: int
    forward_index: int
    block_start: int
    block_end: int
    refresh_requested: bool = False
    last_commit: torch.Tensor | None = None
    last_edit: torch.Tensor | None = None
    last_remask: torch.Tensor | None = None


@dataclass
class CacheContext:
    """Per-decode state a cache works with; the Decoder builds one per ``generate`` call.

    Attributes:
        model: the model, seen through a [`ForwardCounter`][dlm_decode.interfaces.ForwardCounter]
            that counts the token positions each forward computes.
        attention_mask: ``(B, T)`` bool key mask, or ``None`` when no row is padded.
        position_ids: ``(B, T)`` long RoPE positions.
        kv: the cache's preallocated buffer (allocated by
            [`Cache.setup`][dlm_decode.interfaces.Cache.setup]), or ``None``.
        extra: free-form state for cache plugins. It lives for one decode: the Decoder
            empties it at the start of every ``generate`` (the fast path too, which keeps
            the context itself across decodes).
        step: the [`CacheStep`][dlm_decode.interfaces.CacheStep] being served (``None``
            outside a decode).
        refresh_flag: ``()`` bool on the device, set through
            [`request_refresh`][dlm_decode.interfaces.CacheContext.request_refresh].
    """

    model: Model
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor
    kv: KVBuffer | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    step: CacheStep | None = None
    refresh_flag: torch.Tensor | None = None

    def request_refresh(self, flag: torch.Tensor) -> None:
        """Ask, on the device (no host sync), for a refresh at the next step: ``flag`` is a
        ``()`` bool tensor. The Decoder reads it with the step's one host sync and sets
        ``step.refresh_requested`` for the next forward, which is then a refresh unless the
        cache's [`wants_refresh`][dlm_decode.interfaces.Cache.wants_refresh] handles it.
        """
        if self.refresh_flag is None:
            raise RuntimeError("request_refresh is only available during a decode")
        self.refresh_flag.logical_or_(flag.to(torch.bool))


class ForwardCounter:
    """A view of a model that counts the token positions its forwards compute.

    Every attribute is the model's; ``forward`` adds ``B × S`` (rows times span, padding
    included, since it is computed) to ``token_forwards`` and ``S`` to
    ``positions_per_row``, and adds to ``own_positions`` each row's computed positions that
    hold its own tokens (not left padding, not a scratch slot), then runs the model.
    ``own_positions`` is what a row costs in its own right: the same whatever it is
    batched with.

    Args:
        base: the model.
        sequence_mask: ``(B, T)`` bool, true at the rows' real tokens (``None``: no row is
            padded).
        total_length: ``T``, the sequence length (slots at ``T`` and beyond are scratch).
        batch_size: ``B``; with it, ``own_positions`` is allocated at once (a static buffer
            the fast path's graphs update in place), else at the first forward.

    Attributes:
        base: the model.
        token_forwards: token positions computed since the last
            [`reset`][dlm_decode.interfaces.ForwardCounter.reset].
        positions_per_row: positions each row computed since the last reset.
        own_positions: ``(B,)`` long on the model's device, each row's own positions
            computed since it was last zeroed (the Decoder zeroes it every step).
        forwards: model forwards run since the last
            [`reset`][dlm_decode.interfaces.ForwardCounter.reset].
        last_forwards: the forwards counted before the last reset (the Decoder adds them to
            its NFE: a cache call that runs an extra forward, such as the
            [`block`][dlm_decode.caches.block.BlockCache] cache writing a finished block,
            costs more than one).
        prompt_embeds: ``(B, P, d)`` the input embeddings of a multimodal prompt (see
            [`Model.embed_prompt`][dlm_decode.interfaces.Model.embed_prompt]), set by the
            Decoder; when set, every ``forward`` passes them on as ``prompt_embeds``, so
            caches need not know. ``None`` for token-id prompts.
    """

    def __init__(
        self,
        base: Model,
        sequence_mask: torch.Tensor | None = None,
        total_length: int | None = None,
        batch_size: int | None = None,
    ) -> None:
        self.base = base
        self.token_forwards = 0
        self.positions_per_row = 0
        self.sequence_mask = sequence_mask
        self.total_length = total_length
        self.own_positions: torch.Tensor | None = None
        self.forwards = 0
        self.last_forwards = 0
        self.prompt_embeds: torch.Tensor | None = None
        if batch_size is not None:
            self.own_positions = torch.zeros(batch_size, dtype=torch.long, device=base.device)

    def reset(self) -> tuple[int, int]:
        """Return ``(token_forwards, positions_per_row)`` and start counting again (the
        forwards counted so far move to ``last_forwards``)."""
        out = (self.token_forwards, self.positions_per_row)
        self.token_forwards = self.positions_per_row = 0
        self.last_forwards, self.forwards = self.forwards, 0
        return out

    def _count_own(self, ids: torch.Tensor, start: int, positions: torch.Tensor | None) -> None:
        bsz, span = int(ids.shape[0]), int(ids.shape[1])
        if self.own_positions is None:
            self.own_positions = torch.zeros(bsz, dtype=torch.long, device=ids.device)
        seq, total = self.sequence_mask, self.total_length
        if positions is not None:  # (B, S) slots; scratch slots lie at T and beyond
            t = total if total is not None else int(positions.max()) + 1
            valid = positions < t  # (B, S)
            if seq is not None:
                valid = valid & seq.gather(-1, positions.clamp(max=t - 1))
            self.own_positions.add_(valid.sum(-1))
        elif seq is not None:
            self.own_positions.add_(seq[:, start : start + span].sum(-1))
        else:
            self.own_positions.add_(span)

    def forward(self, ids: torch.Tensor, **kwargs: Any) -> Any:
        """Count, then run the model's forward."""
        self.forwards += 1
        self.token_forwards += int(ids.shape[0]) * int(ids.shape[1])
        self.positions_per_row += int(ids.shape[1])
        self._count_own(ids, int(kwargs.get("start", 0) or 0), kwargs.get("positions"))
        if self.prompt_embeds is not None:  # a multimodal prompt's first-forward input
            kwargs["prompt_embeds"] = self.prompt_embeds
        return self.base.forward(ids, **kwargs)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        """The model's plain full forward (counted)."""
        self.forwards += 1
        self.token_forwards += int(input_ids.numel())
        self.positions_per_row += int(input_ids.shape[1])
        if self.own_positions is None:
            self.own_positions = torch.zeros(
                input_ids.shape[0], dtype=torch.long, device=input_ids.device
            )
        if attention_mask is not None:
            self.own_positions.add_(attention_mask.to(torch.bool).sum(-1))
        else:
            self.own_positions.add_(int(input_ids.shape[1]))
        return self.base.logits(input_ids, attention_mask)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)


class Cache(ABC):
    """Decides what each forward recomputes and what it reuses.

    Both methods return logits for exactly the active block's positions
    ``[block_start, block_end)``, aligned (row ``j`` predicts position ``block_start + j``);
    each call is one NFE, whatever it computes (``ctx.model`` counts the token positions it
    does compute: the cost beside NFE).

    Contract v2, all optional and backward compatible:

    * the step is known: ``ctx.step`` is a [`CacheStep`][dlm_decode.interfaces.CacheStep]
      (block, step index, what the policy decided at the previous step);
    * a refresh may happen inside a block: the Decoder calls ``refresh`` at a block's first
      step, when [`wants_refresh`][dlm_decode.interfaces.Cache.wants_refresh] says so (from
      host-side information), and at the step after the cache asked for one on the device
      ([`request_refresh`][dlm_decode.interfaces.CacheContext.request_refresh]);
    * any set of positions and hidden features: see
      [`Model.forward`][dlm_decode.interfaces.Model.forward] (``positions``,
      ``hidden_layers``);
    * the sequence ``x`` is read only: the Decoder checks every step and raises an error
      naming the cache that wrote it.

    ``extra`` in the context lives for one decode. Built-in caches may be subclassed.
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1
    Params: ClassVar[type[BaseModel]] = NoParams
    capturable: ClassVar[bool] = False
    """Capability: ``refresh`` and ``step`` may be captured in a CUDA graph. Declare it only
    when the span a call computes depends on nothing but ``block_start`` and ``block_end``,
    the cache keeps no Python state between calls, and the buffers that ``setup`` allocates
    may be reused by every decode of the same shape (the fast path then calls ``setup``
    once per shape). Subclasses inherit it."""

    def __init__(self, params: BaseModel | None = None) -> None:
        self.params = params if params is not None else self.Params()

    @property
    def key(self) -> str:
        """Versioned registry name, e.g. ``"dual.v1"``."""
        return f"{self.name}.v{self.version}"

    refresh_on_request: ClassVar[bool] = True
    """When the cache asks for a refresh on the device
    ([`request_refresh`][dlm_decode.interfaces.CacheContext.request_refresh]), the Decoder's
    next call is ``refresh``. A cache that acts on the request itself (per row, say) sets
    this to ``False`` and reads ``ctx.step.refresh_requested`` in ``step``."""
    exact: ClassVar[bool] = False
    """Capability: every call returns the logits of a plain full forward of the current
    sequence (``none``; ``dual`` with ``refresh_every=1``). Instances may override it with a
    property; [`check_cache`][dlm_decode.testing.check_cache] then checks every step."""

    def setup(self, ctx: CacheContext, batch_size: int, total_length: int) -> None:  # noqa: B027
        """Allocate buffers once per decode (default: nothing)."""

    def wants_refresh(self, ctx: CacheContext) -> bool:
        """Whether this step should be a refresh although it is not the block's first
        (host-side: read ``ctx.step``, never tensor values; default: never). Periodic
        refreshes (``refresh_every``) are decided here."""
        return False

    @abstractmethod
    def refresh(
        self, ctx: CacheContext, x: torch.Tensor, block_start: int, block_end: int
    ) -> torch.Tensor:
        """First step of a block: ``x`` is ``(B, T)``; returns ``(B, L, V)`` logits."""

    @abstractmethod
    def step(
        self, ctx: CacheContext, x: torch.Tensor, block_start: int, block_end: int
    ) -> torch.Tensor:
        """A later step of the block: ``x`` is ``(B, T)``; returns ``(B, L, V)`` logits."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}[{self.key}]"
