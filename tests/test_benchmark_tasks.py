"""Benchmark tasks: data loading, prompts, answer extraction, scoring, the CLI.

Gold-answer tests feed each benchmark's reference solutions back as completions; they use
the shared data in ``<checkout>/../shared/data`` and skip where it is absent. Measured on
that data: GSM8K 1319/1319 (flexible and strict), MATH-500 500/500 (reference answers and
full reference solutions, with math-verify and with the string-match fallback),
HumanEval 164/164 canonical solutions, MBPP 500/500 reference programs (task ids 11–510).
"""

from __future__ import annotations

import gzip
import json
import sys
import types
from pathlib import Path

import pytest

from dlm_decode.tasks.base import Sample, Task
from dlm_decode.tasks.codegen import HumanEvalTask, MbppTask, extract_code, humaneval_program
from dlm_decode.tasks.common import (
    TaskDataError,
    extract_last_number,
    last_boxed,
    load_hub,
    load_records,
    normalize_number,
    numbers_equal,
)
from dlm_decode.tasks.competition_math import (
    Math500Task,
    MathTask,
    answers_equivalent,
    extract_final_answer,
    math_verify_available,
    normalize_latex,
)
from dlm_decode.tasks.gsm8k import GSM8KTask, extract_strict

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _data(rel: str) -> Path:
    p = DATA / rel
    if not p.exists():
        pytest.skip(f"shared benchmark data not found at {p} (CI keeps shared/ beside the repo)")
    return p


# ---------------------------------------------------------------------------------------
# Extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 1,234.", "1234"),
        ("It dropped to -7 degrees, so the answer is -7", "-7"),
        ("She pays $18.00 in total.", "18"),
        ("12 - 4 = 8 apples", "8"),
        ("Half is .5 of it", "0.5"),
        ("x = 3.50", "3.5"),
        ("no numbers here", None),
        ("Step 1: 5 + 5 = 10\nStep 2: 10 * 2 = 20 cookies<|eot_id|>", "20"),
        ("#### 70,000", "70000"),
    ],
)
def test_last_number_extraction(text: str, expected: str | None) -> None:
    assert extract_last_number(text) == expected


def test_number_normalization() -> None:
    assert normalize_number("$1,234.50") == "1234.5"
    assert normalize_number("18.0") == "18"
    assert normalize_number("-0") == "0"
    assert normalize_number("007") == "7"
    assert numbers_equal("0.50", ".5") and numbers_equal("1,000", "1000.0")
    assert not numbers_equal("12", "13") and not numbers_equal(None, "1")


def test_gsm8k_strict_and_flexible_scoring() -> None:
    task = GSM8KTask(shots=0, data_path=None)
    s = Sample(id="x", prompt="", reference="1234")
    row = task.score(s, " She has 1,000 + 234 = 1,234 stickers.\n#### 1,234\n\nQuestion: next 99")
    assert row["correct"] and row["correct_strict"] and row["extracted"] == "1234"
    row = task.score(s, "The answer is 1,234.")
    assert row["correct"] and not row["correct_strict"] and row["extracted_strict"] is None
    row = task.score(s, "#### 1234 but then 5")
    assert row["correct_strict"] and not row["correct"]
    assert extract_strict("#### -$3.0") == "-3"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so it is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.", "\\frac{3}{4}"),
        ("The final answer is $x = \\boxed{1}$.", "1"),
        ("The final answer is 42. I hope it is correct.", "42"),
        ("final answer is \\boxed{(1, 2)}", "(1, 2)"),
        ("The final answer is $\\$18.90$.", "\\$18.90"),
        ("first \\boxed{1} then \\boxed{\\sqrt{2}}", "\\sqrt{2}"),
        ("nothing here", None),
    ],
)
def test_math_final_answer_extraction(text: str, expected: str | None) -> None:
    assert extract_final_answer(text) == expected


def test_last_boxed_matches_braces() -> None:
    assert last_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed 5") == "5"
    assert last_boxed("\\boxed{unclosed") is None


def test_math_equivalence_both_scorers() -> None:
    assert normalize_latex("\\dfrac{1}{2}") == normalize_latex("\\frac12")
    assert normalize_latex("\\text{(C)}") == "(C)"
    assert answers_equivalent("\\frac{1}{2}", "\\dfrac{1}{2}", use_math_verify=False)
    assert not answers_equivalent("\\frac{1}{2}", "0.5", use_math_verify=False)
    assert not answers_equivalent("3", None)
    if math_verify_available():
        assert answers_equivalent("\\frac{1}{2}", "0.5")
        assert answers_equivalent("x^2+1", "1+x^2")
        assert not answers_equivalent("\\frac{1}{2}", "\\frac{1}{3}")


