"""A seeded synthetic task suite with exactly checkable answers, for the shipped tiny model.

Six problem families, chosen so that the model's per-position confidence profiles differ:

* ``copy`` — copy a lowercase string (every position is easy: flat, high profile);
* ``reverse`` — reverse a lowercase string (position lookups, mostly confident);
* ``sort`` — sort a string of the digits 1–5 (counting; digits at run boundaries are uncertain);
* ``add`` — column addition written right to left with the carries shown, then the sum
  (each column's result depends on the carry of the column before it);
* ``word`` — a templated word problem with a two-line worked solution ending in
  ``Answer: N`` (fixed text is certain, the arithmetic is not);
* ``hide`` — copy a lowercase string with exactly one letter, any one, replaced by ``*``.
  Sixteen answers are right, so a calibrated model is about 15/16 sure of every copied
  letter and 1/16 sure of each ``*``. Committing every letter it is 90 % sure of
  commits no ``*`` and is wrong. This is the joint-versus-marginal failure that the
  Fréchet rule guards against.

Every family but ``hide`` has one right answer, scored by exact match; ``hide`` is scored by
an exact check of validity ([`score_problem`][dlm_decode.tasks.synthetic.score_problem]).

Prompts are plain text ending in a newline (no chat template); the answer is the text the
model should generate, followed by EOS padding. Every answer is 16–37 characters, i.e.
16–37 tokens of the character-level tokenizer built by
[`build_tokenizer`][dlm_decode.tasks.synthetic.build_tokenizer].

The held-out split is a fixed list of [`HELDOUT_SIZE`][dlm_decode.tasks.synthetic.HELDOUT_SIZE]
problems drawn from
[`HELDOUT_SEED`][dlm_decode.tasks.synthetic.HELDOUT_SEED] with families interleaved; training
streams ([`train_stream`][dlm_decode.tasks.synthetic.train_stream])
skip every prompt whose hash is in the held-out or validation set, so they are disjoint by
construction.
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from dlm_decode.tasks.base import Sample, Task

__all__ = [
    "ALPHABET",
    "FAMILIES",
    "HELDOUT_SEED",
    "HELDOUT_SIZE",
    "SPECIAL_TOKENS",
    "VALIDATION_SEED",
    "VALIDATION_SIZE",
    "Problem",
    "SyntheticTask",
    "build_tokenizer",
    "heldout_problems",
    "make_problem",
    "prompt_hash",
    "score_completion",
    "score_problem",
    "train_stream",
    "validation_problems",
]

#: Seed of the held-out split.
HELDOUT_SEED = 20240917
#: Number of held-out problems (families interleaved, equal counts).
HELDOUT_SIZE = 600
#: Seed of the validation split (model selection while training; never the held-out set).
VALIDATION_SEED = 20241105
#: Number of validation problems.
VALIDATION_SIZE = 1200
#: Special tokens of the tiny tokenizer, in id order (ids 0..3).
SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|mask|>")
#: Every character a prompt or an answer may contain (ids 4.. in the tokenizer).
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))

_NAMES = ("Ann", "Bob", "Cal", "Dee", "Eve", "Fay", "Gus", "Ivy", "Jon", "Kim", "Lea", "Max")
_ITEMS = ("pens", "cats", "apples", "books", "coins", "cups", "eggs", "hats", "keys", "toys")
_VERBS_IN = ("buys", "finds", "gets", "wins")
_VERBS_OUT = ("gives", "loses", "sells", "eats")


@dataclass(frozen=True)
class Problem:
    """One synthetic problem.

    Attributes:
        family: family name (one of [`FAMILIES`][dlm_decode.tasks.synthetic.FAMILIES]).
        prompt: the prompt text (ends with a newline).
        answer: the exact answer text the model must produce.
    """

    family: str
    prompt: str
    answer: str


def _letters(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


# Strings have a fixed length within a family: the answer's source character then sits at a
# fixed offset from it, which a tiny model learns quickly; with variable lengths it must first
# locate the prompt's start (a two-hop lookup) and did not learn in 45 CPU minutes.
STRING_LENGTH = 16


def _copy(rng: random.Random) -> Problem:
    s = _letters(rng, STRING_LENGTH, STRING_LENGTH)
    return Problem("copy", f"copy: {s}\n", s)


def _reverse(rng: random.Random) -> Problem:
    s = _letters(rng, STRING_LENGTH, STRING_LENGTH)
    return Problem("reverse", f"reverse: {s}\n", s[::-1])


def _sort(rng: random.Random) -> Problem:
    s = "".join(rng.choice("12345") for _ in range(STRING_LENGTH))
    return Problem("sort", f"sort: {s}\n", "".join(sorted(s)))


def _add(rng: random.Random) -> Problem:
    n = 3
    a = rng.randint(10 ** (n - 1), 10**n - 1)
    b = rng.randint(10 ** (n - 1), 10**n - 1)
    da, db = str(a)[::-1], str(b)[::-1]
    carry, cols = 0, []
    for i in range(n):
        s = int(da[i]) + int(db[i]) + carry
        cols.append(f"{da[i]}+{db[i]}+{carry}={s}")
        carry = s // 10
    return Problem("add", f"add: {a}+{b}\n", ",".join(cols) + f";{a + b}")


def _word(rng: random.Random) -> Problem:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b, c = rng.randint(10, 89), rng.randint(2, 9), rng.randint(2, 9)
    vin, vout = rng.choice(_VERBS_IN), rng.choice(_VERBS_OUT)
    prompt = f"{name} has {a} {item}, {vin} {b}, {vout} {c}.\n"
    s = a + b
    answer = f"{a}+{b}={s}. {s}-{c}={s - c}. Answer: {s - c}"
    return Problem("word", prompt, answer)


HIDE_MARK = "*"


def _hide(rng: random.Random) -> Problem:
    s = _letters(rng, STRING_LENGTH, STRING_LENGTH)
    i = rng.randrange(STRING_LENGTH)
    return Problem("hide", f"hide one: {s}\n", s[:i] + HIDE_MARK + s[i + 1 :])


#: Family name -> generator taking a ``random.Random``.
FAMILIES: dict[str, Callable[[random.Random], Problem]] = {
    "copy": _copy,
    "reverse": _reverse,
    "sort": _sort,
    "add": _add,
    "word": _word,
    "hide": _hide,
}
# Families drawn from a split's seed in turn, then families added later (each from the
# seed + its group index), so adding a family leaves the earlier families' problems as they
# were: the five of version 1 of the suite, then ``hide``.
_GROUPS: tuple[tuple[str, ...], ...] = (("copy", "reverse", "sort", "add", "word"), ("hide",))


def make_problem(rng: random.Random, family: str | None = None) -> Problem:
    """Draw one problem.

    Args:
        rng: the random source (consumed).
        family: a family name, or ``None`` for a uniformly random family.

    Returns:
        The problem.
    """
    fam = family if family is not None else rng.choice(list(FAMILIES))
    return FAMILIES[fam](rng)


def prompt_hash(prompt: str) -> str:
    """Stable hash of a prompt (used to keep training away from the held-out set)."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:20]


