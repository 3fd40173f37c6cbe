"""Crash-safe result storage: append-only JSONL rows, one file per rank, merged at the end.

Every finished batch of samples is appended to the rank's file in one ``write`` followed by
``flush`` and ``fsync``, so after ``kill -9`` the file holds every finished row and at most
one torn (incomplete) final line. Opening the store for appending truncates such a tail;
readers skip it. Rows are keyed by ``(run_id, sample_id)``; a rerun skips every key already
present, so no sample is decoded twice and none is lost.

Files in a sweep folder:

* ``rows.jsonl`` — the merged rows (single process, or after a merge);
* ``rows.rank{r}.jsonl`` — rank ``r``'s rows while a multi-process sweep runs; merged into
  ``rows.jsonl`` by rank 0 after the barrier, or by the next invocation.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "MERGED",
    "RowStore",
    "atomic_write_text",
    "merge_rank_files",
    "rank_file",
    "read_rows",
    "read_sweep_rows",
    "repair_tail",
]

MERGED = "rows.jsonl"


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


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Read complete rows of a JSONL file; a torn final line is dropped, a corrupt middle
    line is skipped with a warning.

    Args:
        path: the file (missing → no rows).

    Returns:
        The rows, in file order.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: bytes after the last newline
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(complete):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            warnings.warn(f"{path}: skipping corrupt line {i + 1}", stacklevel=2)
            continue
        if isinstance(row, dict):
            rows.append(row)
    if tail.strip():
        # A line without its newline was cut by a crash mid-write: never trust it.
        pass
    return rows


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


def merge_rank_files(folder: Path) -> int:
    """Merge ``rows.rank*.jsonl`` into ``rows.jsonl`` (atomically) and delete them.

    Safe to call after a crash at any point: the merged file is replaced atomically before
    the rank files are removed, and rows are deduplicated.

    Args:
        folder: the sweep folder.

    Returns:
        Number of rows in the merged file.
    """
    ranks = sorted(folder.glob("rows.rank*.jsonl"))
    if not ranks:
        return len(read_rows(folder / MERGED))
    rows = read_sweep_rows(folder)
    rows.sort(key=lambda r: (str(r["run_id"]), int(r.get("sample_index", 0))))
    atomic_write_text(folder / MERGED, "".join(json.dumps(r) + "\n" for r in rows))
    for f in ranks:
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
