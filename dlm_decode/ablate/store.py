"""Crash-safe result storage: append-only JSONL rows, one file per rank, merged at the end.

Every finished batch of samples is appended to the rank's file in one ``write`` followed by
``flush`` and ``fsync``, so after ``kill -9`` the file holds every finished row and at most
one torn (incomplete) final line. Opening the store for appending truncates such a tail;
readers skip it. Rows are keyed by ``(run_id, sample_id)``; a rerun skips every key already
present, so no sample is decoded twice and none is lost.

Files in a sweep folder:

* ``rows.jsonl`` — the merged rows (single process, or after a merge);
* ``rows.rank{r}.jsonl`` — rank ``r``'s rows while a multi-process sweep runs; merged into
  ``rows.jsonl`` by the last rank to finish (see
  ``dlm_decode.ablate.locking``), or by the next invocation;
* ``rows.rank{r}.done`` — written by rank ``r`` once its shard is closed and complete.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "KEY_FIELDS",
    "MERGED",
    "RowStore",
    "SkippedRowsWarning",
    "atomic_write_text",
    "merge_rank_files",
    "rank_file",
    "read_rows",
    "read_sweep_rows",
    "repair_tail",
]

MERGED = "rows.jsonl"


#: Row fields measured on the wall clock (they differ between otherwise identical sweeps):
def rank_file(folder: Path, rank: int, world: int) -> Path:
    """The file rank ``rank`` appends to: ``rows.jsonl`` alone, ``rows.rank{r}.jsonl`` in a
    multi-process sweep."""
    return folder / (MERGED if world <= 1 else f"rows.rank{rank}.jsonl")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def repair_tail(path: Path) -> int:
    """Truncate a torn final line (bytes after the last newline) in place.

    Args:
        path: a JSONL file (missing is fine).

    Returns:
        Number of bytes dropped.
    """
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        # Scan back from the end in chunks for the last newline.
        pos, chunk = size, 65536
        keep = 0
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            buf = f.read(pos - start)
            idx = buf.rfind(b"\n")
            if idx >= 0:
                keep = start + idx + 1
                break
            pos = start
        if keep < size:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        return size - keep


class SkippedRowsWarning(UserWarning):
    """Lines of a rows file that were skipped (not JSON, or without ``run_id``/``sample_id``)."""


#: The fields that key a row; a line without them cannot be resumed, merged or tabulated.
KEY_FIELDS = ("run_id", "sample_id")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Read complete rows of a JSONL file.

    A torn final line is dropped silently (a crash mid-write leaves one). Lines in the
    middle that are not JSON objects, or lack ``run_id`` or ``sample_id``, are skipped with
    one [`SkippedRowsWarning`][dlm_decode.ablate.store.SkippedRowsWarning] per file naming
    the file, the count and the line numbers; every other row is kept.

    Args:
        path: the file (missing → no rows).

    Returns:
        The rows, in file order.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete = lines[:-1]  # the bytes after the last newline were cut by a crash: dropped
    rows: list[dict[str, Any]] = []
    corrupt: list[int] = []
    keyless: list[int] = []
    for i, line in enumerate(complete):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            corrupt.append(i + 1)
            continue
        if not isinstance(row, dict):
            corrupt.append(i + 1)
        elif any(k not in row for k in KEY_FIELDS):
            keyless.append(i + 1)
        else:
            rows.append(row)
    if corrupt or keyless:
        warnings.warn(_skipped_message(path, corrupt, keyless), SkippedRowsWarning, stacklevel=2)
    return rows


def _skipped_message(path: Path, corrupt: list[int], keyless: list[int]) -> str:
    def lines(nums: list[int]) -> str:
        shown = ", ".join(map(str, nums[:10])) + (", …" if len(nums) > 10 else "")
        return f"line{'s' if len(nums) > 1 else ''} {shown}"

    parts = []
    if keyless:
        parts.append(f"{len(keyless)} without run_id/sample_id ({lines(keyless)})")
    if corrupt:
        parts.append(f"{len(corrupt)} not a JSON object ({lines(corrupt)})")
    n = len(corrupt) + len(keyless)
    return (
        f"{path}: skipped {n} unusable line{'s' if n > 1 else ''}: {'; '.join(parts)}; "
        f"the other rows are kept"
    )


def _key(row: dict[str, Any]) -> tuple[str, str]:
    return str(row["run_id"]), str(row["sample_id"])


def read_sweep_rows(folder: Path) -> list[dict[str, Any]]:
    """Every row of a sweep folder (merged file and rank files), deduplicated by
    ``(run_id, sample_id)`` (first occurrence wins).

    Args:
        folder: the sweep folder.

    Returns:
        The rows.
    """
    out: dict[tuple[str, str], dict[str, Any]] = {}
    files = [folder / MERGED, *sorted(folder.glob("rows.rank*.jsonl"))]
    for f in files:
        for row in read_rows(f):
            out.setdefault(_key(row), row)
    return list(out.values())


def merge_rank_files(folder: Path, ranks: Sequence[int] | None = None) -> int:
    """Merge rank files into ``rows.jsonl`` (atomically) and delete the merged ones.

    Safe to call after a crash at any point: the merged file is replaced atomically before
    the rank files are removed, and rows are deduplicated. The caller must make sure no
    process still appends to a file it deletes: a sharded sweep passes the ranks whose done
    marker it saw (under the merge lock); a single-process sweep holds the folder lock
    exclusively, so every rank file is closed.

    Args:
        folder: the sweep folder.
        ranks: delete only these ranks' files (and their done markers); ``None`` → every
            ``rows.rank*.jsonl`` and ``rows.rank*.done``. Every rank file is read either
            way.

    Returns:
        Number of rows in the merged file.
    """
    present = sorted(folder.glob("rows.rank*.jsonl"))
    if ranks is None:
        delete = present
        markers = sorted(folder.glob("rows.rank*.done"))
    else:
        delete = [folder / f"rows.rank{r}.jsonl" for r in ranks]
        markers = [folder / f"rows.rank{r}.done" for r in ranks]
    if not present and not markers:
        return len(read_rows(folder / MERGED))
    rows = read_sweep_rows(folder)
    rows.sort(key=lambda r: (str(r["run_id"]), int(r.get("sample_index", 0))))
    if present:
        atomic_write_text(folder / MERGED, "".join(json.dumps(r) + "\n" for r in rows))
    for f in [*delete, *markers]:
        f.unlink(missing_ok=True)
    _fsync_dir(folder)
    return len(rows)


class RowStore:
    """Append-only writer of one rank's rows.

    Args:
        path: the rank's JSONL file; a torn tail is truncated on open.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.dropped_bytes = repair_tail(path)
        self._f = open(path, "a", encoding="utf-8")

    def append(self, rows: Sequence[dict[str, Any]] | Iterable[dict[str, Any]]) -> None:
        """Append rows durably: one write, flush, fsync."""
        text = "".join(json.dumps(r, default=_json_default) + "\n" for r in rows)
        if not text:
            return
        self._f.write(text)
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        """Close the file."""
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> RowStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)