def _distinct(size: int, seed: int, banned: frozenset[str] = frozenset()) -> tuple[Problem, ...]:
    """``size`` distinct problems, problem ``i`` of family ``i % len(FAMILIES)``.

    Each family group of [`_GROUPS`][dlm_decode.tasks.synthetic._GROUPS] draws from its own
    generator (``seed + group``),
    cycling through its families, so problems of earlier families do not depend on later
    ones. Prompts in ``banned`` and repeated prompts are skipped.
    """
    fams = list(FAMILIES)
    group_of = {f: g for g, names in enumerate(_GROUPS) for f in names}
    rngs = [random.Random(seed + g) for g in range(len(_GROUPS))]
    turns = [0] * len(_GROUPS)
    seen: set[str] = set()
    out: list[Problem] = []
    while len(out) < size:
        g = group_of[fams[len(out) % len(fams)]]
        names = _GROUPS[g]
        p = make_problem(rngs[g], names[turns[g] % len(names)])
        if p.prompt in seen or (banned and prompt_hash(p.prompt) in banned):
            continue
        seen.add(p.prompt)
        turns[g] += 1
        out.append(p)
    return tuple(out)


@lru_cache(maxsize=4)
def heldout_problems(size: int = HELDOUT_SIZE, seed: int = HELDOUT_SEED) -> tuple[Problem, ...]:
    """The fixed held-out split: ``size`` distinct problems, families interleaved.

    Problem ``i`` belongs to family ``i % len(FAMILIES)`` (in
    [`FAMILIES`][dlm_decode.tasks.synthetic.FAMILIES] order), so any
    prefix of at least five problems covers every family.

    Args:
        size: number of problems.
        seed: seed of the split.

    Returns:
        The problems, in a deterministic order.
    """
    return _distinct(size, seed)


@lru_cache(maxsize=4)
def _heldout_hashes(size: int = HELDOUT_SIZE, seed: int = HELDOUT_SEED) -> frozenset[str]:
    return frozenset(prompt_hash(p.prompt) for p in heldout_problems(size, seed))


@lru_cache(maxsize=2)
def validation_problems(size: int = VALIDATION_SIZE) -> tuple[Problem, ...]:
    """The validation split used to select checkpoints while training.

    Disjoint from the held-out split (whose prompts are skipped) and from every training
    stream (which skips both), families interleaved like
    [`heldout_problems`][dlm_decode.tasks.synthetic.heldout_problems].

    Args:
        size: number of problems (at most
            [`VALIDATION_SIZE`][dlm_decode.tasks.synthetic.VALIDATION_SIZE] are excluded from
            training, so a larger ``size`` overlaps the training streams).

    Returns:
        The problems, in a deterministic order.
    """
    return _distinct(size, VALIDATION_SEED, _heldout_hashes())


