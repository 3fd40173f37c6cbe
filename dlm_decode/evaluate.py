"""Evaluate a decode configuration on a task: the loop the CLI, quickstart and ablations share.

Throughput counts **response tokens only**: tokens before each row's first EOS. Prompt
tokens and EOS padding are excluded (counting them inflates tokens/s).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dlm_decode.config import DecodeConfig
from dlm_decode.decoder import Decoder
from dlm_decode.interfaces import Model
from dlm_decode.registry import get_registry
from dlm_decode.tasks.base import Sample, Task, check_unique_ids, load_samples
from dlm_decode.tasks.common import truncate_at

__all__ = [
    "ROW_TIMING_FIELDS",
    "EvalResult",
    "check_accepts_images",
    "check_task_options",
    "decode_and_score",
    "encode_prompts",
    "encode_samples",
    "evaluate",
    "get_task",
    "image_label",
    "reference_token_counts",
    "row_commits",
    "row_latency_share",
    "summarize",
    "task_uses_chat",
]


def get_task(name: str, **kwargs: Any) -> Task:
    """Instantiate a registered task by name (``synthetic``, ``gsm8k``, …).

    Args:
        name: the task's registered name, optionally versioned (``gsm8k.v1``).
        **kwargs: the task's constructor arguments (``shots``, ``data_path``, …).
    """
    cls = get_registry().resolve("task", name)
    check_task_options(cls, kwargs)
    return cls(**kwargs)


#: Task constructor options → the CLI flag that sets them (for messages).
_TASK_FLAGS = {"shots": "--shots", "data_path": "--data"}


def check_task_options(cls: type, options: dict[str, Any]) -> None:
    """Refuse options a task's constructor does not take, before anything is loaded.

    Args:
        cls: the task class.
        options: the keyword arguments meant for it.

    Raises:
        ValueError: names the option (and its CLI flag) and the options the task takes.
    """
    init = cls.__init__
    params = {} if init is object.__init__ else inspect.signature(init).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    takes = [n for n, p in params.items() if n != "self" and p.kind is not p.VAR_POSITIONAL]
    for key in options:
        if key not in takes:
            flag = _TASK_FLAGS.get(key)
            shown = f"{key} ({flag})" if flag else key
            raise ValueError(
                f"task {cls.name!r} does not take {shown}; its options: "
                f"{', '.join(takes) or 'none'}"
            )


def encode_prompts(model: Model, texts: Sequence[str], chat: bool | None = None) -> list[list[int]]:
    """Tokenize prompt texts for ``model``.

    Args:
        model: a model with a tokenizer.
        texts: prompt strings.
        chat: apply the tokenizer's chat template (one user turn plus the generation
            prompt); ``None`` → when the tokenizer has a template.

    Returns:
        One list of token ids per text.

    Raises:
        ValueError: the model has no tokenizer.
    """
    tok = model.tokenizer
    if tok is None:
        raise ValueError(
            "this model has no tokenizer: pass token ids to generate(), or load a checkpoint "
            "folder that contains tokenizer.json"
        )
    use_chat = bool(getattr(tok, "chat_template", None)) if chat is None else chat
    out = []
    for t in texts:
        if use_chat:
            ids = tok.apply_chat_template(
                [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            out.append(list(ids))
        else:
            out.append(tok.encode(t, add_special_tokens=True))
    return out


def encode_samples(model: Model, samples: Sequence[Sample], chat: bool | None = None) -> list[Any]:
    """The prompts of a batch of samples: token ids, or, when any sample has images,
    one [`MultimodalPrompt`][dlm_decode.interfaces.MultimodalPrompt] per sample from the
    model's [`image_prompt`][dlm_decode.interfaces.Model.image_prompt] (a text-only sample
    of such a batch gets one with no image).

    Raises:
        ValueError: images for a model that takes text only, or a model without a tokenizer.
    """
    if not any(s.images for s in samples):
        return encode_prompts(model, [s.prompt for s in samples], chat=chat)
    check_accepts_images(model, samples)
    return [model.image_prompt(s.prompt, s.images) for s in samples]


def check_accepts_images(model: Model, samples: Sequence[Sample]) -> None:
    """Refuse image samples for a text-only model, before any decoding.

    Raises:
        ValueError: one line naming the first image sample and the model.
    """
    first = next((s for s in samples if s.images), None)
    if first is not None and not getattr(model, "accepts_images", False):
        raise ValueError(
            f"sample {first.id!r} has {len(first.images)} image(s) but "
            f"{type(model).__name__} takes text only; evaluate a multimodal task with a "
            f"model that accepts images (llada_v)"
        )


def image_label(image: Any) -> str:
    """How a row names an image: its path, or ``<image W×H>`` for an in-memory one."""
    if isinstance(image, (str, Path)):
        return str(image)
    size = getattr(image, "size", None)
    return f"<image {size[0]}x{size[1]}>" if isinstance(size, tuple) else "<image>"


@dataclass
class EvalResult:
    """Per-sample rows and the aggregate of one evaluation.

    Attributes:
        rows: one dict per sample: id, prompt, completion, extracted, correct, response
            tokens, NFE, latency (seconds of its batch divided by the batch size), and any
            task fields (family, …).
        summary: accuracy, n, tokens/s, NFE total and per sample, tokens per NFE, wall time.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


