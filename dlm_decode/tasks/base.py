"""The Task interface: a data source, a prompt format and a scorer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = ["Sample", "Task", "check_limit", "check_unique_ids", "load_samples"]


@dataclass
class Sample:
    """One evaluation problem.

    Attributes:
        id: stable identifier within the task.
        prompt: the prompt text (before any chat template).
        reference: the gold answer (or tests) the scorer compares against.
        meta: anything else the scorer needs (family, test code, …).
        images: the prompt's images (paths or ``PIL.Image`` objects) for a multimodal
            task; the evaluation builds the prompt with the model's
            [`image_prompt`][dlm_decode.interfaces.Model.image_prompt]. Empty for text.
    """

    id: str
    prompt: str
    reference: Any
    meta: dict[str, Any] = field(default_factory=dict)
    images: tuple[Any, ...] = ()


class Task(ABC):
    """An evaluation task, registered through the ``register_tasks`` hook.

    Subclasses set ``name`` and ``version`` and implement
    [`samples`][dlm_decode.tasks.base.Task.samples] and
    [`score`][dlm_decode.tasks.base.Task.score].
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1
    #: Whether prompts go through the model's chat template by default.
    chat: ClassVar[bool] = True
    #: Where an answer ends (lm-eval's ``until``): the reference accounting counts the
    #: tokens of the completion cut at the first of these, re-tokenized.
    stop: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def samples(self, limit: int | None = None) -> list[Sample]:
        """The evaluation samples (first ``limit`` when given)."""

    @abstractmethod
    def score(self, sample: Sample, completion: str) -> dict[str, Any]:
        """Score one completion: at least ``{"correct": bool, "extracted": ...}``."""

    def score_batch(
        self, samples: Sequence[Sample], completions: Sequence[str]
    ) -> list[dict[str, Any]]:
        """Score a decoded batch; the default calls [`score`][dlm_decode.tasks.base.Task.score] per
        sample.

        Tasks that execute code override this to run the batch's programs in parallel.
        """
        return [self.score(s, c) for s, c in zip(samples, completions, strict=True)]


def check_limit(limit: object, what: str = "limit") -> int | None:
    """Validate a sample limit: ``None`` (every sample) or a positive integer.

    Args:
        limit: the value given.
        what: its name in the message (``--limit``, ``tasks[0].limit``).

    Returns:
        ``limit``.

    Raises:
        ValueError: zero, negative, or not an integer (``-1`` would otherwise slice to
            "all but the last").
    """
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(
            f"{what} must be a positive number of samples (or omitted for every sample), "
            f"got {limit!r}"
        )
    return limit


def check_unique_ids(samples: Sequence[Sample], task: str) -> None:
    """Refuse samples whose ids repeat: rows, resumes and merges are keyed by them.

    Args:
        samples: the samples.
        task: the task's name, for the message.

    Raises:
        ValueError: names the first repeated id and the positions where it occurs.
    """
    first: dict[str, int] = {}
    for i, sample in enumerate(samples):
        if not isinstance(sample, Sample):
            raise ValueError(
                f"task {task!r}: samples() returned a {type(sample).__name__} at position "
                f"{i}; it must return dlm_decode.tasks.base.Sample objects"
            )
        key = str(sample.id)
        if key in first:
            dup = sum(1 for s in samples if str(s.id) == key)
            raise ValueError(
                f"task {task!r}: sample id {key!r} occurs {dup} times (positions "
                f"{first[key]} and {i} first); ids must be unique, since rows are keyed by "
                f"them — fix the data file's ids"
            )
        first[key] = i


def load_samples(task: Task, limit: int | None = None, *, what: str = "limit") -> list[Sample]:
    """A task's samples, validated: a positive ``limit`` and unique ids.

    Args:
        task: the task.
        limit: the first ``limit`` samples (``None``: every sample).
        what: the limit's name in an error message.

    Returns:
        The samples.

    Raises:
        ValueError: a bad limit, duplicate ids, or no samples at all.
    """
    check_limit(limit, what)
    samples = list(task.samples(limit))
    check_unique_ids(samples, task.name)
    if not samples:
        raise ValueError(f"task {task.name!r} has no samples to evaluate")
    return samples