def test_math_rows_name_their_scorer() -> None:
    s = Sample(id="m", prompt="", reference="\\frac{1}{2}", meta={"subject": "Algebra"})
    row = MathTask(scorer="string_match").score(s, "The final answer is $\\frac12$.")
    assert row["scorer"] == "string_match" and row["correct"]
    if math_verify_available():
        row = MathTask().score(s, "The final answer is $0.5$.\n\nProblem:\nmore $7$")
        assert row["scorer"] == "math_verify" and row["correct"] and row["extracted"] == "0.5"


FUNC_PROMPT = 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n'
FUNC_TEST = (
    "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
)

#: Completion styles a model may produce; every one must yield a passing program.
GOOD_COMPLETIONS = {
    "body": "    return a + b\n",
    "body_unindented": "return a + b",
    "body_then_fence": "    return a + b\n```\n\nThis returns the sum.",
    "chat_fenced": (
        "Sure! Here is the implementation:\n\n```python\ndef add(a: int, b: int) -> int:\n"
        "    return a + b\n```\n\nThe function adds its arguments.<|eot_id|>"
    ),
    "restated_unfenced_with_prose": (
        "def add(a, b):\n    return a + b\n\nThis function simply adds a and b.\n"
    ),
    "usage_examples": (
        "```python\ndef add(a, b):\n    return a + b\n\nprint(add(1, 2))\n"
        "assert add(1, 1) == 3\nif __name__ == '__main__':\n    add(input(), 1)\n```"
    ),
    "helper_function": (
        "```py\ndef _plus(x, y):\n    return x + y\n\n\ndef add(a, b):\n    return _plus(a, b)\n```"
    ),
    "body_then_prose": "    return a + b\n\nThis returns the sum of a and b.",
    "unindented_body_then_prose": "return a + b\n\nThis returns the sum.",
    "stray_word": "def add(a, b):\n    return a + b\nDone",
    "two_blocks": (
        "Example:\n```\n>>> add(1, 2)\n3\n```\nCode:\n```python\ndef add(a, b):\n"
        "    return a + b\n```"
    ),
}


def test_code_extraction_shapes() -> None:
    code = extract_code(GOOD_COMPLETIONS["chat_fenced"], entry_point="add")
    assert code.startswith("def add(") and "```" not in code and "Sure" not in code
    code = extract_code(GOOD_COMPLETIONS["usage_examples"], entry_point="add")
    assert "print" not in code and "assert" not in code and "__main__" not in code
    code = extract_code(GOOD_COMPLETIONS["two_blocks"], entry_point="add")
    assert code.startswith("def add(") and ">>>" not in code
    code = extract_code("import math\ndef f(x):\n    return x\n[DONE]\nblah", stops=("[DONE]",))
    assert code == "import math\ndef f(x):\n    return x\n"
    assert extract_code("I cannot solve this.") == ""
    sol, prog = humaneval_program(FUNC_PROMPT, "return a + b", FUNC_TEST, "add")
    assert sol == "    return a + b\n" and prog.endswith("check(add)\n")


def test_code_completion_styles_pass_in_the_sandbox() -> None:
    pytest.importorskip("dlm_decode.sandbox")
    task = HumanEvalTask(workers=2, timeout=10.0)
    sample = Sample(id="t/0", prompt=FUNC_PROMPT, reference=FUNC_TEST, meta={"entry_point": "add"})
    bad = {
        "wrong": "    return a - b\n",
        "prose_only": "I am not sure.",
        "loop": "    while True: pass",
    }
    names = [*GOOD_COMPLETIONS, *bad]
    comps = [*GOOD_COMPLETIONS.values(), *bad.values()]
    task.timeout = 3.0
    rows = task.score_batch([sample] * len(comps), comps)
    got = {n: r["correct"] for n, r in zip(names, rows, strict=True)}
    assert got == {n: n in GOOD_COMPLETIONS for n in names}, rows
    by_name = dict(zip(names, rows, strict=True))
    assert by_name["loop"]["status"] == "timeout"
    assert by_name["wrong"]["status"] == "failed" and "AssertionError" in by_name["wrong"]["error"]
    assert by_name["body"]["error"] is None


