"""MATH (Hendrycks et al., 5000 test problems) and MATH-500, 4-shot Minerva-style.

Prompt: four worked examples written for this project (``EXEMPLARS``), then the test
problem::

    Problem:
    <problem>

    Solution:
    <worked solution>
    Final Answer: The final answer is $<answer>$. I hope it is correct.

    ...

    Problem:
    <test problem>

    Solution:

Scoring: the completion is cut at the next ``Problem:``; the answer is the text after the
last "final answer is" (between ``$`` signs when present), else the content of the last
``\\boxed{}``. The gold answer is MATH-500's ``answer`` field, or the last ``\\boxed{}``
of the reference solution. Equivalence is decided by ``math-verify`` (symbolic, via
sympy) when it is installed, otherwise by exact match of normalized strings; every row
names the scorer it used (``"scorer": "math_verify"`` or ``"string_match"``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

from dlm_decode.tasks.base import Sample, Task
from dlm_decode.tasks.common import (
    STR,
    TaskDataError,
    assemble_nshot,
    check_records,
    find_data_file,
    last_boxed,
    load_hub,
    load_records,
    normalize_number,
    truncate_at,
)

__all__ = [
    "EXEMPLARS",
    "Math500Task",
    "MathTask",
    "answers_equivalent",
    "extract_final_answer",
    "math_verify_available",
    "normalize_latex",
]

#: The four worked examples of the prompt: ``(problem, solution, answer)``. Written for
#: this project in the Minerva answer format; short, with integer, fraction and
#: expression answers.
EXEMPLARS: tuple[tuple[str, str, str], ...] = (
    (
        "What is the sum of the solutions of $x^2 - 7x + 12 = 0$?",
        "The quadratic factors as $(x-3)(x-4)=0$, so the solutions are $x=3$ and $x=4$. "
        "Their sum is $3+4=7$.",
        "7",
    ),
    (
        "Compute $\\frac{2}{3} + \\frac{3}{4}$.",
        "Over the common denominator $12$ this is $\\frac{8}{12}+\\frac{9}{12}=\\frac{17}{12}$.",
        "\\frac{17}{12}",
    ),
    (
        "A box holds 3 green and 5 yellow balls. Two balls are taken out at random without "
        "replacement. What is the probability that both are green? Express your answer as "
        "a common fraction.",
        "The first ball is green with probability $\\frac{3}{8}$, and then the second one "
        "is green with probability $\\frac{2}{7}$. Both are green with probability "
        "$\\frac{3}{8}\\cdot\\frac{2}{7}=\\frac{6}{56}=\\frac{3}{28}$.",
        "\\frac{3}{28}",
    ),
    (
        "Expand $(x+3)(x-5)$.",
        "Distributing, $(x+3)(x-5)=x^2-5x+3x-15=x^2-2x-15$.",
        "x^2-2x-15",
    ),
)

_FINAL_RE = re.compile(r"final answer is", re.IGNORECASE)


def math_verify_available() -> bool:
    """Whether the ``math-verify`` package can be imported."""
    try:
        import math_verify  # noqa: F401
    except ImportError:
        return False
    return True


def _strip_wrappers(ans: str) -> str:
    ans = ans.strip()
    inner = last_boxed(ans)
    if inner is not None:  # "$x = \boxed{1}$": the box is the answer
        ans = inner
    return ans.strip()


def extract_final_answer(text: str) -> str | None:
    """The final answer of a MATH solution, as LaTeX (``None`` when there is none).

    Looks for the last "final answer is" (case-insensitive): the answer is the text
    between the next pair of unescaped ``$`` signs, or, without a ``$``, the last
    ``\\boxed{}`` of the rest of the line, or that line up to ". I hope" or a trailing full
    stop. Falls back to the content of the last
    ``\\boxed{}``/``\\fbox{}``.

    Args:
        text: a completion or a reference solution.

    Returns:
        The answer text, stripped (when it holds a ``\\boxed{}``, that box's content).
    """
    matches = list(_FINAL_RE.finditer(text))
    if matches:
        rest = text[matches[-1].end() :].lstrip(" :")
        ans: str | None = None
        if rest.startswith("$"):
            body = rest[2:] if rest.startswith("$$") else rest[1:]
            m = re.search(r"(?<!\\)\$", body)
            ans = body[: m.start()] if m else body.split("\n", 1)[0]
        else:
            line = rest.split("\n", 1)[0]
            line = re.split(r"\.?\s*I hope", line, maxsplit=1)[0]
            boxed = last_boxed(line)
            ans = boxed if boxed is not None else line.rstrip().rstrip(".")
        ans = _strip_wrappers(ans) if ans is not None else None
        if ans:
            return ans
    boxed = last_boxed(text)
    return boxed.strip() if boxed is not None else None


def _unwrap_command(s: str, command: str) -> str:
    """Replace ``\\command{X}`` by ``X`` (braces matched), everywhere in ``s``."""
    out = []
    i = 0
    token = "\\" + command + "{"
    while True:
        j = s.find(token, i)
        if j < 0:
            out.append(s[i:])
            return "".join(out)
        out.append(s[i:j])
        k = j + len(token)
        depth = 1
        while k < len(s) and depth:
            depth += {"{": 1, "}": -1}.get(s[k], 0)
            k += 1
        out.append(s[j + len(token) : k - 1] if depth == 0 else s[j + len(token) :])
        i = k


def normalize_latex(ans: str) -> str:
    """A canonical string for exact-match comparison of MATH answers.

    Removes spacing commands, ``\\left``/``\\right``, dollar signs, degree marks,
    percent signs, ``\\text{}``/``\\mbox{}`` wrappers, a leading ``x =``; rewrites
    ``\\dfrac``/``\\tfrac`` as ``\\frac`` and ``\\frac12`` as ``\\frac{1}{2}``; normalizes
    plain numbers (``0.50`` → ``0.5``, ``1,000`` → ``1000``); drops all whitespace.

    Args:
        ans: an extracted answer.

    Returns:
        The normalized string.
    """
    s = ans.strip()
    for cmd in ("text", "textbf", "mbox", "mathrm", "boxed"):
        s = _unwrap_command(s, cmd)
    for old, new in (
        ("\\left", ""),
        ("\\right", ""),
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("\\:", ""),
        ("\\ ", ""),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("^\\circ", ""),
        ("^{\\circ}", ""),
        ("\\%", ""),
        ("%", ""),
        ("\\$", ""),
        ("$", ""),
    ):
        s = s.replace(old, new)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    if re.fullmatch(r"-?[\d,]*\.?\d+", s):
        s = normalize_number(s)
    return s


def _parse(ans: str) -> list[Any]:
    from math_verify import parse

    return parse("\\boxed{" + ans + "}")


def answers_equivalent(gold: str, pred: str | None, *, use_math_verify: bool = True) -> bool:
    """Whether ``pred`` is the same answer as ``gold``.

    Equal normalized strings
    ([`normalize_latex`][dlm_decode.tasks.competition_math.normalize_latex]) always count;
    otherwise, when
    ``use_math_verify``, ``math_verify.verify`` decides (symbolic equivalence).

    Args:
        gold: the reference answer (LaTeX).
        pred: the extracted answer, or ``None``.
        use_math_verify: allow the symbolic check (needs ``math-verify``).
    """
    if pred is None or not pred.strip():
        return False
    if normalize_latex(gold) == normalize_latex(pred):
        return True
    if not use_math_verify:
        return False
    from math_verify import verify

    try:
        g, p = _parse(gold), _parse(pred)
        return bool(g and p and verify(g, p))
    except Exception:  # math-verify/sympy can raise on odd input; treat as no match
        return False


class MathTask(Task):
    """The MATH test set (5000 problems), 4-shot Minerva-style.

    Args:
        shots: worked examples in the prompt (0–4, default 4).
        data_path: a local ``.jsonl``/``.json(.gz)`` file with ``problem`` and ``solution``
            (and optionally ``answer``), or a folder holding ``local_names``; default:
            the hub.
        scorer: ``"math_verify"`` or ``"string_match"``; default ``math_verify`` when it is
            installed.

    Raises:
        ValueError: ``shots`` outside 0–4, unknown ``scorer``, or ``math_verify`` asked for
            but not installed.
        FileNotFoundError: ``data_path`` does not exist.
    """

    name: ClassVar[str] = "math"
    version: ClassVar[int] = 1
    chat: ClassVar[bool] = True
    default_shots: ClassVar[int] = 4
    #: File names looked for when ``data_path`` is a folder.
    local_names: ClassVar[tuple[str, ...]] = ("math_test.jsonl", "test.jsonl")
    #: Hub sources tried in order: ``(dataset id, configs, split)``; the records of all
    #: configs are concatenated.
    hub_sources: ClassVar[tuple[tuple[str, tuple[str | None, ...], str], ...]] = (
        ("hendrycks/competition_math", (None,), "test"),
        (
            "EleutherAI/hendrycks_math",
            (
                "algebra",
                "counting_and_probability",
                "geometry",
                "intermediate_algebra",
                "number_theory",
                "prealgebra",
                "precalculus",
            ),
            "test",
        ),
    )
    #: The completion is cut at the first of these before the answer is extracted.
    stop: ClassVar[tuple[str, ...]] = ("\nProblem:", "</s>", "<|im_end|>", "<|eot_id|>")

    def __init__(
        self,
        *,
        shots: int | None = None,
        data_path: str | Path | None = None,
        scorer: str | None = None,
    ) -> None:
        self.shots = self.default_shots if shots is None else int(shots)
        if not 0 <= self.shots <= len(EXEMPLARS):
            raise ValueError(
                f"{self.name}: shots must be between 0 and {len(EXEMPLARS)}, got {self.shots}"
            )
        have = math_verify_available()
        if scorer is None:
            scorer = "math_verify" if have else "string_match"
        if scorer not in ("math_verify", "string_match"):
            raise ValueError(f"{self.name}: scorer must be math_verify or string_match")
        if scorer == "math_verify" and not have:
            raise ValueError(
                f"{self.name}: scorer='math_verify' needs the math-verify package "
                f"(pip install 'dlm-decode[eval]')"
            )
        self.scorer = scorer
        self.data_file = (
            find_data_file(data_path, self.local_names, what=f"{self.name} test")
            if data_path is not None
            else None
        )
        self._records: list[dict[str, Any]] | None = None

    def _load(self) -> list[dict[str, Any]]:
        if self._records is not None:
            return self._records
        if self.data_file is not None:
            recs = load_records(self.data_file)
        else:
            errors: list[str] = []
            recs = []
            for dataset, configs, split in self.hub_sources:
                try:
                    for cfg in configs:
                        recs.extend(load_hub(dataset, cfg, [split], task=self.name)[split])
                    break
                except TaskDataError as exc:
                    errors.append(str(exc))
                    recs = []
            if not recs:
                raise TaskDataError(errors[-1] if errors else f"{self.name}: no data")
        check_records(
            recs,
            task=self.name,
            where=repr(str(self.data_file)) if self.data_file else "hub data",
            required={"problem": STR},
            optional={"solution": STR, "answer": STR},
        )
        for i, r in enumerate(recs):
            if not (isinstance(r.get("answer"), str) and r["answer"].strip()) and (
                last_boxed(r.get("solution") or "") is None
            ):
                raise TaskDataError(
                    f"{self.name} record {i} has neither an 'answer' nor a \\boxed{{}} "
                    f"answer in its 'solution'; fix or drop that record"
                )
        self._records = recs
        return recs

    @staticmethod
    def format_problem(problem: str) -> str:
        """``Problem:\\n…\\n\\nSolution:`` (the model continues after ``Solution:``)."""
        return f"Problem:\n{problem.strip()}\n\nSolution:"

    def build_prompt(self, problem: str) -> str:
        """The n-shot prompt for ``problem``."""
        shots = [
            (
                self.format_problem(p),
                f"\n{s}\nFinal Answer: The final answer is ${a}$. I hope it is correct.",
            )
            for p, s, a in EXEMPLARS[: self.shots]
        ]
        return assemble_nshot(shots, self.format_problem(problem))

    @staticmethod
    def reference_answer(record: dict[str, Any]) -> str:
        """The gold answer: the ``answer`` field, else the last ``\\boxed{}`` of the solution.

        Raises:
            TaskDataError: neither is present.
        """
        ans = record.get("answer")
        if isinstance(ans, str) and ans.strip():
            return ans.strip()
        boxed = last_boxed(record.get("solution", ""))
        if boxed is None:
            raise TaskDataError(f"MATH record without an answer: {record.get('problem')!r}")
        return boxed.strip()

    def _sample_id(self, record: dict[str, Any], i: int) -> str:
        if record.get("unique_id"):
            return str(record["unique_id"])
        return f"{self.name}/{record.get('idx', i)}"

    def samples(self, limit: int | None = None) -> list[Sample]:
        """The test problems (first ``limit``), each with its n-shot prompt."""
        recs = self._load()
        recs = recs if limit is None else recs[:limit]
        return [
            Sample(
                id=self._sample_id(r, i),
                prompt=self.build_prompt(r["problem"]),
                reference=self.reference_answer(r),
                meta={
                    "subject": r.get("subject", r.get("type")),
                    "level": r.get("level"),
                    "solution": r.get("solution"),
                },
            )
            for i, r in enumerate(recs)
        ]

    def score(self, sample: Sample, completion: str) -> dict[str, Any]:
        """Extract the final answer and compare it with the reference.

        Returns:
            ``correct``, ``extracted``, ``scorer`` and the problem's ``subject``/``level``.
        """
        text = truncate_at(completion, self.stop)
        pred = extract_final_answer(text)
        ok = answers_equivalent(
            sample.reference, pred, use_math_verify=self.scorer == "math_verify"
        )
        return {
            "correct": ok,
            "extracted": pred,
            "scorer": self.scorer,
            "subject": sample.meta.get("subject"),
            "level": sample.meta.get("level"),
        }


class Math500Task(MathTask):
    """MATH-500, the 500-problem subset of the MATH test set (PRM800K split), 4-shot.

    Same prompt and scoring as [`MathTask`][dlm_decode.tasks.competition_math.MathTask]; data from
    ``HuggingFaceH4/MATH-500`` or a
    local ``math500_test.jsonl``.
    """

    name: ClassVar[str] = "math500"
    version: ClassVar[int] = 1
    local_names: ClassVar[tuple[str, ...]] = ("math500_test.jsonl", "test.jsonl")
    hub_sources: ClassVar[tuple[tuple[str, tuple[str | None, ...], str], ...]] = (
        ("HuggingFaceH4/MATH-500", (None,), "test"),
    )
