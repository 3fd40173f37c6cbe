"""Multimodal math benchmarks: MathVista (testmini) and MathVerse (testmini), with
rule-based answer extraction.

Both give a [`Sample`][dlm_decode.tasks.base.Sample] per problem whose ``images`` hold the
problem's figure (a path, or a ``PIL.Image`` from the hub); the evaluation turns it into a
[`MultimodalPrompt`][dlm_decode.interfaces.MultimodalPrompt] with the model's
``image_prompt`` (a model that declares ``accepts_images``, such as ``llada_v``).

Data: the Hugging Face hub (``AI4Math/MathVista`` split ``testmini``; ``AI4Math/MathVerse``
config and split ``testmini``) through ``datasets``, or a local file / folder (``--data``):
JSON Lines or a JSON list (MathVista's own ``testmini.json``, an object keyed by ``pid``, is
read too). A record's image is a path (relative to the data file's folder, or absolute), a
``{"path": …}`` or ``{"bytes": …}`` object as ``datasets`` writes it, or a ``PIL.Image``.

Scoring is **rule-based**, unlike the papers (MathVista, MathVerse, Fast-dLLM++'s Table 3),
which ask GPT-4 to extract the answer (and, for MathVerse, to judge it). Here:

* multiple choice: the option letter the completion names last ("answer is (B)",
  "Answer: B", a bare ``B``), else the one option whose text the completion states; MathVista
  compares the chosen option's text with the answer, MathVerse the letter;
* numbers (MathVista ``integer`` / ``float``, MathVerse free-form answers that are numbers):
  the last number of the text after the last "answer is" / "Answer:" (else of the whole
  completion, else the last ``\\boxed{}``); integers compared as integers, floats rounded
  to the record's ``precision`` (MathVista) or within 1e-9 relative tolerance;
* other free-form answers: the extracted text, normalized
  ([`normalize_latex`][dlm_decode.tasks.competition_math.normalize_latex]), compared as
  strings; MathVista ``list`` answers as lists of numbers.

So a correct answer buried in prose that the rules cannot find is scored wrong where a GPT
judge would accept it, and a model is not credited for equivalent forms beyond what the
normalization covers: figures from here are a lower bound on the judged ones and not
directly comparable with the papers' numbers.
"""

from __future__ import annotations

import ast
import io
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from dlm_decode.tasks.base import Sample, Task
from dlm_decode.tasks.common import (
    STR,
    TaskDataError,
    check_records,
    extract_last_number,
    find_data_file,
    last_boxed,
    load_hub,
    load_records,
    numbers_equal,
    record_label,
)
from dlm_decode.tasks.competition_math import normalize_latex

__all__ = [
    "MathVerseTask",
    "MathVistaTask",
    "answer_span",
    "choose_option",
    "load_image_records",
    "resolve_image",
]

_ANSWER_RE = re.compile(r"(?:answer\s*(?:is|:)|答案)\s*[:：]?", re.IGNORECASE)
_LETTER_RE = re.compile(r"(?<![A-Za-z])\(?([A-Z])\)?(?![A-Za-z])")


def answer_span(text: str) -> str:
    """The part of a completion that states the answer: what follows the last "answer is"
    / "Answer:" (up to the end of that line), else the last ``\\boxed{}``, else the whole
    text."""
    matches = list(_ANSWER_RE.finditer(text))
    if matches:
        rest = text[matches[-1].end() :].strip()
        line = rest.split("\n", 1)[0].strip()
        if line:
            boxed = last_boxed(line)
            return boxed if boxed is not None else line
    boxed = last_boxed(text)
    return boxed if boxed is not None else text.strip()


def choose_option(text: str, options: Sequence[str]) -> int | None:
    """The index of the option a completion picks, or ``None``.

    The option letter named last in the answer span (``(B)``, ``B.``, ``B``; letters
    beyond the options are ignored); else the single option whose text the span contains
    (normalized, the longest when several match).

    Args:
        text: the completion.
        options: the option texts, in letter order (A, B, …).
    """
    span = answer_span(text)
    letters = [m.group(1) for m in _LETTER_RE.finditer(span)]
    letters = [c for c in letters if ord(c) - ord("A") < len(options)]
    if letters:
        return ord(letters[-1]) - ord("A")
    norm = normalize_latex(span).lower()
    hits = [(len(o), i) for i, o in enumerate(options) if o and normalize_latex(o).lower() in norm]
    return max(hits)[1] if hits else None