# ---------------------------------------------------------------------------------------
# Code tasks: every data record and option is checked before anything is decoded

HE_GOOD = {
    "task_id": "HumanEval/0",
    "prompt": FUNC_PROMPT,
    "test": FUNC_TEST,
    "entry_point": "add",
    "canonical_solution": "    return a + b\n",
}
MBPP_GOOD = {"task_id": 11, "text": "Add.", "code": "x = 1", "test_list": ["assert x == 1"]}


def _mbpp_recs(*extra: dict[str, object]) -> list[dict[str, object]]:
    shots = [dict(MBPP_GOOD, task_id=i) for i in MbppTask.shot_ids]
    return [*shots, MBPP_GOOD, *extra]


def _write_jsonl(path: Path, recs: list[dict[str, object]]) -> Path:
    # json.dumps escapes a lone surrogate as \ud800, which json.loads turns back into one.
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n", encoding="utf-8")
    return path


def test_code_task_data_loads_when_every_record_is_valid(tmp_path: Path) -> None:
    he = HumanEvalTask(data_path=_write_jsonl(tmp_path / "HumanEval.jsonl", [HE_GOOD]))
    assert [s.id for s in he.samples()] == ["HumanEval/0"]
    mb = MbppTask(data_path=_write_jsonl(tmp_path / "mbpp.jsonl", _mbpp_recs()))
    assert [s.id for s in mb.samples()] == ["mbpp/11"]


@pytest.mark.parametrize(
    ("bad", "parts"),
    [
        (
            dict(
                HE_GOOD,
                task_id="HumanEval/1",
                test="def check(f):\n    assert f(1, 1) == '\ud800'\n",
            ),
            (
                "record 1 (task_id 'HumanEval/1'): field 'test' holds a lone surrogate '\\ud800'",
                "not valid UTF-8",
                "repair that character",
            ),
        ),
        (
            dict(HE_GOOD, task_id="HumanEval/1", prompt="def add(a, b):\n    '''\udcff'''\n"),
            ("record 1 (task_id 'HumanEval/1'): field 'prompt' holds a lone surrogate",),
        ),
        (
            {k: v for k, v in HE_GOOD.items() if k != "test"},
            (
                "record 1 (task_id 'HumanEval/0') lacks the required field 'test'",
                "fix or drop that record",
            ),
        ),
        (
            dict(HE_GOOD, prompt=None),
            ("record 1 (task_id 'HumanEval/0') lacks the required field 'prompt'",),
        ),
        (
            dict(HE_GOOD, entry_point=["add"]),
            ("record 1 (task_id 'HumanEval/0'): field 'entry_point' must be a string, got list",),
        ),
        (
            dict(HE_GOOD, entry_point="add(1)"),
            ("field 'entry_point' must be a Python function name",),
        ),
        (
            dict(HE_GOOD, task_id=True),
            ("record 1: field 'task_id' must be a string or an integer",),
        ),
    ],
    ids=[
        "surrogate-test",
        "surrogate-prompt",
        "missing",
        "null",
        "wrong-type",
        "not-a-name",
        "bool-id",
    ],
)
def test_humaneval_bad_record_is_a_one_line_error_at_load(
    tmp_path: Path, bad: dict[str, object], parts: tuple[str, ...]
) -> None:
    path = _write_jsonl(tmp_path / "HumanEval.jsonl", [HE_GOOD, bad])
    task = HumanEvalTask(data_path=path)
    with pytest.raises(TaskDataError) as err:
        task.samples()  # the evaluator calls this before it decodes anything
    msg = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in msg, msg
    assert msg.startswith(f"humaneval: {str(path)!r} "), msg
    for part in parts:
        assert part in msg, (part, msg)