@lru_cache(maxsize=1)
def _banned_for_training() -> frozenset[str]:
    return _heldout_hashes() | frozenset(
        prompt_hash(p.prompt) for p in validation_problems(VALIDATION_SIZE)
    )


def train_stream(seed: int) -> Iterator[Problem]:
    """An endless stream of training problems that never repeats a held-out prompt.

    Validation prompts ([`validation_problems`][dlm_decode.tasks.synthetic.validation_problems]) are
    skipped as well.

    Args:
        seed: seed of the stream (any value; the held-out set is excluded whatever it is).

    Yields:
        Problems of uniformly random families.
    """
    rng = random.Random(seed)
    banned = _banned_for_training()
    while True:
        p = make_problem(rng)
        if prompt_hash(p.prompt) in banned:
            continue
        yield p


def score_completion(problem_answer: str, completion: str) -> tuple[bool, str]:
    """Exact-match score of a completion.

    The completion (already cut at the first EOS) is stripped of surrounding whitespace and
    compared character for character with the reference answer.

    Args:
        problem_answer: the reference answer.
        completion: the decoded response.

    Returns:
        ``(correct, extracted)``.
    """
    extracted = completion.strip()
    return extracted == problem_answer, extracted


def _hide_valid(prompt: str, answer: str) -> bool:
    source = prompt.split(": ", 1)[-1].rstrip("\n")
    diff = [i for i, (a, b) in enumerate(zip(source, answer, strict=False)) if a != b]
    return (
        len(answer) == len(source)
        and answer.count(HIDE_MARK) == 1
        and len(diff) == 1
        and answer[diff[0]] == HIDE_MARK
    )


def score_problem(family: str, prompt: str, reference: str, completion: str) -> tuple[bool, str]:
    """Score a completion the way its family is scored.

    ``hide`` accepts any of its valid answers (the source string with exactly one letter
    replaced by ``*``); every other family is an exact match with ``reference``
    ([`score_completion`][dlm_decode.tasks.synthetic.score_completion]).

    Args:
        family: the problem's family.
        prompt: the problem's prompt.
        reference: the reference answer.
        completion: the decoded response (already cut at the first EOS).

    Returns:
        ``(correct, extracted)``, ``extracted`` being the stripped completion.
    """
    ok, extracted = score_completion(reference, completion)
    if family == "hide":
        ok = _hide_valid(prompt, extracted)
    return ok, extracted


class SyntheticTask(Task):
    """The synthetic held-out suite as an evaluation task (name ``synthetic``).

    Samples come in a deterministic order with families interleaved; ``score`` is an exact
    match of the whole answer (worked steps included), and for ``hide`` an exact check that
    the answer is one of the valid ones
    ([`score_problem`][dlm_decode.tasks.synthetic.score_problem]).

    Version 2 added the ``hide`` family (the held-out problems of the other five families are
    those of version 1).
    """

    name = "synthetic"
    version = 2
    chat = False

    def samples(self, limit: int | None = None) -> list[Sample]:
        """The held-out problems (first ``limit`` when given).

        Args:
            limit: maximum number of samples.

        Returns:
            Samples with ``meta["family"]`` set.
        """
        probs = heldout_problems()
        if limit is not None:
            probs = probs[:limit]
        return [
            Sample(
                id=f"synthetic-{i:04d}",
                prompt=p.prompt,
                reference=p.answer,
                meta={"family": p.family},
            )
            for i, p in enumerate(probs)
        ]

    def score(self, sample: Sample, completion: str) -> dict[str, Any]:
        """Exact-match score of one completion.

        Args:
            sample: the sample.
            completion: the decoded response (up to the first EOS).

        Returns:
            ``{"correct": bool, "extracted": str, "family": str}``.
        """
        fam = sample.meta["family"]
        ok, extracted = score_problem(fam, sample.prompt, sample.reference, completion)
        return {"correct": ok, "extracted": extracted, "family": fam}


def build_tokenizer(out_dir: str | Path | None = None) -> Any:
    """Build the character-level tokenizer of the tiny model.

    One token per character of [`ALPHABET`][dlm_decode.tasks.synthetic.ALPHABET] (ids 4..) after the
    four
    [`SPECIAL_TOKENS`][dlm_decode.tasks.synthetic.SPECIAL_TOKENS] (``<|pad|>`` = 0, ``<|bos|>`` = 1,
    ``<|eos|>`` = 2,
    ``<|mask|>`` = 3). No BOS is added automatically; decoding concatenates the characters.

    Args:
        out_dir: when given, write ``tokenizer.json``, ``tokenizer_config.json`` and
            ``special_tokens_map.json`` there (loadable by ``AutoTokenizer``).

    Returns:
        A ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for ch in ALPHABET:
        vocab[ch] = len(vocab)
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<|pad|>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    raw.decoder = decoders.Fuse()
    raw.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        mask_token="<|mask|>",
        unk_token="<|pad|>",
        clean_up_tokenization_spaces=False,
        model_max_length=256,
        padding_side="left",
    )
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(out))
        cfg_path = out / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["clean_up_tokenization_spaces"] = False
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return tok