def resolve_image(value: Any, base: Path | None, label: str) -> Any:
    """A record's image as something ``PIL`` opens: a ``Path`` (checked to exist) or a
    ``PIL.Image``.

    Args:
        value: a path string, ``{"path": …}`` / ``{"bytes": …}``, or a ``PIL.Image``.
        base: folder that relative paths are relative to (the data file's), or ``None``.
        label: the record, for the message.

    Raises:
        TaskDataError: no image, or a path that does not exist (one line, with the fix).
    """
    if isinstance(value, dict):
        if value.get("bytes"):
            from PIL import Image

            return Image.open(io.BytesIO(value["bytes"]))
        value = value.get("path")
    if hasattr(value, "size") and hasattr(value, "mode"):  # a PIL.Image
        return value
    if isinstance(value, str) and value:
        path = Path(value).expanduser()
        if not path.is_absolute() and base is not None:
            path = base / path
        if not path.is_file():
            raise TaskDataError(
                f"{label}: image {value!r} not found (looked at {str(path)!r}); put the "
                f"images beside the data file (paths are relative to its folder) or fix the "
                f"record's image field"
            )
        return path
    raise TaskDataError(
        f"{label}: no image (field holds {type(value).__name__}); give a path, a "
        f'{{"path": ...}} / {{"bytes": ...}} object or a PIL image'
    )


def load_image_records(path: Path) -> list[dict[str, Any]]:
    """Records of a local file: JSON Lines, a JSON list, or a JSON object of records keyed
    by id (MathVista's ``testmini.json``; the key becomes ``pid`` when absent)."""
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            data = None
        if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
            return [{"pid": k, **v} for k, v in data.items()]
    return load_records(path)


class _ImageMathTask(Task):
    """Shared loading of the two benchmarks: hub or local file, images resolved up front."""

    hub: ClassVar[tuple[str, str | None, str]]
    local_names: ClassVar[tuple[str, ...]]
    image_fields: ClassVar[tuple[str, ...]] = ("decoded_image", "image")
    required: ClassVar[dict[str, Any]]
    optional: ClassVar[dict[str, Any]] = {}
    chat: ClassVar[bool] = True
    stop: ClassVar[tuple[str, ...]] = ("<|eot_id|>", "<|im_end|>", "</s>")

    def __init__(self, *, data_path: str | Path | None = None) -> None:
        self.data_file: Path | None = None
        if data_path is not None:
            self.data_file = find_data_file(data_path, self.local_names, what=self.name)
        self._recs: list[dict[str, Any]] | None = None

    def records(self) -> list[dict[str, Any]]:
        """The checked records, each with its image resolved under ``"_image"``."""
        if self._recs is not None:
            return self._recs
        if self.data_file is not None:
            recs, where = load_image_records(self.data_file), repr(str(self.data_file))
            base: Path | None = self.data_file.parent
        else:
            dataset, config, split = self.hub
            recs, where, base = (
                load_hub(dataset, config, [split], task=self.name)[split],
                "hub",
                None,
            )
        check_records(
            recs, task=self.name, where=where, required=self.required, optional=self.optional
        )
        for i, rec in enumerate(recs):
            label = f"{self.name}: {where} {record_label(i, rec)}"
            value = next((rec[f] for f in self.image_fields if rec.get(f) not in (None, "")), None)
            rec["_image"] = (
                None
                if value is None and self.image_optional(rec)
                else resolve_image(value, base, label)
            )
        self._recs = recs
        return recs

    def image_optional(self, rec: dict[str, Any]) -> bool:
        """Whether a record may come without an image (MathVerse's text-only version)."""
        return False

    def samples(self, limit: int | None = None) -> list[Sample]:
        """The problems (first ``limit``), each with its figure in ``images``."""
        recs = self.records()
        recs = recs if limit is None else recs[:limit]
        return [self.make_sample(i, r) for i, r in enumerate(recs)]

    def make_sample(self, index: int, rec: dict[str, Any]) -> Sample:  # pragma: no cover
        raise NotImplementedError


def _choices(rec: dict[str, Any]) -> list[str]:
    value = rec.get("choices")
    return [str(c) for c in value] if isinstance(value, list) else []


