"""Code generation: HumanEval (0-shot) and MBPP (3-shot), pass@1 in the sandbox.

Both tasks turn a completion into a program with
[`extract_code`][dlm_decode.tasks.codegen.extract_code], append the
benchmark's tests and run it with [`sandbox`][dlm_decode.sandbox] (``passed`` is correct;
``failed``, ``timeout`` and ``crashed`` are not).
[`score_batch`][dlm_decode.tasks.codegen.CodeTask.score_batch] runs a
whole batch of programs in parallel; [`evaluate`][dlm_decode.evaluate.evaluate] uses it.

Post-processing ([`extract_code`][dlm_decode.tasks.codegen.extract_code]) is the same for both
tasks:

1. cut the completion at the task's stop strings (``[DONE]`` for MBPP, chat end tokens);
2. if it holds Markdown fences, keep the fenced block that defines the entry point (else
   the first fenced block), or the text before the first fence when that is the code a
   base model was continuing;
3. without fences, drop leading prose up to the first line that starts code;
4. keep the longest prefix that parses as Python, then remove top-level
   ``if __name__ == "__main__":`` blocks, ``assert`` statements, ``print(...)`` calls and
   bare expressions (the model's own usage examples, which may be wrong or slow, and
   stray words of prose that happen to parse).

Every data record is checked when the data loads, before anything is decoded: required
fields present with the right types, and every string valid UTF-8 (a lone surrogate in a
test would otherwise abort the evaluation in the sandbox); a bad record raises a one-line
[`TaskDataError`][dlm_decode.tasks.common.TaskDataError] naming it.

HumanEval completions that restate the signature (``def entry_point(...)``) are appended
to the prompt as a new definition (the prompt's own stub stays valid Python and keeps its
imports and helper functions); completions that give only the body are appended to the
prompt, indented by four spaces when the model dropped the indentation.
"""

from __future__ import annotations

import ast
import re
import textwrap
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from dlm_decode.sandbox import ExecResult, check_limits, run_program, run_programs
from dlm_decode.tasks.base import Sample, Task
from dlm_decode.tasks.common import (
    ID,
    STR,
    STR_LIST,
    TaskDataError,
    assemble_nshot,
    check_records,
    find_data_file,
    load_hub,
    load_records,
    record_label,
    truncate_at,
)

__all__ = [
    "CodeTask",
    "HumanEvalTask",
    "MbppTask",
    "extract_code",
    "humaneval_program",
    "mbpp_program",
]

_FENCE_RE = re.compile(r"^[ \t]*```[^\n]*$", re.MULTILINE)
_CODE_START_RE = re.compile(
    r"^(?:def |async def |class |import |from \S+ import |@|[A-Za-z_][\w\[\], ]*\s*=[^=])"
)
#: Chat/end-of-text markers that end a completion's code.
_CHAT_STOPS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>", "<|end|>")


