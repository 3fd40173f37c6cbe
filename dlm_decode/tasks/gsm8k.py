"""GSM8K: grade-school math word problems, n-shot (default 5), exact numeric match.

Prompt: ``shots`` worked examples from the train split, then the test question::

    Question: <train question>
    Answer: <train solution, calculator annotations removed>
    #### <number>

    ...

    Question: <test question>
    Answer:

The examples are the same for every test question: a seeded draw (``seed``, default 1234)
from the train split. Instruct models receive the whole prompt as one user turn through
their chat template (the evaluator applies it).

Scoring: the completion is cut at the first stop string (``Question:`` starts a new,
hallucinated example), then

* ``correct`` (flexible): the last number in the completion equals the gold answer;
* ``correct_strict``: the number after the first ``####`` equals the gold answer.

Numbers are normalized before comparison (thousands separators, ``$``, trailing ``.0``).
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, ClassVar

from dlm_decode.tasks.base import Sample, Task
from dlm_decode.tasks.common import (
    STR,
    TaskDataError,
    assemble_nshot,
    check_records,
    extract_last_number,
    find_data_file,
    load_hub,
    load_records,
    normalize_number,
    numbers_equal,
    truncate_at,
)

__all__ = ["GSM8KTask", "extract_strict", "gold_answer"]

_CALC_RE = re.compile(r"<<[^<>]*>>")
_STRICT_RE = re.compile(r"####\s*([-\u2212]?\$?\s?[\d,]*\.?\d+)")


def gold_answer(solution: str) -> str:
    """The normalized number after ``####`` in a GSM8K solution.

    Raises:
        TaskDataError: the solution has no ``####`` line.
    """
    _, sep, tail = solution.rpartition("####")
    if not sep:
        raise TaskDataError(f"GSM8K solution without a '#### N' line: {solution[-80:]!r}")
    return normalize_number(tail.strip().split()[0] if tail.strip() else "")


def extract_strict(text: str) -> str | None:
    """The normalized number after the first ``####`` in ``text`` (``None`` if absent)."""
    m = _STRICT_RE.search(text)
    return normalize_number(m.group(1)) if m else None


def _clean_solution(solution: str) -> str:
    """Remove the ``<<expr=value>>`` calculator annotations from a train solution."""
    return _CALC_RE.sub("", solution).strip()