class MathVistaTask(_ImageMathTask):
    """MathVista testmini (1000 problems): figures with multiple-choice and free-form
    questions (integer, float with a precision, text, list answers).

    The prompt is the record's ``query`` (the benchmark's own prompt: hint, question,
    choices) when present, else one built from ``question``, ``choices``, ``unit`` and
    the answer type. ``family`` in the rows is the record's ``metadata.task`` (figure QA,
    geometry problem solving, math word problem, …), so the summary reports accuracy per
    task as the MathVista leaderboard does.

    Args:
        data_path: a local file (``testmini.json``, ``.jsonl``) or a folder holding one;
            default: the hub (``AI4Math/MathVista``, split ``testmini``).
    """

    name: ClassVar[str] = "mathvista"
    version: ClassVar[int] = 1
    hub: ClassVar[tuple[str, str | None, str]] = ("AI4Math/MathVista", None, "testmini")
    local_names: ClassVar[tuple[str, ...]] = ("testmini.json", "testmini.jsonl", "data.jsonl")
    required: ClassVar[dict[str, Any]] = {
        "question": STR,
        "answer": ((str, int, float), "a string or number"),
    }
    optional: ClassVar[dict[str, Any]] = {
        "pid": ((str, int), "a string or an integer"),
        "query": STR,
        "question_type": STR,
        "answer_type": STR,
        "unit": STR,
        "precision": ((int, float), "a number"),
        "choices": ((list,), "a list of strings"),
    }

    @staticmethod
    def build_query(rec: dict[str, Any]) -> str:
        """A prompt for a record without ``query``: the question, lettered choices, and
        what form the answer takes."""
        choices = _choices(rec)
        lines = [str(rec["question"]).strip()]
        if choices:
            lines.append("Choices:")
            lines += [f"({chr(65 + i)}) {c}" for i, c in enumerate(choices)]
            lines.append("Answer with the option's letter.")
        else:
            kind = rec.get("answer_type", "text")
            form = {
                "integer": "an integer",
                "float": f"a number with {int(rec.get('precision') or 1)} decimal place(s)",
                "list": "a Python list",
            }.get(kind, "a word or phrase")
            unit = f" in {rec['unit']}" if rec.get("unit") else ""
            lines.append(f"Answer with {form}{unit}.")
        return "\n".join(lines)

    def make_sample(self, index: int, rec: dict[str, Any]) -> Sample:
        meta = rec.get("metadata") if isinstance(rec.get("metadata"), dict) else {}
        pid = rec.get("pid", index)
        return Sample(
            id=f"mathvista/{pid}",
            prompt=str(rec.get("query") or self.build_query(rec)),
            reference=str(rec["answer"]),
            meta={
                "question_type": rec.get("question_type")
                or ("multi_choice" if _choices(rec) else "free_form"),
                "answer_type": rec.get("answer_type") or "text",
                "precision": rec.get("precision"),
                "choices": _choices(rec),
                "family": str(meta.get("task", rec.get("question_type") or "all")),
            },
            images=(rec["_image"],),
        )

    def score(self, sample: Sample, completion: str) -> dict[str, Any]:
        """Rule-based MathVista scoring (see the module docstring).

        Returns:
            ``correct``, ``extracted``, ``family``.
        """
        m, gold = sample.meta, sample.reference
        out: dict[str, Any] = {"family": m["family"]}
        if m["question_type"] == "multi_choice" and m["choices"]:
            pick = choose_option(completion, m["choices"])
            extracted = None if pick is None else m["choices"][pick]
            correct = extracted is not None and extracted.strip() == gold.strip()
        elif m["answer_type"] in ("integer", "float"):
            extracted = extract_last_number(answer_span(completion)) or extract_last_number(
                completion
            )
            correct = _numbers_match(extracted, gold, m["answer_type"], m["precision"])
        elif m["answer_type"] == "list":
            extracted = answer_span(completion)
            correct = _lists_match(extracted, gold)
        else:
            extracted = answer_span(completion)
            correct = normalize_latex(extracted).lower() == normalize_latex(gold).lower()
        out.update(correct=bool(correct), extracted=extracted)
        return out


def _numbers_match(pred: str | None, gold: str, kind: str, precision: Any) -> bool:
    if pred is None:
        return False
    try:
        p, g = float(pred), float(gold)
    except ValueError:
        return False
    if kind == "integer":
        return round(p) == p and int(p) == round(g)
    digits = int(precision) if isinstance(precision, (int, float)) else None
    if digits is not None:
        return round(p, digits) == round(g, digits)
    return numbers_equal(pred, gold)


def _lists_match(pred: str, gold: str) -> bool:
    def parse(text: str) -> list[str] | None:
        m = re.search(r"\[[^\[\]]*\]", text)
        if m is None:
            return None
        try:
            value = ast.literal_eval(m.group(0))
        except (ValueError, SyntaxError):
            return None
        return [str(v) for v in value] if isinstance(value, (list, tuple)) else None

    p, g = parse(pred), parse(gold)
    return (
        p is not None
        and g is not None
        and len(p) == len(g)
        and all(numbers_equal(a, b) for a, b in zip(p, g, strict=True))
    )


