"""Run untrusted, model-written Python programs in a contained subprocess.

Benchmarks such as HumanEval and MBPP execute code written by the model. That
code is untrusted: it may loop forever, allocate without bound, fork-bomb,
delete or overwrite files, try to kill the harness, or try to fake a passing
result. This module runs each program so that these behaviours are contained
and scored as "not passed".

Usage:
    ```python
    from dlm_decode.sandbox import run_program, run_programs

    res = run_program("assert 1 + 1 == 2", timeout=5.0)
    assert res.status == "passed"
    results = run_programs(sources, timeout=5.0, workers=2)
    ```

    Arguments are checked before anything runs: a source that is not a str or holds
    a lone surrogate, and a ``timeout``, ``memory_mb``, ``nproc``,
    ``max_file_bytes`` or ``workers`` of the wrong type or out of range raise a
    one-line `TypeError` / `ValueError` (`run_programs` checks every source first
    and names its index). There is no "no limit" value for the limits.

Process layout:
    ``harness thread -> launcher (python -I -S, root while it sets up) ->
    fork -> mini init (PID 1 of the new PID namespace, root) -> fork ->
    wrapper (python -I -S, unprivileged) -> exec(user source)``.

    The launcher is a tiny script that applies resource limits, creates
    namespaces and drops privileges, then execs the real interpreter on the
    wrapper. The launcher stays alive as the wrapper's parent, waits for it and
    reports its wait status over a private pipe. We deliberately do *not* use
    ``preexec_fn``: it runs Python code between ``fork`` and ``exec`` in a
    multi-threaded parent (``run_programs`` uses a thread pool), which can
    deadlock on locks held by other threads. ``subprocess.Popen`` without
    ``preexec_fn`` is thread-safe, and all privileged set-up happens in the
    single-threaded launcher process instead.

Scoring:
    * ``passed``: the wrapper ran the whole source, then wrote a per-run random
      nonce to a result pipe, and the process exited 0. The nonce reaches the
      wrapper over a separate pipe that is read and closed before the user code
      runs; it never appears in argv, the environment or any file.
      ``sys.exit(0)``, ``os._exit(0)``, a printed fake marker, or patched
      builtins therefore do not produce ``passed``.
    * ``failed``: uncaught exception (including ``AssertionError``,
      ``SyntaxError``, ``MemoryError``), ``SystemExit`` (any code) or any other
      exit without the nonce.
    * ``timeout``: the wall-clock limit elapsed; the whole process group is
      SIGKILLed (and with a PID namespace, every process in it dies too).
    * ``crashed``: the program was killed by a signal (SIGKILL, SIGSEGV,
      SIGXCPU from ``RLIMIT_CPU``, ...).

Threat model (what is contained):
    * Runaway CPU / infinite loops: wall-clock timeout plus ``RLIMIT_CPU``.
    * Memory: ``RLIMIT_AS`` per process (``memory_mb``).
    * Fork bombs: ``RLIMIT_NPROC``. As root each concurrent run gets its own
      otherwise unused uid (default ``64000 + slot``, cross-process locked), so
      the per-uid process limit binds and concurrent runs cannot signal each
      other. A new PID namespace is headed by a tiny root init; when it dies the
      kernel kills every remaining descendant, even ones that called
      ``setsid()``. (The program itself is PID 2: a PID 1 would ignore
      default-action signals such as a self-sent SIGSEGV.)
    * Files: ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``, ``RLIMIT_CORE=0``. As root the
      program runs as the unprivileged uid with no supplementary groups. In a
      private mount namespace one private tmpfs (`SCRATCH_BYTES` and
      `SCRATCH_INODES` in all) provides a fresh, writable directory for each
      world-writable place (``/tmp``, ``/var/tmp``, ``/dev/shm``, ``/run/lock``;
      ``/tmp`` is the program's home and cwd and holds ``program.py``), so
      ``multiprocessing`` locks and temporary files work; every other mount is
      remounted read-only. The tmpfs is never mounted at a host path the program
      can see, so ``/proc/self/mountinfo`` names no host work dir, and it dies
      with the namespace. The project checkout is hidden under an empty
      read-only tmpfs and a fresh ``/proc`` shows only the sandbox's own
      processes. A set-up mount that fails raises `SandboxError` (the program is
      not run, nor scored); a mount that cannot be made read-only is listed in
      ``ExecResult.degraded`` and warned about once.
    * Network: a new, empty network namespace (loopback down) when the
      platform permits; see ``ExecResult.network_isolated`` and
      `isolation_info`.
    * Killing the harness: the harness is never the program's parent (the
      launcher is), as root the program cannot signal root processes, and with
      a PID namespace it cannot even name processes outside it.
    * Importing the project: ``-I -S`` (no site-packages, no user site, no
      ``PYTHON*`` variables, script dir not on ``sys.path``), a scrubbed
      environment (``PATH=/usr/bin:/bin``, ``HOME`` = work dir) and the work dir
      as cwd.

What is NOT protected (be aware):
    * Marker forgery by a deliberately adversarial program. The user code runs
      in the same interpreter as the wrapper, so code that introspects the
      wrapper (``sys._getframe``, ``gc.get_objects()``, ``/proc/self/mem``) can
      in principle find the nonce and write it to the result fd. No design that
      runs the asserts in the same process can prevent that; the nonce only
      defeats accidental and naive forgery (early exits, printed markers,
      patched builtins, reading argv/environ/files).
    * Without root: no uid drop, no namespaces. The program runs as the
      harness's user and can read and write whatever that user can (including
      the repository), and can signal any process of that user it can find
      (e.g. via ``/proc``); ``RLIMIT_NPROC`` counts all processes of that user.
      Descendants that leave the process group via ``setsid()`` may survive a
      timeout kill.
    * If namespaces are unavailable even as root (e.g. a restricted
      container), the uid drop still applies, but the program can write into
      world-writable directories such as ``/tmp`` (such files are *not* cleaned
      up) and can reach the network. Escaped descendants are then killed by uid.
    * Reading: anything readable by "others" on the host stays readable
      (system files, world-readable data). Secrets must not be world-readable.
      ``/proc/self/mountinfo`` still names the mount points the sandbox itself
      creates outside the scratch dirs: the interpreter's prefix and the masked
      project checkout (their paths, not their contents).
    * Aggregate resources: ``RLIMIT_AS`` is per process, so a fork bomb can use
      up to ``nproc * memory_mb`` of address space; there is no cgroup-based
      total memory quota. Files are bounded by the scratch tmpfs (which uses
      RAM) in a mount namespace; without one, only by ``RLIMIT_FSIZE`` per file.
      Kernel exploits, side channels and denial of service through CPU
      contention are out of scope.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import numbers
import os
import pwd
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

__all__ = [
    "ExecResult",
    "IsolationInfo",
    "SandboxError",
    "check_limits",
    "isolation_info",
    "run_program",
    "run_programs",
]

Status = Literal["passed", "failed", "timeout", "crashed"]

#: Maximum number of bytes kept from each of stdout / stderr.
MAX_OUTPUT_BYTES = 64 * 1024
#: First uid (and gid) used for sandboxed programs when the harness is root.
SANDBOX_UID_BASE = 64000
#: Number of uids in the pool (max. concurrent runs per machine).
SANDBOX_UID_SLOTS = 512
#: Default ``RLIMIT_NPROC`` (processes + threads of the sandbox uid).
DEFAULT_NPROC = 32
#: Default ``RLIMIT_FSIZE`` in bytes.
DEFAULT_FSIZE = 10 * 1024 * 1024
#: Default ``RLIMIT_NOFILE``.
DEFAULT_NOFILE = 64
#: Smallest accepted ``memory_mb`` (the interpreter needs about this much to start).
MIN_MEMORY_MB = 16
#: Largest accepted ``memory_mb`` (1 PiB; the limit must fit in ``rlim_t``).
MAX_MEMORY_MB = 1 << 30
#: Largest accepted ``timeout`` in seconds (one day).
MAX_TIMEOUT_S = 86400.0
#: Size of the private tmpfs behind ``/tmp``, ``/var/tmp``, ``/dev/shm``, ``/run/lock``
#: (all together) when a mount namespace is available.
SCRATCH_BYTES = 64 * 1024 * 1024
#: Maximum number of files and directories in that tmpfs.
SCRATCH_INODES = 8192
#: Seconds to wait for the process to go away after a SIGKILL.
_KILL_GRACE_S = 2.0

_IS_ROOT = os.geteuid() == 0
_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


@dataclass
class ExecResult:
    """Outcome of one sandboxed program.

    Attributes:
        status: ``"passed"``, ``"failed"``, ``"timeout"`` or ``"crashed"``.
        returncode: Exit code of the program, ``-signum`` if it was killed by
            a signal, ``None`` on timeout.
        stdout: Decoded stdout, truncated to `MAX_OUTPUT_BYTES`.
        stderr: Decoded stderr, truncated to `MAX_OUTPUT_BYTES`.
        duration_s: Wall-clock seconds from spawn to reaping.
        network_isolated: Whether the program ran in an empty network namespace.
        pid_namespace: Whether the program ran in its own PID namespace.
        mount_namespace: Whether the program ran in a private mount namespace.
        uid: The uid the program ran as (``None``: same as the harness).
        pgid: Process group id of the launcher (gone once this returns).
        degraded: One line per isolation step that could not be applied (e.g. a
            mount that could not be made read-only); empty when all applied. Each
            distinct line is also issued once as a `RuntimeWarning`.
    """

    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    network_isolated: bool = False
    pid_namespace: bool = False
    mount_namespace: bool = False
    uid: int | None = None
    pgid: int | None = field(default=None, repr=False)
    degraded: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        """True iff ``status == "passed"``."""
        return self.status == "passed"


class SandboxError(RuntimeError):
    """The sandbox could not be set up as documented, so the program was not run.

    Raised instead of scoring the program: an infrastructure failure (a mount that the
    kernel refused, a resource limit or uid drop that failed before the program
    started) is not the program's failure. The message is one line.
    """


@dataclass(frozen=True)
class IsolationInfo:
    """What isolation this machine provides (probed with a trivial program).

    Attributes:
        root: Whether the harness runs as root (enables the uid drop).
        network_isolated: Empty network namespace active.
        pid_namespace: PID namespace active.
        mount_namespace: Private mount namespace active.
        interpreter: Interpreter used for sandboxed programs.
    """

    root: bool
    network_isolated: bool
    pid_namespace: bool
    mount_namespace: bool
    interpreter: str


# --------------------------------------------------------------------------------------
# Launcher: run as ``python -I -S -c _LAUNCHER <json>``; single-threaded, so forking and
# doing privileged set-up here is safe.
# --------------------------------------------------------------------------------------
_LAUNCHER = r"""
import ctypes, json, os, resource, signal, sys
cfg = json.loads(sys.argv[1])
info_fd = cfg["info_fd"]
def report(**kw):
    try:
        os.write(info_fd, (json.dumps(kw) + "\n").encode())
    except Exception:
        pass