class GSM8KTask(Task):
    """GSM8K test split (1319 problems), n-shot from the train split.

    Args:
        shots: worked examples in the prompt (default 5; 8 is the other common setting).
        data_path: the local test file (``test.jsonl`` with ``question``/``answer``), or a
            folder holding ``test.jsonl`` and ``train.jsonl``; default: the hub
            (``openai/gsm8k``, config ``main``).
        train_path: the local train file for the examples; default ``train.jsonl`` beside
            the test file.
        seed: seed of the draw of examples from the train split.

    Raises:
        ValueError: negative ``shots``.
        FileNotFoundError: a local file is missing.
    """

    name: ClassVar[str] = "gsm8k"
    version: ClassVar[int] = 1
    chat: ClassVar[bool] = True
    #: Default number of worked examples.
    default_shots: ClassVar[int] = 5
    #: Hub dataset id and configuration.
    hub: ClassVar[tuple[str, str]] = ("openai/gsm8k", "main")
    #: The completion is cut at the first of these before answers are extracted.
    stop: ClassVar[tuple[str, ...]] = ("Question:", "</s>", "<|im_end|>", "<|eot_id|>")

    def __init__(
        self,
        *,
        shots: int | None = None,
        data_path: str | Path | None = None,
        train_path: str | Path | None = None,
        seed: int = 1234,
    ) -> None:
        self.shots = self.default_shots if shots is None else int(shots)
        if self.shots < 0:
            raise ValueError(f"gsm8k: shots must be ≥ 0, got {self.shots}")
        self.seed = seed
        self.test_file: Path | None = None
        self.train_file: Path | None = None
        if data_path is not None:
            self.test_file = find_data_file(
                data_path, ["test.jsonl", "test.jsonl.gz", "test.json"], what="GSM8K test"
            )
        if train_path is not None:
            self.train_file = find_data_file(
                train_path, ["train.jsonl", "train.jsonl.gz", "train.json"], what="GSM8K train"
            )
        elif self.test_file is not None and self.shots > 0:
            near = [self.test_file.parent / n for n in ("train.jsonl", "train.jsonl.gz")]
            found = [p for p in near if p.is_file()]
            if not found:
                raise FileNotFoundError(
                    f"gsm8k: {self.shots}-shot prompts need the train split; put train.jsonl "
                    f"beside {str(self.test_file)!r}, pass train_path=..., or use --shots 0"
                )
            self.train_file = found[0]
        self._test: list[dict[str, Any]] | None = None
        self._train: list[dict[str, Any]] | None = None

    # -- data ---------------------------------------------------------------------------

    def _load(self) -> None:
        if self._test is not None:
            return
        need_train = self.shots > 0
        hub_splits = []
        if self.test_file is None:
            hub_splits.append("test")
        if need_train and self.train_file is None:
            hub_splits.append("train")
        hub = load_hub(*self.hub, hub_splits, task=self.name) if hub_splits else {}
        test = load_records(self.test_file) if self.test_file else hub["test"]
        train: list[dict[str, Any]] = []
        if need_train:
            train = load_records(self.train_file) if self.train_file else hub["train"]
        files = {"test": self.test_file, "train": self.train_file}
        for split, recs in (("test", test), ("train", train)):
            if recs:
                check_records(
                    recs,
                    task=self.name,
                    where=repr(str(files[split])) if files[split] else f"hub {split} split",
                    required={"question": STR, "answer": STR},
                    optional={},
                )
        self._test, self._train = test, train

    def fewshot_examples(self) -> list[dict[str, Any]]:
        """The train records used as worked examples (same for every test question).

        Train questions that also appear in the test split are never drawn.
        """
        self._load()
        assert self._test is not None and self._train is not None
        if self.shots == 0:
            return []
        test_questions = {r["question"].strip() for r in self._test}
        pool = [r for r in self._train if r["question"].strip() not in test_questions]
        if self.shots > len(pool):
            raise ValueError(
                f"gsm8k: {self.shots} shots requested, the train split has {len(pool)}"
            )
        rng = random.Random(self.seed)
        return [pool[i] for i in rng.sample(range(len(pool)), self.shots)]

    @staticmethod
    def format_question(question: str) -> str:
        """``Question: …\\nAnswer:`` (the model continues after ``Answer:``)."""
        return f"Question: {question.strip()}\nAnswer:"

    def build_prompt(self, question: str, examples: list[dict[str, Any]]) -> str:
        """The n-shot prompt for ``question`` with ``examples`` as worked examples."""
        shots = [
            (self.format_question(r["question"]), " " + _clean_solution(r["answer"]))
            for r in examples
        ]
        return assemble_nshot(shots, self.format_question(question))

    def samples(self, limit: int | None = None) -> list[Sample]:
        """The test problems (first ``limit``), each with its n-shot prompt."""
        self._load()
        assert self._test is not None
        examples = self.fewshot_examples()
        recs = self._test if limit is None else self._test[:limit]
        return [
            Sample(
                id=f"gsm8k/{i}",
                prompt=self.build_prompt(r["question"], examples),
                reference=gold_answer(r["answer"]),
                meta={"question": r["question"], "solution": r["answer"]},
            )
            for i, r in enumerate(recs)
        ]

    # -- scoring ------------------------------------------------------------------------

    def score(self, sample: Sample, completion: str) -> dict[str, Any]:
        """Flexible (last number) and strict (``#### N``) exact match.

        Returns:
            ``correct`` (flexible), ``extracted``, ``correct_strict``, ``extracted_strict``.
        """
        text = truncate_at(completion, self.stop)
        flexible = extract_last_number(text)
        strict = extract_strict(text)
        return {
            "correct": numbers_equal(flexible, sample.reference),
            "extracted": flexible,
            "correct_strict": numbers_equal(strict, sample.reference),
            "extracted_strict": strict,
        }