class MathVerseTask(_ImageMathTask):
    """MathVerse testmini: 788 math problems with diagrams, each in five versions that move
    information from the text into the figure (Text Dominant, Text Lite, Vision Intensive,
    Vision Dominant, Vision Only), 3940 samples in all.

    The prompt is the record's ``query_cot`` (with ``cot=True``) or ``query_wo`` (the
    benchmark's prompts), else its ``question``. ``family`` in the rows is the
    ``problem_version``, so the summary reports accuracy per version as the paper does.
    Multiple-choice answers are compared as option letters (the answer field is the
    letter); free-form ones as numbers when both sides are numbers, else as normalized
    strings.

    Args:
        data_path: a local file (``testmini.jsonl``, ``.json``) or a folder holding one;
            default: the hub (``AI4Math/MathVerse``, config and split ``testmini``).
        versions: keep only these ``problem_version`` values (default all).
        cot: use ``query_cot`` instead of ``query_wo``.

    Raises:
        ValueError: an empty ``versions``.
    """

    name: ClassVar[str] = "mathverse"
    version: ClassVar[int] = 1
    hub: ClassVar[tuple[str, str | None, str]] = ("AI4Math/MathVerse", "testmini", "testmini")
    local_names: ClassVar[tuple[str, ...]] = ("testmini.jsonl", "testmini.json", "data.jsonl")
    image_fields: ClassVar[tuple[str, ...]] = ("image",)
    required: ClassVar[dict[str, Any]] = {"question": STR, "answer": STR}
    optional: ClassVar[dict[str, Any]] = {
        "sample_index": ((str, int), "a string or an integer"),
        "problem_version": STR,
        "question_type": STR,
        "query_wo": STR,
        "query_cot": STR,
    }

    def __init__(
        self,
        *,
        data_path: str | Path | None = None,
        versions: Sequence[str] | None = None,
        cot: bool = False,
    ) -> None:
        super().__init__(data_path=data_path)
        if versions is not None and not list(versions):
            raise ValueError("mathverse: versions is empty; omit it for every version")
        self.versions = None if versions is None else [str(v) for v in versions]
        self.cot = bool(cot)

    def image_optional(self, rec: dict[str, Any]) -> bool:
        return str(rec.get("problem_version", "")).lower().startswith("text only")

    def records(self) -> list[dict[str, Any]]:
        recs = super().records()
        if self.versions is not None:
            known = sorted({str(r.get("problem_version")) for r in recs})
            recs = [r for r in recs if str(r.get("problem_version")) in self.versions]
            if not recs:
                raise TaskDataError(
                    f"mathverse: no record has problem_version in {self.versions}; the data "
                    f"holds {known}"
                )
        return recs

    def make_sample(self, index: int, rec: dict[str, Any]) -> Sample:
        prompt = rec.get("query_cot" if self.cot else "query_wo") or rec["question"]
        image = rec["_image"]
        return Sample(
            id=f"mathverse/{rec.get('sample_index', index)}",
            prompt=str(prompt),
            reference=str(rec["answer"]),
            meta={
                "question_type": str(rec.get("question_type", "free-form")),
                "family": str(rec.get("problem_version", "all")),
            },
            images=() if image is None else (image,),
        )

    def score(self, sample: Sample, completion: str) -> dict[str, Any]:
        """Rule-based MathVerse scoring (see the module docstring).

        Returns:
            ``correct``, ``extracted``, ``family``.
        """
        gold = sample.reference.strip()
        out: dict[str, Any] = {"family": sample.meta["family"]}
        if sample.meta["question_type"].startswith("multi") and re.fullmatch(r"[A-Z]", gold):
            span = answer_span(completion)
            letters = [m.group(1) for m in _LETTER_RE.finditer(span) if m.group(1) <= "H"]
            extracted = letters[-1] if letters else None
            correct = extracted == gold
        else:
            span = answer_span(completion)
            gold_num = extract_last_number(gold) if re.fullmatch(r"[-\d.,\s$]+", gold) else None
            if gold_num is not None:
                extracted = extract_last_number(span) or extract_last_number(completion)
                correct = numbers_equal(extracted, gold_num)
            else:
                extracted = span
                correct = normalize_latex(span).lower() == normalize_latex(gold).lower()
        out.update(correct=bool(correct), extracted=extracted)
        return out