def _parse(source: str) -> ast.Module:
    """``ast.parse`` without the SyntaxWarnings of invalid escapes in model/reference code."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return ast.parse(source)


def _normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _defines(code: str, entry_point: str | None) -> bool:
    if not entry_point:
        return False
    pattern = rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\("
    return re.search(pattern, code, re.M) is not None


def _pick_fenced(text: str, entry_point: str | None) -> str:
    """The code part of a completion that contains Markdown fences."""
    parts = _FENCE_RE.split(text)
    inside = [parts[i] for i in range(1, len(parts), 2)]
    before = parts[0]
    candidates = [p for p in inside if p.strip()]
    lead = before.lstrip("\n")
    if lead.strip() and (lead[:1] in (" ", "\t") or _CODE_START_RE.match(lead)):
        candidates.insert(0, before)  # a base model continuing code, then a closing fence
    if not candidates:
        return ""
    for c in candidates:
        if _defines(c, entry_point):
            return c
    return candidates[0]


def _drop_leading_prose(text: str) -> str:
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        if line[:1] in (" ", "\t") or _CODE_START_RE.match(line) or line.startswith("#"):
            return "\n".join(lines[i:])
    return ""


def _parsable_prefix(head: str, code: str) -> str:
    """The longest line prefix of ``code`` such that ``head + code_prefix`` parses."""
    lines = code.split("\n")
    for n in range(len(lines), 0, -1):
        cand = "\n".join(lines[:n])
        try:
            _parse(head + cand)
        except (SyntaxError, ValueError):
            continue
        return cand
    return ""


def _is_usage_example(node: ast.stmt) -> bool:
    if isinstance(node, ast.Assert):
        return True
    if isinstance(node, ast.If):
        return "__name__" in ast.unparse(node.test)
    if isinstance(node, ast.Expr):
        if not isinstance(node.value, ast.Call):
            return True  # a bare name, string or comparison: no effect but a NameError
        f = node.value.func
        return isinstance(f, ast.Name) and f.id in ("print", "input")
    return False


def _drop_usage_examples(head: str, code: str) -> str:
    """Remove top-level asserts, prints and ``__main__`` blocks that ``code`` adds."""
    try:
        tree = _parse(head + code)
    except (SyntaxError, ValueError):
        return code
    first_line = head.count("\n") + 1
    lines = (head + code).split("\n")
    drop: set[int] = set()
    for node in tree.body:
        if node.lineno >= first_line and _is_usage_example(node):
            drop.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    if not drop:
        return code
    kept = [ln for i, ln in enumerate(lines, 1) if i >= first_line and i not in drop]
    out = "\n".join(kept)
    return out.rstrip() + "\n" if out.strip() else ""


def extract_code(
    completion: str,
    *,
    entry_point: str | None = None,
    stops: Sequence[str] = (),
    head: str = "",
) -> str:
    """Turn a model completion into Python source (see the module docstring).

    Args:
        completion: the raw completion.
        entry_point: the function the code must define, used to choose among several
            fenced blocks.
        stops: extra stop strings (the completion is cut at the first one).
        head: code the result will be appended to (the HumanEval prompt), ending with a
            newline; used only to decide what parses.

    Returns:
        The code with ``\\n`` line endings, ending with one newline; ``""`` when nothing
        usable is left.
    """
    if head and not head.endswith("\n"):
        head += "\n"
    text = _normalize_newlines(truncate_at(completion, (*stops, *_CHAT_STOPS)))
    if _FENCE_RE.search(text):
        code = _pick_fenced(text, entry_point)
        if not head and code.strip():
            code = textwrap.dedent(code)
    else:
        code = text if head else _drop_leading_prose(text)
    code = code.strip("\n")
    if not code.strip():
        return ""
    code = _parsable_prefix(head, code)
    code = _drop_usage_examples(head, code) if code.strip() else ""
    return code.rstrip("\n") + "\n" if code.strip() else ""


def _last_error_line(res: ExecResult) -> str | None:
    if res.status == "passed":
        return None
    if res.status == "timeout":
        return "timeout"
    lines = [ln for ln in (res.stderr or "").strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else res.status


class CodeTask(Task):
    """A code benchmark scored by running programs in the sandbox.

    Subclasses implement [`program`][dlm_decode.tasks.codegen.CodeTask.program] (completion →
    source) and the data loading.

    Args:
        timeout: wall-clock seconds per program (a finite number > 0).
        workers: programs run in parallel by
            [`score_batch`][dlm_decode.tasks.codegen.CodeTask.score_batch] (default: CPU
            count; else an int >= 1).
        memory_mb: address-space limit per program in MiB (an int; no "no limit" value).

    Raises:
        TypeError: an option of the wrong type (one line, naming it).
        ValueError: an option out of range (one line, naming it and the range).
    """

    chat: ClassVar[bool] = True

    def __init__(
        self, *, timeout: float = 10.0, workers: int | None = None, memory_mb: int = 1024
    ) -> None:
        self.timeout, self.memory_mb, self.workers = check_limits(
            timeout=timeout, memory_mb=memory_mb, workers=workers
        )

    def program(self, sample: Sample, completion: str) -> tuple[str, str]:
        """``(solution code, full test program)`` for a completion."""
        raise NotImplementedError

    def _row(self, code: str, res: ExecResult) -> dict[str, Any]:
        return {
            "correct": res.status == "passed",
            "extracted": code,
            "status": res.status,
            "error": _last_error_line(res),
        }

    def score(self, sample: Sample, completion: str) -> dict[str, Any]:
        """Run one program in the sandbox.

        Returns:
            ``correct`` (the tests passed), ``extracted`` (the solution code), ``status``
            (``passed``/``failed``/``timeout``/``crashed``) and ``error`` (the last line of
            stderr, ``None`` when passed).
        """
        code, prog = self.program(sample, completion)
        res = run_program(prog, timeout=self.timeout, memory_mb=self.memory_mb)
        return self._row(code, res)

    def score_batch(
        self, samples: Sequence[Sample], completions: Sequence[str], *, progress: bool = False
    ) -> list[dict[str, Any]]:
        """Score many completions with parallel sandboxes (same rows as
        [`score`][dlm_decode.tasks.codegen.CodeTask.score]).

        Args:
            samples: the samples.
            completions: one completion per sample.
            progress: show a progress bar.

        Raises:
            ValueError: ``samples`` and ``completions`` differ in length.
        """
        if len(samples) != len(completions):
            raise ValueError(f"{len(samples)} samples but {len(completions)} completions to score")
        built = [self.program(s, c) for s, c in zip(samples, completions, strict=True)]
        results = run_programs(
            [p for _, p in built],
            timeout=self.timeout,
            workers=self.workers,
            progress=progress,
            memory_mb=self.memory_mb,
        )
        return [self._row(code, res) for (code, _), res in zip(built, results, strict=True)]


# ------------------------------------------------------------------------------------
# HumanEval


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> tuple[str, str]:
    """Build the HumanEval program for a completion.

    Args:
        prompt: the problem's prompt (signature and docstring).
        completion: the model's completion (body only, or a whole function).
        test: the problem's test code (defines ``check``).
        entry_point: the function under test.

    Returns:
        ``(solution, program)``: the code appended to the prompt, and
        ``prompt + solution + test + check(entry_point)``.
    """
    prompt = _normalize_newlines(prompt)
    text = _normalize_newlines(completion)
    # Does the model restate the signature (fenced or not)?
    probe = extract_code(text, entry_point=entry_point)
    if _defines(probe, entry_point):
        head = prompt.rstrip("\n") + "\n\n\n"
        solution = extract_code(text, entry_point=entry_point, head=head)
    else:
        body = _pick_fenced(text, entry_point) if _FENCE_RE.search(text) else text
        body = truncate_at(body, _CHAT_STOPS).strip("\n")
        first = next((ln for ln in body.split("\n") if ln.strip()), "")
        if first and first[:1] not in (" ", "\t"):  # the model dropped the indentation
            body = textwrap.indent(body, "    ")
        head = prompt if prompt.endswith("\n") else prompt + "\n"
        solution = extract_code(body, entry_point=entry_point, head=head)
    program = f"{head}{solution}\n\n{test}\n\ncheck({entry_point})\n"
    return solution, program


class HumanEvalTask(CodeTask):
    """HumanEval (164 problems), 0-shot, pass@1.

    The prompt is the problem's signature and docstring, unchanged; instruct models receive
    it as one user turn through their chat template.

    Args:
        shots: must be 0 or ``None`` (HumanEval is zero-shot).
        data_path: ``HumanEval.jsonl`` or ``HumanEval.jsonl.gz``, or a folder holding one;
            default: the hub (``openai/openai_humaneval``).
        timeout: wall-clock seconds per program.
        workers: parallel programs in
            [`score_batch`][dlm_decode.tasks.codegen.CodeTask.score_batch].
        memory_mb: address-space limit per program.

    Raises:
        ValueError: ``shots`` other than 0, or ``timeout`` / ``memory_mb`` / ``workers``
            out of range (``TypeError`` for a wrong type).
        FileNotFoundError: ``data_path`` does not exist.
    """

    name: ClassVar[str] = "humaneval"
    version: ClassVar[int] = 1
    hub: ClassVar[tuple[str, str | None]] = ("openai/openai_humaneval", None)

    def __init__(
        self,
        *,
        shots: int | None = None,
        data_path: str | Path | None = None,
        timeout: float = 10.0,
        workers: int | None = None,
        memory_mb: int = 1024,
    ) -> None:
        super().__init__(timeout=timeout, workers=workers, memory_mb=memory_mb)
        if shots not in (None, 0):
            raise ValueError(f"humaneval is zero-shot; got shots={shots}")
        self.data_file = (
            find_data_file(data_path, ["HumanEval.jsonl", "HumanEval.jsonl.gz"], what="HumanEval")
            if data_path is not None
            else None
        )
        self._records: list[dict[str, Any]] | None = None

    def _load(self) -> list[dict[str, Any]]:
        """Load and check every record (see `check_records`) before anything decodes."""
        if self._records is None:
            if self.data_file is not None:
                recs = load_records(self.data_file)
                where = repr(str(self.data_file))
            else:
                recs = list(load_hub(*self.hub, ["test"], task=self.name)["test"])
                where = f"hub dataset {self.hub[0]}"
            check_records(
                recs,
                task=self.name,
                where=where,
                required={"task_id": ID, "prompt": STR, "test": STR, "entry_point": STR},
                optional={"canonical_solution": STR},
            )
            for i, r in enumerate(recs):
                if not r["entry_point"].isidentifier():
                    raise TaskDataError(
                        f"{self.name}: {where} {record_label(i, r)}: field 'entry_point' must "
                        f"be a Python function name, got {r['entry_point']!r:.60}; fix or drop "
                        f"that record"
                    )
            self._records = recs
        return self._records

    def samples(self, limit: int | None = None) -> list[Sample]:
        """The problems (first ``limit``); ``meta`` holds test, entry point and solution.

        Raises:
            TaskDataError: a record lacks ``task_id``, ``prompt``, ``test`` or
                ``entry_point``, has one of the wrong type, or holds text that is not valid
                UTF-8 (one line naming the record, the field and the fix); every record is
                checked when the data loads, before anything is decoded.
        """
        recs = self._load()
        recs = recs if limit is None else recs[:limit]
        return [
            Sample(
                id=str(r["task_id"]),
                prompt=r["prompt"],
                reference=r["test"],
                meta={
                    "entry_point": r["entry_point"],
                    "canonical_solution": r.get("canonical_solution"),
                },
            )
            for r in recs
        ]

    def program(self, sample: Sample, completion: str) -> tuple[str, str]:
        """``(solution, program)`` via
        [`humaneval_program`][dlm_decode.tasks.codegen.humaneval_program]."""
        return humaneval_program(
            sample.prompt, completion, sample.reference, sample.meta["entry_point"]
        )


# ------------------------------------------------------------------------------------
# MBPP


def mbpp_program(completion: str, test_setup_code: str, tests: Sequence[str]) -> tuple[str, str]:
    """Build the MBPP program for a completion.

    Args:
        completion: the model's completion.
        test_setup_code: the problem's setup code (usually empty).
        tests: the problem's ``assert`` lines.

    Returns:
        ``(solution, program)``: the extracted code and ``code + setup + asserts``.
    """
    code = extract_code(completion, stops=("[DONE]",))
    setup = _normalize_newlines(test_setup_code or "")
    program = f"{code}\n\n{setup}\n\n" + "\n".join(_normalize_newlines(t) for t in tests) + "\n"
    return code, program


def _mbpp_query(record: dict[str, Any]) -> str:
    tests = "\n".join(record["test_list"])
    return (
        f"You are an expert Python programmer, and here is your task: {record['text']} "
        f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n"
    )


class MbppTask(CodeTask):
    """MBPP test split (task ids 11–510, 500 problems), 3-shot, pass@1.

    Prompt: tasks 2, 3 and 4 as worked examples, each ``You are an expert Python
    programmer, and here is your task: <text> Your code should pass these tests:`` with its
    three asserts, then ``[BEGIN]``, the reference code and ``[DONE]``; the test problem
    ends with ``[BEGIN]`` and the completion is cut at ``[DONE]``.

    Args:
        shots: worked examples (0–3, default 3).
        data_path: ``mbpp.jsonl`` (all 974 tasks, or at least ids 2–4 and 11–510), or a
            folder holding it; default: the hub (``google-research-datasets/mbpp``,
            config ``full``).
        timeout: wall-clock seconds per program.
        workers: parallel programs in
            [`score_batch`][dlm_decode.tasks.codegen.CodeTask.score_batch].
        memory_mb: address-space limit per program.

    Raises:
        ValueError: ``shots`` outside 0–3, or ``timeout`` / ``memory_mb`` / ``workers``
            out of range (``TypeError`` for a wrong type).
        FileNotFoundError: ``data_path`` does not exist.
    """

    name: ClassVar[str] = "mbpp"
    version: ClassVar[int] = 1
    hub: ClassVar[tuple[str, str | None]] = ("google-research-datasets/mbpp", "full")
    #: Task ids of the worked examples, in prompt order.
    shot_ids: ClassVar[tuple[int, ...]] = (2, 3, 4)
    #: Task ids of the test split.
    test_ids: ClassVar[range] = range(11, 511)

    def __init__(
        self,
        *,
        shots: int | None = None,
        data_path: str | Path | None = None,
        timeout: float = 10.0,
        workers: int | None = None,
        memory_mb: int = 1024,
    ) -> None:
        super().__init__(timeout=timeout, workers=workers, memory_mb=memory_mb)
        self.shots = len(self.shot_ids) if shots is None else int(shots)
        if not 0 <= self.shots <= len(self.shot_ids):
            raise ValueError(
                f"mbpp: shots must be between 0 and {len(self.shot_ids)} (task ids "
                f"{', '.join(map(str, self.shot_ids))}), got {self.shots}"
            )
        self.data_file = (
            find_data_file(data_path, ["mbpp.jsonl", "mbpp.json"], what="MBPP")
            if data_path is not None
            else None
        )
        self._by_id: dict[int, dict[str, Any]] | None = None

    def _load(self) -> dict[int, dict[str, Any]]:
        """Load and check every record (see `check_records`) before anything decodes."""
        if self._by_id is None:
            if self.data_file is not None:
                recs = load_records(self.data_file)
                where = repr(str(self.data_file))
            else:
                splits = load_hub(*self.hub, ["prompt", "test"], task=self.name)
                recs = [r for split in splits.values() for r in split]
                where = f"hub dataset {self.hub[0]}"
            check_records(
                recs,
                task=self.name,
                where=where,
                required={"task_id": ID, "text": STR, "code": STR, "test_list": STR_LIST},
                optional={"test_setup_code": STR, "challenge_test_list": STR_LIST},
            )
            by_id: dict[int, dict[str, Any]] = {}
            for i, r in enumerate(recs):
                label = f"{self.name}: {where} {record_label(i, r)}"
                tid = r["task_id"]
                if isinstance(tid, str) and not (tid.isascii() and tid.isdigit()):
                    raise TaskDataError(
                        f"{label}: field 'task_id' must be an integer (or a string of digits), "
                        f"got {tid!r:.60}; fix or drop that record"
                    )
                if not r["test_list"]:
                    raise TaskDataError(
                        f"{label}: field 'test_list' is empty, so any program would pass; "
                        f"give the task's asserts or drop that record"
                    )
                if int(tid) in by_id:
                    raise TaskDataError(
                        f"{label}: task_id {int(tid)} appears twice; keep one of the two records"
                    )
                by_id[int(tid)] = r
            self._by_id = by_id
            missing = [i for i in self.shot_ids[: self.shots] if i not in self._by_id]
            if missing:
                raise TaskDataError(
                    f"mbpp: the data lacks the worked-example tasks {missing}; give the full "
                    f"mbpp.jsonl or use --shots 0"
                )
        return self._by_id

    def fewshot_examples(self) -> list[dict[str, Any]]:
        """The records of the worked examples (task ids 2, 3, 4 for 3 shots)."""
        by_id = self._load()
        return [by_id[i] for i in self.shot_ids[: self.shots]]

    def build_prompt(self, record: dict[str, Any]) -> str:
        """The n-shot prompt for one MBPP record."""
        shots = [
            (_mbpp_query(r), _normalize_newlines(r["code"]).strip() + "\n[DONE]")
            for r in self.fewshot_examples()
        ]
        return assemble_nshot(shots, _mbpp_query(record))

    def samples(self, limit: int | None = None) -> list[Sample]:
        """The test problems 11–510 present in the data (first ``limit``).

        Raises:
            TaskDataError: a record lacks ``task_id``, ``text``, ``code`` or ``test_list``,
                has one of the wrong type or an empty ``test_list``, repeats a task id, or
                holds text that is not valid UTF-8 (one line naming the record, the field
                and the fix); every record is checked when the data loads, before anything
                is decoded.
        """
        by_id = self._load()
        recs = [by_id[i] for i in self.test_ids if i in by_id]
        if not recs:
            raise TaskDataError("mbpp: the data holds none of the test task ids 11–510")
        recs = recs if limit is None else recs[:limit]
        return [
            Sample(
                id=f"mbpp/{r['task_id']}",
                prompt=self.build_prompt(r),
                reference=list(r["test_list"]),
                meta={"test_setup_code": r.get("test_setup_code", ""), "code": r["code"]},
            )
            for r in recs
        ]

    def program(self, sample: Sample, completion: str) -> tuple[str, str]:
        """``(solution, program)`` via [`mbpp_program`][dlm_decode.tasks.codegen.mbpp_program]."""
        return mbpp_program(completion, sample.meta["test_setup_code"], sample.reference)