@pytest.mark.parametrize(
    ("bad", "parts"),
    [
        (
            dict(MBPP_GOOD, task_id=12, test_list=["assert x == 1", "assert '\ud800'"]),
            ("record 4 (task_id 12): field 'test_list'[1] holds a lone surrogate '\\ud800'",),
        ),
        (
            dict(MBPP_GOOD, task_id=12, test_setup_code="s = '\udfff'"),
            ("record 4 (task_id 12): field 'test_setup_code' holds a lone surrogate",),
        ),
        (
            dict(MBPP_GOOD, task_id=12, extra={"note": "\ud800"}),
            ("record 4 (task_id 12): field 'extra'['note'] holds a lone surrogate",),
        ),
        (
            dict(MBPP_GOOD, task_id=12, test_list=["assert True", 3]),
            (
                "record 4 (task_id 12): field 'test_list' must be a list of strings, got a list "
                "holding int",
            ),
        ),
        (
            dict(MBPP_GOOD, task_id=12, test_list="assert True"),
            ("field 'test_list' must be a list of strings, got str",),
        ),
        (dict(MBPP_GOOD, task_id=12, test_list=[]), ("field 'test_list' is empty",)),
        (
            {k: v for k, v in MBPP_GOOD.items() if k != "code"} | {"task_id": 12},
            ("record 4 (task_id 12) lacks the required field 'code'",),
        ),
        (dict(MBPP_GOOD, task_id="twelve"), ("field 'task_id' must be an integer",)),
        (dict(MBPP_GOOD), ("record 4 (task_id 11): task_id 11 appears twice",)),
    ],
    ids=[
        "surrogate-test",
        "surrogate-setup",
        "surrogate-nested",
        "list-of-int",
        "str-not-list",
        "empty-tests",
        "missing",
        "bad-id",
        "duplicate",
    ],
)
def test_mbpp_bad_record_is_a_one_line_error_at_load(
    tmp_path: Path, bad: dict[str, object], parts: tuple[str, ...]
) -> None:
    path = _write_jsonl(tmp_path / "mbpp.jsonl", _mbpp_recs(bad))
    task = MbppTask(data_path=path)
    with pytest.raises(TaskDataError) as err:
        task.samples()
    msg = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in msg, msg
    assert msg.startswith(f"mbpp: {str(path)!r} "), msg
    for part in parts:
        assert part in msg, (part, msg)


@pytest.mark.parametrize(
    ("kwargs", "kind", "name"),
    [
        ({"memory_mb": -1}, ValueError, "memory_mb"),
        ({"memory_mb": 1.5}, TypeError, "memory_mb"),
        ({"timeout": float("nan")}, ValueError, "timeout"),
        ({"timeout": 0}, ValueError, "timeout"),
        ({"workers": 0}, ValueError, "workers"),
    ],
)
@pytest.mark.parametrize("cls", [HumanEvalTask, MbppTask])
def test_code_task_bad_sandbox_options_fail_at_construction(
    cls: type, kwargs: dict[str, object], kind: type[Exception], name: str
) -> None:
    with pytest.raises(kind) as err:
        cls(**kwargs)
    assert str(err.value).startswith(f"{name} must be ") and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------
# Data loading