#: A row's timing: ``batch_latency_s`` (wall time of the ``generate`` call that decoded
#: the row together with the others of its batch), ``batch_rows`` (how many rows that call
#: decoded), ``latency_share_s`` (the one divided by the other) and ``latency_s``, the name
#: rows written before these fields gave the share.
ROW_TIMING_FIELDS = ("batch_latency_s", "batch_rows", "latency_share_s", "latency_s")


def row_latency_share(row: dict[str, Any]) -> float:
    """The row's share of its batch's decode time, in seconds.

    Not the row's own latency: every row of a batch gets the same share. Reads
    ``latency_share_s``, or ``latency_s`` in rows written before that field existed.

    Args:
        row: an evaluation or sweep row.

    Returns:
        The share (0 when the row records neither field).
    """
    value = row.get("latency_share_s", row.get("latency_s", 0.0))
    return float(value) if value is not None else 0.0


def summarize(rows: Sequence[dict[str, Any]], wall_s: float | None = None) -> dict[str, Any]:
    """Aggregate per-sample rows (also used when resuming from saved rows).

    Args:
        rows: rows as produced by [`evaluate`][dlm_decode.evaluate.evaluate].
        wall_s: decode wall time; default the sum of the rows' shares of their batches'
            time ([`row_latency_share`][dlm_decode.evaluate.row_latency_share]).

    Returns:
        ``accuracy``, ``n``, ``tokens_per_s``, ``nfe_total``, ``nfe_per_sample``,
        ``tokens_per_nfe``, ``token_forwards_total`` and ``token_forwards_per_sample`` (the
        token positions the forwards computed: the cost beside NFE), ``wall_s``, ``accuracy_<x>``
        for every boolean ``correct_<x>`` field
        (GSM8K's ``correct_strict``), and ``accuracy_<family>`` per ``family`` if present.
    """
    n = len(rows)
    if n == 0:
        return {"n": 0}
    wall = wall_s if wall_s is not None else sum(row_latency_share(r) for r in rows)
    toks = sum(r["response_tokens"] for r in rows)
    nfe = sum(r["nfe"] for r in rows)
    tf = sum(r.get("token_forwards", 0) for r in rows)  # rows written before it: 0
    ref = sum(r.get("reference_tokens", 0) for r in rows)
    out: dict[str, Any] = {
        "n": n,
        "accuracy": sum(bool(r["correct"]) for r in rows) / n,
        "tokens_per_s": toks / wall if wall > 0 else float("nan"),
        "nfe_total": nfe,
        "nfe_per_sample": nfe / n,
        "tokens_per_nfe": toks / nfe if nfe else float("nan"),
        "token_forwards_total": tf,
        "token_forwards_per_sample": tf / n,
        "response_tokens": toks,
        "wall_s": wall,
        # the reference's accounting: answer tokens cut at the task's stop strings and
        # re-tokenized, over the same wall time (see reference_token_counts)
        "reference_tokens": ref,
        "tokens_per_s_reference": ref / wall if wall > 0 else float("nan"),
        "tokens_per_nfe_reference": ref / nfe if nfe else float("nan"),
    }
    # Other boolean verdicts, e.g. GSM8K's strict extraction: correct_strict → accuracy_strict.
    extra = sorted(
        {k for r in rows for k, v in r.items() if k.startswith("correct_") and isinstance(v, bool)}
    )
    for key in extra:
        vals = [r[key] for r in rows if key in r]
        out[f"accuracy_{key[len('correct_') :]}"] = sum(vals) / len(vals)
    families = sorted({r["family"] for r in rows if "family" in r})
    for fam in families:
        sel = [r for r in rows if r.get("family") == fam]
        out[f"accuracy_{fam}"] = sum(bool(r["correct"]) for r in sel) / len(sel)
    return out


