"""Who may write a sweep folder: folder and rank locks, and the shard completion protocol.

Locks are ``fcntl.flock`` locks on small files in the sweep folder. The kernel drops a
flock when its process dies (``kill -9`` included), so a crashed sweep never blocks the
next one; the files themselves stay and only say who held them last.

* ``sweep.lock`` — the folder lock. A single-process sweep holds it **exclusively**, so
  it excludes every other sweep (single or sharded) on the same folder. Each rank of a
  sharded sweep holds it **shared**: ranks do not block each other, but a single-process
  sweep cannot start while any rank runs, and no rank can start while one does.
* ``sweep.rank{r}.lock`` — held exclusively by rank ``r`` of a sharded sweep: two
  processes cannot both be rank ``r`` (e.g. two sharded sweeps started on one folder).
* ``merge.lock`` — held briefly (blocking) while a rank clears its done marker, reads
  what is already done and opens its shard, and while the last rank merges: a merge never
  overlaps a rank (re)opening its shard.

A lock that cannot be taken fails at once with
``SweepLockedError``, naming the holder
(pid, host, since when, rank), which each holder writes into its lock file.

Completion protocol of a sharded sweep without a real barrier (``RANK``/``WORLD_SIZE``
set by hand): rank ``r`` writes ``rows.rank{r}.done`` after closing its shard; under the
merge lock, the rank that sees every rank's marker (the last to finish) merges the shards
into ``rows.jsonl`` and deletes them with their markers. A shard without its marker is
never deleted by a sharded rank.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dlm_decode.ablate.store import atomic_write_text

__all__ = [
    "FOLDER_LOCK",
    "MERGE_LOCK",
    "SweepLock",
    "SweepLockedError",
    "clear_done_marker",
    "done_marker",
    "done_ranks",
    "merge_lock",
    "rank_lock",
    "write_done_marker",
]

FOLDER_LOCK = "sweep.lock"
MERGE_LOCK = "merge.lock"


class SweepLockedError(ValueError):
    """Another sweep holds a lock of this sweep folder (the message names it)."""


def rank_lock(folder: Path, rank: int) -> Path:
    """The lock file of rank ``rank`` of a sharded sweep."""
    return folder / f"sweep.rank{rank}.lock"


def done_marker(folder: Path, rank: int) -> Path:
    """The marker rank ``rank`` writes once its shard is closed and complete."""
    return folder / f"rows.rank{rank}.done"


def _holder_info(rank: int, world: int) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rank": rank,
        "world": world,
        "argv": sys.argv,
    }


def _read_info(path: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "null")
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and "pid" in info else None


def _alive(info: dict[str, Any]) -> bool:
    """Whether the process a holder record names may still run (unknown on other hosts)."""
    if info.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


def _describe(info: dict[str, Any]) -> str:
    who = f"pid {info.get('pid')} on host {info.get('host')} since {info.get('since')}"
    world = int(info.get("world") or 1)
    if world > 1:
        who += f" (rank {info.get('rank')} of WORLD_SIZE={world})"
    else:
        who += " (single process)"
    return who


def _write_info(fd: int, info: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    with contextlib.suppress(OSError):
        os.fsync(fd)


def _try_flock(path: Path, mode: int) -> int | None:
    """Open ``path`` (created when missing) and flock it without waiting.

    Returns:
        The open descriptor holding the lock, or ``None`` when another process holds it.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


class SweepLock:
    """The locks one process of a sweep holds on its folder (see the module docstring).

    Args:
        folder: the sweep folder (created when missing).
        rank: this process's rank.
        world: number of processes of the sweep; 1 → the folder lock exclusively.

    Example:
        ```python
        with SweepLock(Path("runs/x"), rank=0, world=1):
            ...  # nobody else writes runs/x meanwhile
        ```
    """

    def __init__(self, folder: Path, rank: int = 0, world: int = 1) -> None:
        self.folder = Path(folder)
        self.rank = rank
        self.world = world
        self._fds: list[int] = []

    def acquire(self) -> SweepLock:
        """Take the folder lock (and the rank lock of a sharded sweep) without waiting.

        Returns:
            ``self``.

        Raises:
            SweepLockedError: another process holds a conflicting lock; the message
                names it and says what to do.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        info = _holder_info(self.rank, self.world)
        sharded = self.world > 1
        path = self.folder / FOLDER_LOCK
        fd = _try_flock(path, fcntl.LOCK_SH if sharded else fcntl.LOCK_EX)
        if fd is None:
            raise SweepLockedError(self._message(self._folder_holders()))
        self._fds.append(fd)
        if not sharded:
            _write_info(fd, info)
            return self
        rpath = rank_lock(self.folder, self.rank)
        rfd = _try_flock(rpath, fcntl.LOCK_EX)
        if rfd is None:
            holder = _read_info(rpath)
            self.release()
            raise SweepLockedError(self._message([holder] if holder else []))
        self._fds.append(rfd)
        _write_info(rfd, info)
        return self

    def _folder_holders(self) -> list[dict[str, Any]]:
        """Who holds the folder lock: a single-process sweep (its record is in the folder
        lock file) or, when this process wants it exclusively, running ranks too."""
        paths = [self.folder / FOLDER_LOCK]
        if self.world <= 1:
            paths += sorted(self.folder.glob("sweep.rank*.lock"))
        found = []
        for p in paths:
            info = _read_info(p)
            if info is not None and _alive(info):
                found.append(info)
        return found

    def _message(self, holders: Sequence[dict[str, Any]]) -> str:
        what = f"rank {self.rank} of a sharded sweep" if self.world > 1 else "a sweep"
        who = "; ".join(_describe(h) for h in holders) or "another process"
        return (
            f"sweep folder {self.folder} is in use by {who}, so {what} cannot write it; "
            f"wait for that sweep to finish (a crashed one releases its lock), or give "
            f"another --out"
        )

    def release(self) -> None:
        """Drop every lock this object holds (the lock files stay)."""
        while self._fds:
            fd = self._fds.pop()
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> SweepLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def merge_lock(folder: Path) -> Iterator[None]:
    """Hold ``merge.lock`` of ``folder`` (waiting for it: merges and shard opens are short).

    Args:
        folder: the sweep folder.
    """
    fd = os.open(folder / MERGE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def write_done_marker(folder: Path, rank: int, world: int, rows: int) -> None:
    """Record that rank ``rank`` closed its shard (call after ``RowStore.close``).

    Args:
        folder: the sweep folder.
        rank: the rank.
        world: the sweep's number of ranks (a marker counts only for this world size).
        rows: rows this invocation appended (for the record).
    """
    info = {**_holder_info(rank, world), "rows_appended": rows}
    atomic_write_text(done_marker(folder, rank), json.dumps(info) + "\n")


def clear_done_marker(folder: Path, rank: int) -> None:
    """Remove rank ``rank``'s marker before it appends to its shard again."""
    done_marker(folder, rank).unlink(missing_ok=True)


def done_ranks(folder: Path, world: int) -> set[int]:
    """Ranks of a ``world``-process sweep whose done marker exists.

    Args:
        folder: the sweep folder.
        world: the world size the markers must have been written for.

    Returns:
        The ranks in ``range(world)`` that are done.
    """
    out = set()
    for r in range(world):
        info = _read_info(done_marker(folder, r))
        if info is not None and int(info.get("world") or 0) == world:
            out.add(r)
    return out