def test_load_records_formats(tmp_path: Path) -> None:
    recs = [{"a": 1}, {"a": 2}]
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    (tmp_path / "x.json").write_text(json.dumps(recs))
    (tmp_path / "y.json").write_text(json.dumps({"data": recs}))
    with gzip.open(tmp_path / "x.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in recs))
    for name in ("x.jsonl", "x.json", "y.json", "x.jsonl.gz"):
        assert load_records(tmp_path / name) == recs
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\nnot json\n')
    with pytest.raises(TaskDataError, match="line 2"):
        load_records(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "missing.jsonl")


def test_hub_failure_suggests_data_path(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("datasets")

    def load_dataset(*args: object, **kwargs: object) -> None:
        raise ConnectionError("offline")

    fake.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(TaskDataError, match="--data PATH") as err:
        load_hub("openai/gsm8k", "main", ["test"], task="gsm8k")
    assert "\n" not in str(err.value)
    with pytest.raises(TaskDataError, match="--data PATH"):
        GSM8KTask().samples(1)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(TaskDataError, match="dlm-decode\\[eval\\]"):
        HumanEvalTask().samples(1)


def test_missing_local_files_fail_at_construction(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GSM8KTask(data_path=tmp_path / "nope.jsonl")
    (tmp_path / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    with pytest.raises(FileNotFoundError, match="train"):
        GSM8KTask(data_path=tmp_path / "test.jsonl")  # 5-shot needs train.jsonl beside it
    assert len(GSM8KTask(shots=0, data_path=tmp_path).samples()) == 1
    with pytest.raises(ValueError):
        MbppTask(shots=4)
    with pytest.raises(ValueError):
        HumanEvalTask(shots=3)


def test_builtin_tasks_are_registered() -> None:
    from dlm_decode.evaluate import get_task
    from dlm_decode.registry import get_registry

    names = set(get_registry().names("task"))
    assert {"gsm8k", "math", "math500", "humaneval", "mbpp"} <= names
    assert isinstance(get_task("gsm8k", shots=8), GSM8KTask)


# ---------------------------------------------------------------------------------------
# Prompts


@pytest.mark.parametrize("shots", [5, 8])
def test_gsm8k_nshot_prompt_structure(shots: int) -> None:
    test_file = _data("gsm8k/test.jsonl")
    task = GSM8KTask(shots=shots, data_path=test_file)
    train_q = {r["question"] for r in load_records(test_file.parent / "train.jsonl")}
    test_q = {r["question"] for r in load_records(test_file)}
    examples = task.fewshot_examples()
    assert len(examples) == shots
    assert all(e["question"] in train_q and e["question"] not in test_q for e in examples)
    samples = task.samples(3)
    for s in samples:
        blocks = s.prompt.split("\n\n")
        assert len(blocks) == shots + 1
        assert blocks[-1] == f"Question: {s.meta['question'].strip()}\nAnswer:"
        assert all(b.startswith("Question: ") and "\n#### " in b for b in blocks[:-1])
        assert "<<" not in s.prompt  # calculator annotations removed from the examples
    assert samples[0].prompt.split("\n\n")[:-1] == samples[1].prompt.split("\n\n")[:-1]
    assert GSM8KTask(shots=shots, data_path=test_file).samples(1)[0].prompt == samples[0].prompt


def test_math_prompt_structure() -> None:
    task = Math500Task(data_path=_data("math/math500_test.jsonl"))
    s = task.samples(1)[0]
    parts = s.prompt.split("\n\nProblem:\n")
    assert len(parts) == 5 and parts[0].startswith("Problem:\n")  # 4 shots + the query
    assert s.prompt.count("I hope it is correct.") == 4
    assert s.prompt.endswith("\n\nSolution:") and s.id.startswith("test/")
    assert MathTask(shots=0, data_path=_data("math")).samples(1)[0].prompt.startswith("Problem:")


def test_mbpp_prompt_structure() -> None:
    task = MbppTask(data_path=_data("mbpp/mbpp.jsonl"))
    samples = task.samples()
    ids = [int(s.id.split("/")[1]) for s in samples]
    assert ids == list(range(11, 511))
    p = samples[0].prompt
    assert p.count("You are an expert Python programmer, and here is your task:") == 4
    assert p.count("[DONE]") == 3 and p.endswith("[BEGIN]\n")
    assert "similar_elements" in p and "is_not_prime" in p and "heap_queue_largest" in p
    assert "\r" not in p


# ---------------------------------------------------------------------------------------
# Gold solutions fed back


def test_gsm8k_gold_solutions_score_100_percent() -> None:
    task = GSM8KTask(data_path=_data("gsm8k/test.jsonl"))
    samples = task.samples()
    assert len(samples) == 1319
    rows = [task.score(s, s.meta["solution"]) for s in samples]
    assert sum(r["correct"] for r in rows) == 1319
    assert sum(r["correct_strict"] for r in rows) == 1319


@pytest.mark.parametrize("scorer", ["math_verify", "string_match"])
def test_math500_references_score_at_least_99_percent(scorer: str) -> None:
    if scorer == "math_verify" and not math_verify_available():
        pytest.skip("math-verify is not installed")
    task = Math500Task(data_path=_data("math/math500_test.jsonl"), scorer=scorer)
    samples = task.samples()
    assert len(samples) == 500
    answers = [
        f"Final Answer: The final answer is ${s.reference}$. I hope it is correct." for s in samples
    ]
    ok_answers = sum(task.score(s, a)["correct"] for s, a in zip(samples, answers, strict=True))
    ok_solutions = sum(task.score(s, s.meta["solution"])["correct"] for s in samples)
    # Measured: 500/500 for both. Two solutions say "the final answer is" mid-sentence
    # ("... is the larger of the two: $x=\boxed{1}$", "$5 + 4 + 2 = \boxed{11}.$"); the
    # extractor prefers the box inside that phrase, so they score too.
    assert ok_answers == 500
    assert ok_solutions >= 495


def test_math_full_references_extract() -> None:
    task = MathTask(data_path=_data("math/math_test.jsonl"))
    samples = task.samples()
    assert len(samples) == 5000 and all(s.reference for s in samples)


def test_code_reference_solutions_pass_at_least_99_percent() -> None:
    """HumanEval canonical solutions and MBPP reference code, batched with 2 workers.

    Measured: HumanEval 164/164, MBPP 500/500 (task ids 11–510; this copy of mbpp.jsonl
    has the fixed task 341, ``tuple(sorted(s))``). No failure to explain; the assertion
    allows 1% so a slow, overloaded CI machine (timeouts) does not fail the build, and any
    failure is listed in the message.
    """
    pytest.importorskip("dlm_decode.sandbox")
    he = HumanEvalTask(data_path=_data("humaneval/HumanEval.jsonl.gz"), workers=2, timeout=20.0)
    mb = MbppTask(data_path=_data("mbpp/mbpp.jsonl"), workers=2, timeout=20.0)
    he_s, mb_s = he.samples(), mb.samples()
    assert len(he_s) == 164 and len(mb_s) == 500
    he_rows = he.score_batch(he_s, [s.meta["canonical_solution"] for s in he_s])
    mb_rows = mb.score_batch(mb_s, [s.meta["code"] for s in mb_s])
    fails = [
        (s.id, r["status"], r["error"])
        for s, r in zip([*he_s, *mb_s], [*he_rows, *mb_rows], strict=True)
        if not r["correct"]
    ]
    assert sum(r["correct"] for r in he_rows) >= 163, fails
    assert sum(r["correct"] for r in mb_rows) >= 495, fails


# ---------------------------------------------------------------------------------------
# evaluate() and the CLI on a tiny random model


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dlm_decode.models.testing import write_char_tokenizer, write_random_checkpoint

    # max_length 4096: 5-shot GSM8K prompts are ~2-3k characters (= tokens here).
    folder = write_random_checkpoint(
        tmp_path_factory.mktemp("tiny") / "ckpt", "llada", seed=1, max_length=4096
    )
    write_char_tokenizer(folder)
    return folder


class _BatchScored(Task):
    name = "batch_scored_probe"
    chat = False

    def __init__(self) -> None:
        self.batches: list[int] = []

    def samples(self, limit: int | None = None) -> list[Sample]:
        return [Sample(id=str(i), prompt=f"Q{i}:", reference="") for i in range(limit or 5)]

    def score(self, sample: Sample, completion: str) -> dict[str, object]:
        raise AssertionError("evaluate() must call score_batch when the task has one")

    def score_batch(self, samples: list[Sample], completions: list[str]) -> list[dict]:
        self.batches.append(len(samples))
        return [
            {"correct": True, "extracted": c, "probe": s.id}
            for s, c in zip(samples, completions, strict=True)
        ]


def test_evaluate_uses_score_batch(tiny_checkpoint: Path) -> None:
    from dlm_decode.config import DecodeConfig
    from dlm_decode.evaluate import evaluate
    from dlm_decode.models import load_model

    model = load_model(tiny_checkpoint, device="cpu", dtype="float32")
    task = _BatchScored()
    cfg = DecodeConfig(gen_length=4, block_length=4)
    res = evaluate(model, task, cfg, limit=5, batch_size=2, progress=False)
    assert task.batches == [2, 2, 1]
    assert [r["probe"] for r in res.rows] == ["0", "1", "2", "3", "4"]
    assert res.summary["accuracy"] == 1.0


def test_cli_eval_gsm8k_writes_rows(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from dlm_decode.cli import main

    out = tmp_path / "rows.jsonl"
    argv = ["eval", "--task", "gsm8k", "--data", str(_data("gsm8k/test.jsonl")), "--limit", "2"]
    argv += ["--model", str(tiny_checkpoint), "--device", "cpu", "--dtype", "float32"]
    argv += ["--gen-length", "8", "--block-length", "4", "--output", str(out)]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["gsm8k/0", "gsm8k/1"]
    for r in rows:
        for key in ("prompt", "completion", "correct", "correct_strict", "extracted", "nfe"):
            assert key in r
        assert r["prompt"].count("Question: ") == 6  # 5 shots + the test question
        assert 0 <= r["response_tokens"] <= 8 and r["latency_share_s"] >= 0


def test_cli_missing_data_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dlm_decode.cli import main

    missing = tmp_path / "nowhere" / "test.jsonl"
    assert main(["eval", "--task", "gsm8k", "--data", str(missing), "--limit", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dlm-decode: error:") and str(missing) in err
    assert len(err.splitlines()) == 1
