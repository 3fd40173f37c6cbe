"""Helpers shared by the benchmark tasks: data loading, n-shot prompts, answer parsing.

Data comes either from a local file (``data_path``, the CLI's ``--data``) or from the
Hugging Face hub through the optional ``datasets`` package (``pip install
'dlm-decode[eval]'``). Local files may be JSON Lines or JSON (a list of records, or an
object holding one list), optionally gzip-compressed. Every failure is raised as
[`TaskDataError`][dlm_decode.tasks.common.TaskDataError] (a ``ValueError``) or ``FileNotFoundError``
with a one-line message
that says what to do, so the CLI can report it without a traceback.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "ID",
    "STR",
    "STR_LIST",
    "FieldSpec",
    "TaskDataError",
    "assemble_nshot",
    "check_records",
    "extract_last_number",
    "find_data_file",
    "last_boxed",
    "load_hub",
    "load_records",
    "normalize_number",
    "numbers_equal",
    "record_label",
    "truncate_at",
]


class TaskDataError(ValueError):
    """A task's data could not be loaded; the message suggests how to fix it."""


# ------------------------------------------------------------------------------------
# Loading


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Read records from a ``.jsonl``/``.json`` file, optionally ``.gz``-compressed.

    A JSON file may hold a list of records or an object with exactly one list value (such
    as ``{"data": [...]}``). Files whose suffix is neither are sniffed: a first non-blank
    character ``[`` or ``{`` followed by a whole-file parse means JSON, else JSON Lines.

    Args:
        path: the file.

    Returns:
        The records, in file order.

    Raises:
        FileNotFoundError: the file does not exist.
        TaskDataError: the file is not valid JSON / JSON Lines, or holds no records.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {str(p)!r} does not exist")
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskDataError(f"cannot read data file {str(p)!r}: {exc}") from exc
    stem_suffix = Path(p.stem).suffix if p.suffix == ".gz" else p.suffix
    records: Any = None
    if stem_suffix != ".jsonl" and text.lstrip()[:1] in ("[", "{"):
        try:
            records = json.loads(text)
        except json.JSONDecodeError:
            records = None  # maybe JSON Lines after all
        except RecursionError:
            raise _too_deep(p) from None
        if isinstance(records, dict):
            lists = [v for v in records.values() if isinstance(v, list)]
            records = lists[0] if len(lists) == 1 else None
    if records is None:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except RecursionError:
                raise _too_deep(p, n) from None
            except json.JSONDecodeError as exc:
                raise TaskDataError(
                    f"{str(p)!r} line {n} is not valid JSON ({exc.msg}); expected a "
                    f".jsonl file with one record per line or a .json list"
                ) from exc
    if not isinstance(records, list) or not records:
        raise TaskDataError(f"{str(p)!r} holds no records")
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise TaskDataError(f"{str(p)!r}: record {bad} is not a JSON object")
    return records


def _too_deep(path: Path, line: int | None = None) -> TaskDataError:
    where = f"{str(path)!r}" + (f" line {line}" if line is not None else "")
    return TaskDataError(
        f"{where} nests JSON too deeply to read; a record must be a flat object of "
        f"strings and numbers"
    )


#: ``(accepted types, description)`` of a record field's value (see
#: [`check_records`][dlm_decode.tasks.common.check_records]).
FieldSpec = tuple[tuple[type, ...], str]
STR: FieldSpec = ((str,), "a string")
STR_LIST: FieldSpec = ((list,), "a list of strings")
ID: FieldSpec = ((str, int), "a string or an integer")


def record_label(index: int, rec: dict[str, Any]) -> str:
    """``record 3 (task_id 'HumanEval/3')``: a record as messages name it."""
    tid = rec.get("task_id")
    if isinstance(tid, (str, int)) and not isinstance(tid, bool):
        return f"record {index} (task_id {' '.join(repr(tid).split())[:60]})"
    return f"record {index}"


def _unencodable(value: Any, path: str) -> tuple[str, str] | None:
    """``(field path, problem)`` for the first string in ``value`` that is not valid UTF-8."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return path, f"holds a lone surrogate {value[exc.start]!r} at character {exc.start}"
        return None
    if isinstance(value, list):
        for j, item in enumerate(value):
            if bad := _unencodable(item, f"{path}[{j}]"):
                return bad
    if isinstance(value, dict):
        for key, item in value.items():
            if bad := _unencodable(key, f"a key in {path}") or _unencodable(
                item, f"{path}[{key!r}]"
            ):
                return bad
    return None


def check_records(
    recs: Sequence[Any],
    *,
    task: str,
    where: str,
    required: dict[str, FieldSpec],
    optional: dict[str, FieldSpec],
) -> None:
    """Check every record of a task's data before any decoding starts (not only the first).

    Args:
        recs: the loaded records.
        task: the task name for messages.
        where: the data's origin (file path or hub id) for messages.
        required: fields every record must have, with their accepted types.
        optional: fields that may be missing or ``None`` but otherwise must have the type.

    Raises:
        TaskDataError: one line naming the record (0-based index and task id), the field,
            the problem and the fix.
    """
    fix = "fix or drop that record"
    if not recs:
        raise TaskDataError(f"{task}: {where} holds no records; point --data at the {task} file")
    for i, rec in enumerate(recs):
        if not isinstance(rec, dict):
            raise TaskDataError(
                f"{task}: {where} record {i} is a {type(rec).__name__}, not an object with "
                f"the fields {sorted(required)}; {fix}"
            )
        label = f"{task}: {where} {record_label(i, rec)}"
        for key, (kinds, desc) in [*required.items(), *optional.items()]:
            value = rec.get(key)
            if value is None:
                if key in required:
                    raise TaskDataError(
                        f"{label} lacks the required field {key!r} (every record needs "
                        f"{', '.join(sorted(required))}); {fix}"
                    )
                continue
            ok = isinstance(value, kinds) and not isinstance(value, bool)
            if ok and kinds == (list,):
                ok = all(isinstance(item, str) for item in value)
            if not ok:
                got = type(value).__name__
                if isinstance(value, list) and kinds == (list,):
                    got = "a list holding " + ", ".join(
                        sorted({type(v).__name__ for v in value if not isinstance(v, str)})
                    )
                raise TaskDataError(f"{label}: field {key!r} must be {desc}, got {got}; {fix}")
        for key, value in rec.items():
            bad = _unencodable(key, "a field name") or _unencodable(value, f"field {key!r}")
            if bad is not None:
                raise TaskDataError(
                    f"{label}: {bad[0]} {bad[1]}, which is not valid UTF-8 and cannot "
                    f"be run; repair that character (e.g. re-export the data as UTF-8) or "
                    f"drop that record"
                )


def find_data_file(path: str | Path, candidates: Sequence[str], *, what: str) -> Path:
    """Resolve ``data_path``: a file as given, or the first of ``candidates`` in a folder.

    Args:
        path: a file, or a folder that holds one of ``candidates``.
        candidates: file names looked for inside a folder, in order.
        what: the dataset's name, for the error message.

    Returns:
        The data file.

    Raises:
        FileNotFoundError: nothing found (one line naming what was looked for).
    """
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        for name in candidates:
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(
            f"--data {str(p)!r} is a folder without a {what} file "
            f"(looked for {', '.join(candidates)})"
        )
    raise FileNotFoundError(
        f"--data {str(p)!r} does not exist; give a {what} .jsonl/.json(.gz) file or a folder "
        f"holding {candidates[0]}"
    )


def load_hub(
    dataset: str, config: str | None, splits: Iterable[str], *, task: str
) -> dict[str, list[dict[str, Any]]]:
    """Load splits of a Hugging Face hub dataset as lists of records.

    Args:
        dataset: hub id (``openai/gsm8k``).
        config: configuration name, or ``None``.
        splits: the splits wanted.
        task: the task's name, for the error message.

    Returns:
        ``{split: records}``.

    Raises:
        TaskDataError: ``datasets`` is missing or the download failed; the message suggests
            ``--data PATH``.
    """
    splits = list(splits)
    where = f"{dataset}" + (f" ({config})" if config else "")
    try:
        import datasets
    except ImportError as exc:
        raise TaskDataError(
            f"task {task!r} loads {where} from the Hugging Face hub, which needs the "
            f"'datasets' package (pip install 'dlm-decode[eval]'); or pass --data PATH to a "
            f"local .jsonl/.json(.gz) file"
        ) from exc
    out: dict[str, list[dict[str, Any]]] = {}
    try:
        for split in splits:
            ds = datasets.load_dataset(dataset, config, split=split)
            out[split] = [dict(r) for r in ds]
    except Exception as exc:  # the hub raises many kinds; one clear message for all
        detail = " ".join(str(exc).split())[:200]
        raise TaskDataError(
            f"task {task!r}: could not load {where} split(s) {', '.join(splits)} from the "
            f"Hugging Face hub ({type(exc).__name__}: {detail}); download the data and pass "
            f"--data PATH (a .jsonl/.json(.gz) file)"
        ) from exc
    return out


# ------------------------------------------------------------------------------------
# Prompts


def assemble_nshot(shots: Sequence[tuple[str, str]], query: str, *, separator: str = "\n\n") -> str:
    """Join worked examples and the query into one prompt.

    Args:
        shots: ``(question_text, answer_text)`` pairs, already formatted; each pair is
            written as ``question_text + answer_text``.
        query: the formatted test question (ends where the model should continue).
        separator: text between consecutive examples and before the query.

    Returns:
        ``shot_1 + sep + … + shot_n + sep + query`` (just ``query`` without shots).
    """
    parts = [q + a for q, a in shots]
    parts.append(query)
    return separator.join(parts)


def truncate_at(text: str, stops: Iterable[str]) -> str:
    """Cut ``text`` at the earliest occurrence of any stop string.

    Args:
        text: a completion.
        stops: stop strings (empty strings are ignored).

    Returns:
        The text before the first stop string, or the whole text.
    """
    cut = len(text)
    for s in stops:
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut]


# ------------------------------------------------------------------------------------
# Answers

#: A number as written in prose: optional sign and currency, thousands separators,
#: decimals. The look-arounds keep it from starting inside a word or another number.
_NUMBER_RE = re.compile(
    r"(?<![\w.])[-\u2212]?(?:\$\s?)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\d)"
    r"|(?<![\w.])[-\u2212]?\$?\.\d+(?!\d)"
)


def normalize_number(text: str) -> str:
    """Canonical string of a number: no ``$``/commas/spaces, no trailing zeros after a point.

    ``"$1,234.50"`` → ``"1234.5"``, ``"18.0"`` → ``"18"``, ``"- 5"`` → ``"-5"``,
    ``".5"`` → ``"0.5"``, ``"-0"`` → ``"0"``. Text that is not a number comes back stripped
    of the same characters (and of a trailing full stop).

    Args:
        text: the number as written.

    Returns:
        The normalized string.
    """
    s = text.strip().replace("\u2212", "-")
    s = s.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if re.fullmatch(r"-?\d*\.\d+|-?\d+\.?", s):
        neg = s.startswith("-")
        s = s.lstrip("-").rstrip(".")
        if "." in s:
            s = s.rstrip("0").rstrip(".")
        s = s.lstrip("0") or "0"
        if s.startswith("."):
            s = "0" + s
        if neg and s != "0":
            s = "-" + s
    return s


def numbers_equal(a: str | None, b: str | None) -> bool:
    """Whether two extracted answers denote the same number (or the same string).

    Both sides are normalized with [`normalize_number`][dlm_decode.tasks.common.normalize_number];
    numbers are compared as
    floats with a relative tolerance of 1e-9 (``"0.50"`` equals ``".5"``).
    """
    if a is None or b is None:
        return False
    na, nb = normalize_number(a), normalize_number(b)
    if na == nb:
        return True
    try:
        fa, fb = float(na), float(nb)
    except ValueError:
        return False
    return abs(fa - fb) <= 1e-9 * max(1.0, abs(fa), abs(fb))


def extract_last_number(text: str) -> str | None:
    """The last number written in ``text``, normalized (``None`` when there is none).

    Thousands separators, a currency sign and a trailing full stop are handled:
    ``"The answer is 1,234."`` → ``"1234"``; ``"it fell to -7 degrees"`` → ``"-7"``.
    """
    found = _NUMBER_RE.findall(text)
    return normalize_number(found[-1]) if found else None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` (or ``\\fbox{…}``) in ``text``, braces matched.

    ``\\boxed 5`` (no braces) gives ``"5"``. Returns ``None`` when there is no box or
    its braces are unbalanced.
    """
    best = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if best < 0:
        return None
    i = best + (len("\\boxed") if text.startswith("\\boxed", best) else len("\\fbox"))
    if text.startswith(" ", i) and not text.startswith(" {", i):
        m = re.match(r" ([^\s$]+)", text[i:])
        return m.group(1) if m else None
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None