libc = ctypes.CDLL(None, use_errno=True)
NEWNS, NEWNET, NEWPID = 0x00020000, 0x40000000, 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
def mount(src, dst, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    if libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, "mount %s on %s: %s" % (fstype or src, dst, os.strerror(e)))
def umount(path, what):
    if libc.umount2(path.encode(), 2) != 0:  # MNT_DETACH
        e = ctypes.get_errno()
        raise OSError(e, "unmount %s: %s" % (what, os.strerror(e)))
def unshare(flags):
    return libc.unshare(flags) == 0
def setup_mounts():
    # Any failure here raises: the harness turns it into a SandboxError instead of
    # running the program with less isolation than documented.
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    work = cfg["cwd"]
    for hide, prefix in cfg["expose"]:
        # The interpreter lives under a dir "others" cannot traverse (e.g. /root):
        # put an empty tmpfs over that dir and bind only the interpreter back in.
        stage = os.path.join(work, ".stage")
        os.mkdir(stage, 0o700)
        mount(prefix, stage, None, MS_BIND | MS_REC)
        mount("tmpfs", hide, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
        os.makedirs(prefix, 0o755, exist_ok=True)
        mount(stage, prefix, None, MS_BIND | MS_REC)
        umount(stage, "interpreter staging dir")
        os.rmdir(stage)
    binds = []
    scratch = cfg["scratch"]
    if scratch:
        # One size-limited tmpfs, mounted at a staging dir, holds a fresh directory
        # for each writable place (the first is the program's home and cwd). Its
        # subdirs are bound onto /tmp, /var/tmp, /dev/shm, ... and the staging mount
        # is detached again, so mountinfo shows only neutral names (no host path), and
        # everything written dies with the mount namespace.
        stage = os.path.join(work, ".scratch")
        os.mkdir(stage, 0o700)
        mount("tmpfs", stage, "tmpfs", MS_NOSUID | MS_NODEV,
              "mode=0700,size=%d,nr_inodes=%d" % (cfg["scratch_bytes"], cfg["scratch_inodes"]))
        stage_fd = os.open(stage, os.O_RDONLY | os.O_DIRECTORY)
        via = "/proc/self/fd/%d/" % stage_fd  # still reachable once /tmp is covered
        names = []
        for i, d in enumerate(scratch):
            name = d.strip("/").replace("/", "_") or "root"
            sub = os.path.join(stage, name)
            os.mkdir(sub, 0o700)
            if i == 0:
                for fname in os.listdir(work):
                    src = os.path.join(work, fname)
                    if fname.startswith(".") or not os.path.isfile(src):
                        continue
                    with open(src, "rb") as f:
                        data = f.read()
                    dst = os.path.join(sub, fname)
                    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    try:
                        os.write(fd, data)
                    finally:
                        os.close(fd)
                    os.chown(dst, cfg["uid"], cfg["gid"])
                os.chown(sub, cfg["uid"], cfg["gid"])
            else:
                os.chmod(sub, 0o1777)
            names.append(name)
        for d, name in zip(scratch, names):
            mount(via + name, d, None, MS_BIND)
            binds.append(d)
        umount(via.rstrip("/"), "scratch staging dir")
        os.close(stage_fd)
    for d in cfg["mask"]:
        if os.path.exists(d):  # else already hidden (e.g. a checkout under /tmp)
            mount("tmpfs", d, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k,mode=0755")
    opt = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
           "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
    with open("/proc/self/mountinfo") as f:
        lines = f.read().splitlines()
    degraded = []
    for line in lines:
        parts = line.split()
        mp = parts[4].encode().decode("unicode_escape")
        if mp in binds or mp == "/proc" or mp.startswith("/proc/"):
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for o in parts[5].split(","):
            flags |= opt.get(o, 0)
        if libc.mount(None, mp.encode(), None, flags, None) != 0:
            degraded.append("%s stays writable (remount read-only: %s)"
                            % (mp, os.strerror(ctypes.get_errno())))
    return binds, degraded
net = pid = mnt = False
binds, degraded = [], []
if cfg["uid"] is not None:
    if unshare(NEWNS | NEWNET | NEWPID):
        net = pid = mnt = True
    else:
        mnt = unshare(NEWNS)
        net = unshare(NEWNET)
        pid = unshare(NEWPID)
    if mnt:
        try:
            binds, degraded = setup_mounts()
        except OSError as exc:
            report(setup_error="mount set-up failed: %s" % (exc,))
            os._exit(70)
report(net=net, pid=pid, mnt=mnt, degraded=degraded)
# Inside the mount namespace the program's files live in the first scratch dir (e.g.
# /tmp), a private tmpfs; rewrite work-dir paths accordingly.
work, inner = cfg["cwd"], (binds[0] if binds else cfg["cwd"])
argv = [a.replace(work, inner) if a.startswith(work) else a for a in cfg["argv"]]
env = {k: (v.replace(work, inner) if v.startswith(work) else v) for k, v in cfg["env"].items()}
def exec_program(life_r):
    # Final process: limits, privilege drop, exec the wrapper. Never returns.
    try:
        for name, value in cfg["limits"].items():
            resource.setrlimit(getattr(resource, name), (value, value))
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setgid(cfg["gid"])
            os.setuid(cfg["uid"])
        # Die with our parent (set after setuid, which clears it).
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
        if life_r is not None:
            if select.select([life_r], [], [], 0)[0]:
                os._exit(137)  # parent already gone
            os.close(life_r)
        os.chdir(inner)
        os.umask(0o077)
    except BaseException as exc:
        # The program never started: a harness problem, not a failed program.
        try:
            report(setup_error="sandbox launcher: %r" % (exc,))
        finally:
            os._exit(71)
    try:
        os.close(info_fd)
        os.execve(cfg["python"], argv, env)
    except BaseException as exc:
        try:
            os.write(2, ("sandbox launcher: %r\n" % (exc,)).encode())
        finally:
            os._exit(71)
def wait_for(target):
    # Wait for `target`, reaping any other (re-parented) children on the way.
    while True:
        try:
            got, st = os.waitpid(-1, 0)
        except ChildProcessError:
            return None
        except InterruptedError:
            continue
        if got == target:
            return st
def report_status(st):
    if st is None:
        report(error="lost child")
    elif os.WIFSIGNALED(st):
        report(signal=os.WTERMSIG(st))
    else:
        report(exit=os.WEXITSTATUS(st))
def ignore_signals():
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(s, signal.SIG_IGN)
import select
life_r, life_w = os.pipe()
child = os.fork()
if child == 0:
    os.close(life_w)
    if not pid:
        exec_program(life_r)
    # We are PID 1 of the new PID namespace (root). PID 1 ignores signals it has no
    # handler for, so the program must not be PID 1: we stay as a minimal init that
    # reaps, reports the program's status, and whose exit kills the whole namespace.
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    if select.select([life_r], [], [], 0)[0]:
        os._exit(137)
    os.close(life_r)
    if mnt:
        try:
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError as exc:  # the host's /proc would show every host process
            report(setup_error="mount set-up failed: %s" % (exc,))
            os._exit(70)
    prog = os.fork()
    if prog == 0:
        exec_program(None)
    for fd in cfg["close"]:
        os.close(fd)
    ignore_signals()
    report_status(wait_for(prog))
    os._exit(0)
os.close(life_r)
for fd in cfg["close"]:
    os.close(fd)
ignore_signals()
# SIGUSR1 from the harness (timeout): kill our child and reap it ourselves, so the
# PID namespace is fully torn down before we exit (no orphaned zombies).
signal.signal(signal.SIGUSR1, lambda *_: os.kill(child, signal.SIGKILL))
st = wait_for(child)
if not pid:
    report_status(st)
elif st is None or os.WIFSIGNALED(st) or os.WEXITSTATUS(st) != 0:
    report(error="sandbox init died: %r" % (st,))
os._exit(0)
"""

# --------------------------------------------------------------------------------------
# Wrapper: run by the sandbox interpreter as ``python -I -S -c _WRAPPER prog nfd rfd``.
# --------------------------------------------------------------------------------------
_WRAPPER = r"""
def _dlm_sandbox_main():
    import os, sys
    _write, _exit, _read, _close = os.write, os._exit, os.read, os.close
    out, err = sys.__stdout__, sys.__stderr__
    prog, nfd, rfd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    buf = bytearray()
    while True:
        chunk = _read(nfd, 256)
        if not chunk:
            break
        buf += chunk
    _close(nfd)
    token = bytes(buf)
    buf[:] = b""
    del buf
    def finish(code, ok):
        for stream in (sys.stdout, sys.stderr, out, err):
            try:
                stream.flush()
            except BaseException:
                pass
        if ok:
            _write(rfd, token)
        _exit(code)
    with open(prog, "rb") as f:
        src = f.read()
    sys.argv = [prog]
    glb = {"__name__": "__main__", "__file__": prog, "__builtins__": __builtins__}
    try:
        exec(compile(src, prog, "exec"), glb)
    except SystemExit as exc:
        code = exc.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            try:
                err.write(str(code) + "\n")
            except BaseException:
                pass
            code = 1
        finish(code & 0xFF, False)
    except BaseException:
        try:
            import traceback
            traceback.print_exc()
        except BaseException:
            pass
        finish(1, False)
    finish(0, True)
_dlm_sandbox_main()
"""


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------
def _others_can_traverse(path: str) -> str | None:
    """Return the first ancestor of ``path`` that "others" cannot search, else None."""
    p = Path(path)
    for anc in [*reversed(p.parents), p]:
        try:
            mode = anc.stat().st_mode
        except OSError:
            return str(anc)
        if anc != p and not mode & 0o001:
            return str(anc)
    return None


@lru_cache(maxsize=1)
def _interpreter_plan() -> tuple[str, list[tuple[str, str]]]:
    """Pick the sandbox interpreter and what must be exposed in the mount namespace.

    Returns:
        ``(python, expose)`` where ``expose`` lists ``(hidden_dir, prefix)`` pairs:
        the launcher covers ``hidden_dir`` with a tmpfs and binds ``prefix`` back.
    """
    python = os.path.realpath(sys.executable)
    if not _IS_ROOT:
        return python, []
    prefix = os.path.realpath(sys.base_prefix)
    blocked = _others_can_traverse(prefix)
    if blocked is None or blocked == prefix:
        return python, []
    return python, [(blocked, prefix)]


def _world_writable_dirs() -> list[str]:
    seen: list[str] = []
    for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock"):
        real = os.path.realpath(d)
        try:
            st = os.stat(real)
        except OSError:
            continue
        if st.st_mode & 0o002 and real not in seen:
            seen.append(real)
    return seen


_slot_lock = threading.Lock()
_slots_in_use: set[int] = set()


@contextlib.contextmanager
def _uid_slot() -> Iterator[int | None]:
    """Reserve a sandbox uid (root only), exclusive across threads and processes."""
    if not _IS_ROOT:
        yield None
        return
    lock_dir = Path(tempfile.gettempdir()) / "dlm_sandbox_uid_locks"
    lock_dir.mkdir(mode=0o700, exist_ok=True)
    while True:
        for slot in range(SANDBOX_UID_SLOTS):
            uid = SANDBOX_UID_BASE + slot
            with _slot_lock:
                if uid in _slots_in_use:
                    continue
                try:
                    pwd.getpwuid(uid)
                    continue  # a real account; never reuse it
                except KeyError:
                    pass
                fd = os.open(lock_dir / f"{uid}.lock", os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    continue
                _slots_in_use.add(uid)
            try:
                yield uid
            finally:
                with _slot_lock:
                    _slots_in_use.discard(uid)
                os.close(fd)  # releases the flock
            return
        time.sleep(0.05)


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of ``uid`` (used when no PID namespace is available)."""
    code = (
        "import os,signal,sys\n"
        "os.setgroups([]);os.setgid(int(sys.argv[1]));os.setuid(int(sys.argv[1]))\n"
        "for _ in range(50):\n"
        "    try: os.kill(-1, signal.SIGKILL)\n"
        "    except ProcessLookupError: break\n"
    )
    subprocess.run(
        [sys.executable, "-I", "-S", "-c", code, str(uid)],
        env={"PATH": "/usr/bin:/bin"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
        timeout=30,
    )


def _decode(data: bytearray, dropped: int) -> str:
    text = bytes(data).decode("utf-8", errors="replace")
    if dropped:
        text += f"\n... [truncated {dropped} bytes]"
    return text


def _show(value: object) -> str:
    """A short one-line repr of ``value`` for error messages."""
    try:
        text = repr(value)
    except Exception:  # a hostile __repr__ must not hide the real error
        text = f"<{type(value).__name__} object>"
    text = " ".join(text.split())
    return text if len(text) <= 60 else text[:57] + "..."


def _check_timeout(timeout: object) -> float:
    """``timeout`` as a float, or a one-line error naming the accepted range."""
    accepted = f"timeout must be a number of seconds in (0, {MAX_TIMEOUT_S:g}]"
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(
            f"{accepted}, got {type(timeout).__name__} {_show(timeout)}; pass e.g. timeout=10.0"
        )
    value = float(timeout)
    if not math.isfinite(value) or not 0 < value <= MAX_TIMEOUT_S:
        raise ValueError(f"{accepted}, got {_show(timeout)}; pass e.g. timeout=10.0")
    return value


def _check_int(name: str, value: object, low: int, high: int, unit: str, example: int) -> int:
    """``value`` as an int in ``[low, high]``, or a one-line error naming ``name``.

    ``None``, ``0`` and negative values get a hint that there is no "no limit" value
    (``RLIMIT_*`` treats ``-1`` as unlimited, which must never happen by accident).
    """
    accepted = f"{name} must be an int number of {unit} in [{low}, {high}]"
    fix = f"pass e.g. {name}={example}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        note = " (there is no 'no limit' value)" if value is None else ""
        got = f"{type(value).__name__} {_show(value)}"
        raise TypeError(f"{accepted}, got {got}{note}; {fix}")
    number = int(value)
    if not low <= number <= high:
        note = " (there is no 'no limit' value)" if number <= 0 else ""
        raise ValueError(f"{accepted}, got {number}{note}; {fix}")
    return number


def _check_workers(workers: object) -> int | None:
    """``workers`` as ``None`` (CPU count) or an int ``>= 1``."""
    if workers is None:
        return None
    if isinstance(workers, bool) or not isinstance(workers, numbers.Integral):
        raise TypeError(
            f"workers must be None (one per CPU) or an int >= 1, got "
            f"{type(workers).__name__} {_show(workers)}; pass e.g. workers=4"
        )
    if int(workers) < 1:
        raise ValueError(
            f"workers must be None (one per CPU) or an int >= 1, got {int(workers)}; "
            f"pass e.g. workers=4"
        )
    return int(workers)


def check_limits(
    *, timeout: object, memory_mb: object, workers: object = None
) -> tuple[float, int, int | None]:
    """Validate the sandbox options that tasks pass through, before any work starts.

    Args:
        timeout: Wall-clock seconds per program: a finite number in
            ``(0, MAX_TIMEOUT_S]``.
        memory_mb: ``RLIMIT_AS`` in MiB: an int in ``[MIN_MEMORY_MB, MAX_MEMORY_MB]``
            (there is no "no limit" value; ``bool`` is not an int here).
        workers: ``None`` (one per CPU) or an int ``>= 1``.

    Returns:
        ``(timeout, memory_mb, workers)`` as ``float``, ``int`` and ``int | None``.

    Raises:
        TypeError: A value of the wrong type (one line, naming the option).
        ValueError: A value out of range, NaN or infinite (one line, naming the option).
    """
    return (
        _check_timeout(timeout),
        _check_int("memory_mb", memory_mb, MIN_MEMORY_MB, MAX_MEMORY_MB, "MiB", 1024),
        _check_workers(workers),
    )


def _check_source(source: object, label: str) -> None:
    """Raise a one-line error if ``source`` is not a str that encodes as UTF-8."""
    if not isinstance(source, str):
        kind = type(source).__name__
        if isinstance(source, (bytes, bytearray)):
            fix = "decode it first, e.g. source.decode('utf-8')"
        elif source is None:
            fix = "pass the program text (was the program never built?)"
        else:
            fix = "pass the program text as str"
        raise TypeError(f"{label} must be a str of Python source, got {kind}; {fix}")
    try:
        source.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = source[exc.start]
        line = source.count("\n", 0, exc.start) + 1
        raise ValueError(
            f"{label} holds a lone surrogate {bad!r} at index {exc.start} (line {line}), "
            f"which is not valid UTF-8; repair or drop it, e.g. "
            f"text.encode('utf-8', 'replace').decode('utf-8')"
        ) from None


_warned: set[str] = set()
_warned_lock = threading.Lock()


def _warn_once(lines: Sequence[str]) -> None:
    """Issue each degradation line once per process as a `RuntimeWarning`."""
    for line in lines:
        with _warned_lock:
            if line in _warned:
                continue
            _warned.add(line)
        warnings.warn(f"sandbox isolation degraded: {line}", RuntimeWarning, stacklevel=4)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
def run_program(
    source: str,
    timeout: float = 10.0,
    *,
    memory_mb: int = 1024,
    nproc: int = DEFAULT_NPROC,
    max_file_bytes: int = DEFAULT_FSIZE,
) -> ExecResult:
    """Run one untrusted Python program in the sandbox.

    All arguments are checked before anything starts.

    Args:
        source: Full program text (solution plus its asserts); a str that encodes as
            UTF-8 (no lone surrogates).
        timeout: Wall-clock limit in seconds, a finite number in ``(0, MAX_TIMEOUT_S]``;
            ``RLIMIT_CPU`` is ``int(timeout) + 2``.
        memory_mb: ``RLIMIT_AS`` in MiB for every process of the program, an int in
            ``[MIN_MEMORY_MB, MAX_MEMORY_MB]`` (there is no "no limit" value).
        nproc: ``RLIMIT_NPROC`` (processes and threads of the sandbox uid), an int >= 1.
        max_file_bytes: ``RLIMIT_FSIZE`` in bytes, an int >= 1.

    Returns:
        The `ExecResult`; see the module docstring for the status semantics.

    Raises:
        TypeError: ``source`` is not a str, or an option has the wrong type.
        ValueError: ``source`` holds a lone surrogate, or an option is out of range.
        SandboxError: The isolation could not be set up (e.g. a mount failed); the
            program did not run.
    """
    _check_source(source, "source")
    timeout, memory_mb, _ = check_limits(timeout=timeout, memory_mb=memory_mb)
    nproc = _check_int("nproc", nproc, 1, 1 << 22, "processes", DEFAULT_NPROC)
    max_file_bytes = _check_int(
        "max_file_bytes", max_file_bytes, 1, 1 << 62, "bytes", DEFAULT_FSIZE
    )
    python, expose = _interpreter_plan()
    with _uid_slot() as uid:
        return _run_one(source, timeout, memory_mb, nproc, max_file_bytes, uid, python, expose)


def _run_one(
    source: str,
    timeout: float,
    memory_mb: int,
    nproc: int,
    max_file_bytes: int,
    uid: int | None,
    python: str,
    expose: list[tuple[str, str]],
) -> ExecResult:
    workdir = tempfile.mkdtemp(prefix="dlm_sbx_")
    fds: list[int] = []
    try:
        prog = os.path.join(workdir, "program.py")
        with open(prog, "w", encoding="utf-8") as f:
            f.write(source)
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chown(prog, uid, uid)
        os.chmod(workdir, 0o700)

        token = secrets.token_hex(32).encode()
        nonce_r, nonce_w = os.pipe()
        result_r, result_w = os.pipe()
        info_r, info_w = os.pipe()
        fds += [nonce_r, nonce_w, result_r, result_w, info_r, info_w]
        os.write(nonce_w, token)
        os.close(nonce_w)
        fds.remove(nonce_w)

        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": workdir,
            "TMPDIR": workdir,
            "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0",
            "PYTHONIOENCODING": "utf-8",
        }
        limits = {
            "RLIMIT_AS": int(memory_mb) * 1024 * 1024,
            "RLIMIT_CPU": int(timeout) + 2,
            "RLIMIT_NPROC": int(nproc),
            "RLIMIT_FSIZE": int(max_file_bytes),
            "RLIMIT_NOFILE": DEFAULT_NOFILE,
            "RLIMIT_CORE": 0,
        }
        cfg: dict[str, Any] = {
            "python": python,
            "argv": [python, "-I", "-S", "-c", _WRAPPER, prog, str(nonce_r), str(result_w)],
            "env": env,
            "cwd": workdir,
            "uid": uid,
            "gid": uid,
            "limits": limits,
            "info_fd": info_w,
            "close": [nonce_r, result_w],
            "expose": expose,
            "scratch": _world_writable_dirs() if uid is not None else [],
            "scratch_bytes": SCRATCH_BYTES,
            "scratch_inodes": SCRATCH_INODES,
            "mask": [_PROJECT_ROOT] if uid is not None else [],
        }
        start = time.monotonic()
        deadline = start + timeout
        # start_new_session: the launcher leads its own session/process group, so a
        # timeout can SIGKILL the whole group and the program cannot signal our group.
        proc = subprocess.Popen(
            [python, "-I", "-S", "-c", _LAUNCHER, json.dumps(cfg)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(nonce_r, result_w, info_w),
            env={"PATH": "/usr/bin:/bin"},
            cwd=workdir,
            start_new_session=True,
        )
        for fd in (nonce_r, result_w, info_w):
            os.close(fd)
            fds.remove(fd)
        assert proc.stdout is not None and proc.stderr is not None
        bufs: dict[int, bytearray] = {}
        dropped: dict[int, int] = {}
        timed_out = False
        with selectors.DefaultSelector() as sel:
            for fd in (proc.stdout.fileno(), proc.stderr.fileno(), result_r, info_r):
                bufs[fd] = bytearray()
                dropped[fd] = 0
                sel.register(fd, selectors.EVENT_READ)
            while sel.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                for key, _ in sel.select(min(remaining, 0.5)):
                    fd = int(key.fd)
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        sel.unregister(fd)
                        continue
                    room = MAX_OUTPUT_BYTES - len(bufs[fd])
                    bufs[fd] += chunk[: max(room, 0)]
                    dropped[fd] += max(len(chunk) - max(room, 0), 0)
        if not timed_out:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                timed_out = True
        if timed_out:
            # Ask the launcher to SIGKILL its child and reap it (tearing down the PID
            # namespace); then SIGKILL whatever is left of the process group.
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGUSR1)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(_KILL_GRACE_S)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            proc.wait(_KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        duration = time.monotonic() - start

        infos: dict[str, Any] = {}
        for line in bytes(bufs[info_r]).decode(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                infos.update(json.loads(line))
        pidns = bool(infos.get("pid"))
        if uid is not None and not pidns:
            _kill_uid(uid)  # reap escaped descendants (setsid) without a PID namespace

        stdout = _decode(bufs[proc.stdout.fileno()], dropped[proc.stdout.fileno()])
        stderr = _decode(bufs[proc.stderr.fileno()], dropped[proc.stderr.fileno()])
        proc.stdout.close()
        proc.stderr.close()
        if "setup_error" in infos:
            detail = " ".join(str(infos["setup_error"]).split())
            raise SandboxError(
                f"sandbox set-up failed, program not run: {detail}; the documented "
                f"isolation needs root with mount namespaces and writable mount points"
            )
        degraded = tuple(" ".join(str(d).split()) for d in infos.get("degraded") or ())
        _warn_once(degraded)
        if "error" in infos:
            stderr += f"\n[sandbox] {infos['error']}"

        status: Status
        returncode: int | None
        if timed_out:
            status, returncode = "timeout", None
        elif "signal" in infos:
            status, returncode = "crashed", -int(infos["signal"])
        elif "exit" in infos:
            returncode = int(infos["exit"])
            ok = returncode == 0 and bytes(bufs[result_r]) == token
            status = "passed" if ok else "failed"
        else:  # the launcher itself died or failed before reporting
            returncode = proc.returncode
            status = "crashed" if (returncode or 0) < 0 else "failed"
        return ExecResult(
            status=status,
            returncode=returncode,
            stdout=stdout,
            stderr=stderr,
            duration_s=duration,
            network_isolated=bool(infos.get("net")),
            pid_namespace=pidns,
            mount_namespace=bool(infos.get("mnt")),
            uid=uid,
            pgid=proc.pid,
            degraded=degraded,
        )
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)


def run_programs(
    sources: Sequence[str],
    timeout: float = 10.0,
    workers: int | None = None,
    progress: bool = False,
    *,
    memory_mb: int = 1024,
) -> list[ExecResult]:
    """Run many programs in parallel sandboxes.

    A thread pool drives one sandboxed subprocess per program (threads only wait
    on pipes, so the GIL is not a bottleneck). Every source and option is checked
    before the first program starts.

    Args:
        sources: Program texts, each a str that encodes as UTF-8 (a single str is
            rejected: use `run_program`).
        timeout: Per-program wall-clock limit in seconds (see `run_program`).
        workers: Parallel programs, an int >= 1; default ``os.cpu_count()``.
        progress: Show a tqdm progress bar.
        memory_mb: Per-process ``RLIMIT_AS`` in MiB (see `run_program`).

    Returns:
        One `ExecResult` per source, in input order.

    Raises:
        TypeError: ``sources`` is not a sequence of str (the message names the index),
            or an option has the wrong type.
        ValueError: A source holds a lone surrogate (the message names the index), or an
            option is out of range.
        SandboxError: The isolation could not be set up; programs not yet started are
            cancelled.
    """
    if isinstance(sources, (str, bytes, bytearray)):
        raise TypeError(
            f"sources must be a sequence of program strings, got one {type(sources).__name__}; "
            f"use run_program for a single program or pass [source]"
        )
    try:
        srcs = list(sources)
    except TypeError:
        raise TypeError(
            f"sources must be a sequence of program strings, got {type(sources).__name__}; "
            f"pass a list of str"
        ) from None
    for i, src in enumerate(srcs):
        _check_source(src, f"sources[{i}]")
    timeout, memory_mb, n_given = check_limits(
        timeout=timeout, memory_mb=memory_mb, workers=workers
    )
    n_workers = n_given or os.cpu_count() or 1
    results: list[ExecResult | None] = [None] * len(srcs)
    bar = None
    if progress:
        bar = tqdm(total=len(srcs), desc="sandbox", unit="prog")
    with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="sandbox") as pool:
        futures = {
            pool.submit(run_program, src, timeout, memory_mb=memory_mb): i
            for i, src in enumerate(srcs)
        }
        try:
            for fut in futures:
                results[futures[fut]] = fut.result()
                if bar is not None:
                    bar.update(1)
        except BaseException:
            for fut in futures:
                fut.cancel()  # do not start the rest after a set-up error or Ctrl-C
            raise
        finally:
            if bar is not None:
                bar.close()
    return [r for r in results if r is not None]


@lru_cache(maxsize=1)
def isolation_info() -> IsolationInfo:
    """Probe (once) which isolation features are active on this machine.

    Returns:
        An `IsolationInfo` describing root / network / PID / mount isolation.
    """
    res = run_program("pass", timeout=30.0)
    return IsolationInfo(
        root=_IS_ROOT,
        network_isolated=res.network_isolated,
        pid_namespace=res.pid_namespace,
        mount_namespace=res.mount_namespace,
        interpreter=_interpreter_plan()[0],
    )


def _bench(n: int, workers: int | None) -> None:
    srcs = [f"x = {i}\nassert x * 2 == {2 * i}\n" for i in range(n)]
    t0 = time.perf_counter()
    res = run_programs(srcs, timeout=10.0, workers=workers)
    dt = time.perf_counter() - t0
    n_pass = sum(r.passed for r in res)
    print(f"isolation: {isolation_info()}")
    print(
        f"{n} trivial programs, workers={workers or os.cpu_count()}: {dt:.2f} s, "
        f"{n / dt:.1f} programs/s, passed={n_pass}/{n}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point: ``python -m dlm_decode.sandbox --bench N``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", type=int, default=0, help="run N trivial programs")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    if args.bench:
        _bench(args.bench, args.workers)
    else:
        parser.print_help()


if __name__ == "__main__":
    main()
