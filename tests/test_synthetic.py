"""The synthetic task suite of the tiny model: generator, split, scoring, tokenizer."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import dlm_decode.evaluate
from dlm_decode.tasks.synthetic import (
    FAMILIES,
    HELDOUT_SIZE,
    SPECIAL_TOKENS,
    SyntheticTask,
    build_tokenizer,
    heldout_problems,
    make_problem,
    prompt_hash,
    score_problem,
    train_stream,
    validation_problems,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The character tokenizer, saved and reloaded through ``AutoTokenizer``."""
    from transformers import AutoTokenizer

    folder: Path = tmp_path_factory.mktemp("tok")
    build_tokenizer(folder)
    return AutoTokenizer.from_pretrained(str(folder))


def test_generator_is_deterministic_for_a_seed() -> None:
    a = [make_problem(random.Random(7)) for _ in range(3)]
    b = [make_problem(random.Random(7)) for _ in range(3)]
    assert a == b
    s1, s2 = train_stream(3), train_stream(3)
    assert list(itertools.islice(s1, 50)) == list(itertools.islice(s2, 50))
    assert list(itertools.islice(train_stream(4), 50)) != list(itertools.islice(s1, 50))


def test_heldout_is_fixed_distinct_and_interleaved() -> None:
    held = heldout_problems()
    assert len(held) == HELDOUT_SIZE >= 500
    assert len({p.prompt for p in held}) == len(held)
    fams = list(FAMILIES)
    assert [p.family for p in held[: 2 * len(fams)]] == fams + fams
    counts = Counter(p.family for p in held)
    assert set(counts) == set(FAMILIES) and min(counts.values()) == HELDOUT_SIZE // len(fams)
    samples = SyntheticTask().samples(limit=200)
    assert len(samples) == 200 and {s.meta["family"] for s in samples} == set(FAMILIES)
    assert [s.prompt for s in samples] == [p.prompt for p in held[:200]]


def test_adding_hide_kept_the_version_1_problems() -> None:
    """The five families of version 1 keep their held-out problems (first of each below)."""
    held = [p for p in heldout_problems() if p.family != "hide"]
    assert len(held) == 500
    assert [p.prompt for p in held[:5]] == [
        "copy: jigiuroujgttdoky\n",
        "reverse: rzusjbubxlfryawf\n",
        "sort: 1143134214112224\n",
        "add: 636+890\n",
        "Gus has 43 pens, finds 3, gives 4.\n",
    ]


def test_training_stream_never_yields_a_heldout_or_validation_prompt() -> None:
    held = {prompt_hash(p.prompt) for p in heldout_problems()}
    val = {prompt_hash(p.prompt) for p in validation_problems()}
    assert not held & val
    assert {p.family for p in validation_problems()} == set(FAMILIES)
    # Re-drawing from a split's seed reproduces its prompts; the stream skips them.
    for seed in (20240917, 20241105):
        for p in itertools.islice(train_stream(seed), 3000):
            assert prompt_hash(p.prompt) not in held | val


def test_answers_are_16_to_96_tokens(tokenizer: Any) -> None:
    for p in itertools.chain(heldout_problems(), itertools.islice(train_stream(0), 2000)):
        n = len(tokenizer.encode(p.answer, add_special_tokens=False))
        assert 16 <= n <= 96, (p, n)
        assert p.prompt.endswith("\n")


def test_answers_are_correct() -> None:
    for p in heldout_problems():
        body = p.prompt.split(": ", 1)[-1].rstrip("\n")
        if p.family == "copy":
            assert p.answer == body
        elif p.family == "reverse":
            assert p.answer == body[::-1]
        elif p.family == "sort":
            assert p.answer == "".join(sorted(body))
        elif p.family == "add":
            a, b = map(int, body.split("+"))
            assert p.answer.endswith(f";{a + b}")
        elif p.family == "hide":
            assert len(p.answer) == len(body) == 16 and p.answer.count("*") == 1
            i = p.answer.index("*")
            assert p.answer[:i] + body[i] + p.answer[i + 1 :] == body
        else:
            nums = [int(w.strip(",.")) for w in p.prompt.split() if w.strip(",.").isdigit()]
            assert p.answer.endswith(f"Answer: {nums[0] + nums[1] - nums[2]}")


def test_scoring_is_exact_per_family() -> None:
    task = SyntheticTask()
    samples = task.samples(limit=len(FAMILIES))
    for s in samples:
        ok = task.score(s, s.reference)
        assert ok == {"correct": True, "extracted": s.reference, "family": s.meta["family"]}
        assert task.score(s, f" {s.reference}\n")["correct"]
        assert not task.score(s, s.reference[:-1])["correct"]
        assert not task.score(s, s.reference + "x")["correct"]
        flipped = s.reference[:-1] + ("0" if s.reference[-1] != "0" else "1")
        assert not task.score(s, flipped)["correct"]
    assert task.name == "synthetic" and task.chat is False


def test_hide_accepts_every_valid_answer_and_nothing_else() -> None:
    prompt = "hide one: abcdefghijklmnop\n"
    src = "abcdefghijklmnop"
    for i in range(16):
        assert score_problem("hide", prompt, "*" + src[1:], src[:i] + "*" + src[i + 1 :])[0]
    wrong = [
        src,  # nothing hidden
        "**" + src[2:],  # two hidden
        "*" + src[1:-1] + "x",  # hidden one and changed another
        "*" + src[1:-1],  # too short
        "*" + src[1:] + "q",  # too long
        "",
    ]
    for w in wrong:
        assert not score_problem("hide", prompt, "*" + src[1:], w)[0], w
    # the other families stay exact-match
    assert not score_problem("copy", "copy: ab\n", "ab", "ba")[0]


def test_tokenizer_round_trip(tokenizer: Any) -> None:
    ids = {tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert ids == {0, 1, 2, 3}
    assert tokenizer.mask_token == "<|mask|>" and tokenizer.eos_token == "<|eos|>"
    assert tokenizer.pad_token == "<|pad|>"
    for p in itertools.islice(train_stream(11), 300):
        for text in (p.prompt, p.answer):
            ids_ = tokenizer.encode(text, add_special_tokens=False)
            assert len(ids_) == len(text)  # one token per character
            assert tokenizer.decode(ids_) == text
        resp = tokenizer.encode(p.answer, add_special_tokens=False) + [tokenizer.eos_token_id] * 3
        assert tokenizer.decode(resp, skip_special_tokens=True) == p.answer
    # add_special_tokens=True adds nothing (no BOS): the model sees the same ids either way
    assert tokenizer.encode("ab c", add_special_tokens=True) == tokenizer.encode(
        "ab c", add_special_tokens=False
    )


def test_task_is_registered() -> None:
    from dlm_decode.tasks import BUILTIN_TASKS

    assert SyntheticTask in BUILTIN_TASKS
    assert dlm_decode.evaluate.get_task("synthetic").name == "synthetic"