def _batches(items: Sequence[Sample], size: int) -> Iterator[Sequence[Sample]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def evaluate(
    model: Model,
    task: Task,
    config: DecodeConfig,
    *,
    limit: int | None = None,
    batch_size: int = 16,
    samples: Sequence[Sample] | None = None,
    progress: bool = True,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> EvalResult:
    """Decode every sample of ``task`` with ``config`` and score it.

    Args:
        model: the model.
        task: the task.
        config: the decode config.
        limit: evaluate the first ``limit`` samples.
        batch_size: prompts decoded together (left-padded).
        samples: explicit samples (e.g. those not yet done when resuming); default
            ``task.samples(limit)``.
        progress: show a tqdm progress bar.
        on_row: called with each finished row (e.g. to append it to a JSONL file at once).

    Returns:
        An [`EvalResult`][dlm_decode.evaluate.EvalResult].
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if samples is not None:
        todo = list(samples)
        check_unique_ids(todo, task.name)
    else:
        todo = load_samples(task, limit)
    check_accepts_images(model, todo)
    decoder = Decoder(model, config)
    rows: list[dict[str, Any]] = []
    wall = 0.0
    desc = f"{task.name} {decoder.settings.policy_ref.label}"
    bar = tqdm(total=len(todo), desc=desc, disable=not progress)
    for batch in _batches(todo, batch_size):
        batch_rows, dt = decode_and_score(decoder, task, batch)
        wall += dt
        for row in batch_rows:
            rows.append(row)
            if on_row is not None:
                on_row(row)
        bar.update(len(batch))
        if rows:
            bar.set_postfix(acc=f"{sum(r['correct'] for r in rows) / len(rows):.3f}")
    bar.close()
    return EvalResult(rows=rows, summary=summarize(rows, wall))


def row_commits(
    commit_counts: torch.Tensor, step_blocks: torch.Tensor, col: int
) -> tuple[list[int], list[int]]:
    """One row's tokens committed per step (steps where it had work) and steps per block.

    Args:
        commit_counts: ``(steps, B)`` of a
            [`GenerationResult`][dlm_decode.decoder.GenerationResult].
        step_blocks: ``(steps,)`` block index of each step.
        col: the row.
    """
    commits: list[int] = []
    per_block: dict[int, int] = {}
    for n, b in zip(commit_counts[:, col].tolist(), step_blocks.tolist(), strict=True):
        if n > 0:
            commits.append(int(n))
            per_block[b] = per_block.get(b, 0) + 1
    return commits, [per_block[b] for b in sorted(per_block)]


def decode_and_score(
    decoder: Decoder, task: Task, samples: Sequence[Sample]
) -> tuple[list[dict[str, Any]], float]:
    """Decode one batch of samples together and score it.

    Args:
        decoder: a resolved decoder (model + config).
        task: the task that scores the completions.
        samples: the batch.

    Returns:
        One row per sample (``id``, ``prompt``, ``completion``, ``response_tokens``,
        ``reference_tokens``, ``nfe``, ``batch_latency_s`` / ``batch_rows`` /
        ``latency_share_s`` (see
        [`row_latency_share`][dlm_decode.evaluate.row_latency_share]), ``commits``,
        ``block_steps``, ``token_forwards``, ``edits``, ``remasks`` and the task's score
        fields; a score field never overrides these) and the batch's decode wall time in
        seconds.
    """
    model = decoder.model
    prompts = encode_samples(model, samples, chat=task_uses_chat(task, model))
    t0 = time.perf_counter()
    res = decoder.generate(prompts)
    dt = time.perf_counter() - t0
    texts = res.texts(model.tokenizer)
    lengths = res.response_lengths().tolist()
    ref_tokens = reference_token_counts(model.tokenizer, texts, task.stop)
    nfes = res.nfe_per_row.tolist()
    scores = _score(task, samples, texts)
    rows = []
    for j, s in enumerate(samples):
        commits, block_steps = row_commits(res.commit_counts, res.step_blocks, j)
        row: dict[str, Any] = {
            "id": s.id,
            "prompt": s.prompt,
            "completion": texts[j],
            "response_tokens": int(lengths[j]),
            "reference_tokens": ref_tokens[j],
            "nfe": int(nfes[j]),
            "batch_latency_s": dt,
            "batch_rows": len(samples),
            "latency_share_s": dt / len(samples),
            "commits": commits,
            "block_steps": block_steps,
            "token_forwards": int(res.token_forwards_per_row[j]),
            "edits": int(res.edit_counts[:, j].sum()),
            "remasks": int(res.remask_counts[:, j].sum()),
        }
        if s.images:
            row["images"] = [image_label(im) for im in s.images]
        row.update({k: v for k, v in scores[j].items() if k not in row})
        row["correct"] = bool(scores[j].get("correct", False))
        rows.append(row)
    return rows, dt


def reference_token_counts(tokenizer: Any, texts: Sequence[str], stop: Sequence[str]) -> list[int]:
    """Answer tokens as the Fast-dLLM(++) reference evaluation counts them: each text cut
    at the first ``stop`` string (lm-eval's ``until``), re-tokenized, special tokens not
    added (``0`` for every text when there is no tokenizer).

    Args:
        tokenizer: the model's tokenizer (``None`` → zeros).
        texts: the decoded completions.
        stop: the task's stop strings.

    Returns:
        One count per text.
    """
    if tokenizer is None:
        return [0] * len(texts)
    return [len(tokenizer.encode(truncate_at(t, stop), add_special_tokens=False)) for t in texts]


def _score(task: Task, batch: Sequence[Sample], texts: Sequence[str]) -> list[dict[str, Any]]:
    """Score a decoded batch with ``task.score_batch`` (code tasks run it in parallel)."""
    scores = list(task.score_batch(batch, texts))
    if len(scores) != len(batch):
        raise RuntimeError(
            f"{type(task).__name__}.score_batch returned {len(scores)} rows for "
            f"{len(batch)} samples"
        )
    return scores


def task_uses_chat(task: Task, model: Model) -> bool:
    """Whether ``task``'s prompts go through ``model``'s chat template (the task asks for
    chat and the tokenizer has a template)."""
    tok = model.tokenizer
    return bool(task.chat and tok is not None and getattr(tok, "chat_template", None))
