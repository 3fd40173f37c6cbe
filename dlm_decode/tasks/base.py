"""The Task interface: a data source, a prompt format and a scorer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = ["Sample", "Task"]


@dataclass
class Sample:
    """One evaluation problem.

    Attributes:
        id: stable identifier within the task.
        prompt: the prompt text (before any chat template).
        reference: the gold answer (or tests) the scorer compares against.
        meta: anything else the scorer needs (family, test code, …).
    """

    id: str
    prompt: str
    reference: Any
    meta: dict[str, Any] = field(default_factory=dict)


class Task(ABC):
    """An evaluation task, registered through the ``register_tasks`` hook.

    Subclasses set :attr:`name` and :attr:`version` and implement :meth:`samples` and
    :meth:`score`.
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1
    #: Whether prompts go through the model's chat template by default.
    chat: ClassVar[bool] = True

    @abstractmethod
    def samples(self, limit: int | None = None) -> list[Sample]:
        """The evaluation samples (first ``limit`` when given)."""

    @abstractmethod
    def score(self, sample: Sample, completion: str) -> dict[str, Any]:
        """Score one completion: at least ``{"correct": bool, "extracted": ...}``."""

    def score_batch(
        self, samples: Sequence[Sample], completions: Sequence[str]
    ) -> list[dict[str, Any]]:
        """Score a decoded batch; the default calls :meth:`score` per sample.

        Tasks that execute code override this to run the batch's programs in parallel.
        """
        return [self.score(s, c) for s, c in zip(samples, completions, strict=True)]
