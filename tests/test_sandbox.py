"""Tests for `dlm_decode.sandbox`: hostile programs are contained and never pass."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import textwrap
import time
from pathlib import Path

import pytest

from dlm_decode import sandbox
from dlm_decode.sandbox import ExecResult, isolation_info, run_program, run_programs

IS_ROOT = os.geteuid() == 0
REPO = Path(sandbox.__file__).resolve().parent.parent
HOSTILE_TIMEOUT = 2.0


def run(src: str, timeout: float = HOSTILE_TIMEOUT, **kw: int) -> ExecResult:
    return run_program(textwrap.dedent(src), timeout=timeout, **kw)


def uid_processes(uid: int) -> list[int]:
    """Pids of live (non-zombie) processes whose real uid is ``uid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields["Uid"].split()[0]) == uid and "Z" not in fields["State"]:
            pids.append(int(entry))
    return pids


def assert_gone(res: ExecResult) -> None:
    """The launcher's process group and (as root) every process of the sandbox uid."""
    assert res.pgid is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(res.pgid, 0)
    if res.uid is not None:
        assert uid_processes(res.uid) == []


def assert_harness_ok() -> None:
    res = run("assert sum(range(5)) == 10\n", timeout=10.0)
    assert res.status == "passed", res


# ------------------------------------------------------------------------ normal cases
def test_correct_program_passes() -> None:
    res = run("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('ok')\n")
    assert res.status == "passed", res
    assert res.returncode == 0 and res.stdout == "ok\n"
    assert res.duration_s < HOSTILE_TIMEOUT
    if IS_ROOT:
        assert res.uid is not None and res.uid != 0


def test_failing_assert_fails() -> None:
    res = run("assert 1 + 1 == 3\n")
    assert res.status == "failed" and res.returncode == 1
    assert "AssertionError" in res.stderr


def test_syntax_error_fails() -> None:
    res = run("def f(:\n    pass\n")
    assert res.status == "failed"
    assert "SyntaxError" in res.stderr


def test_output_is_truncated() -> None:
    res = run("import sys\nsys.stdout.write('x' * 1_000_000)\n")
    assert res.status == "passed"
    assert len(res.stdout) < sandbox.MAX_OUTPUT_BYTES + 100
    assert "truncated" in res.stdout


def test_batched_runs_in_order() -> None:
    srcs = [f"print({i})\nassert {i} % 5 != 0\n" for i in range(40)]
    t0 = time.monotonic()
    results = run_programs(srcs, timeout=10.0, workers=2)
    assert time.monotonic() - t0 < 30
    assert len(results) == 40
    for i, res in enumerate(results):
        assert res.stdout == f"{i}\n"
        assert res.status == ("failed" if i % 5 == 0 else "passed"), (i, res)


def test_isolation_info_is_reported() -> None:
    info = isolation_info()
    assert info.root == IS_ROOT
    if not IS_ROOT:
        assert not info.network_isolated


# ------------------------------------------------------------------------ hostile cases
def test_infinite_loop_times_out() -> None:
    t0 = time.monotonic()
    res = run("while True:\n    pass\n")
    elapsed = time.monotonic() - t0
    assert res.status == "timeout" and res.returncode is None
    assert elapsed < HOSTILE_TIMEOUT + 1.5
    assert_gone(res)
    assert_harness_ok()


def test_fork_bomb_is_contained() -> None:
    res = run(
        """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """
    )
    assert res.status in ("timeout", "crashed", "failed")
    assert_gone(res)
    assert_harness_ok()


@pytest.mark.skipif(not IS_ROOT, reason="setsid() escapees are only reaped as root (namespaces)")
def test_setsid_daemon_is_reaped() -> None:
    res = run(
        """
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(600)
            os._exit(0)
        """
    )
    assert res.status == "passed"  # the program itself finished normally
    time.sleep(0.2)
    assert_gone(res)


def test_huge_allocation_is_not_passed() -> None:
    res = run("x = bytearray(10 * 1024**3)\nassert len(x) > 0\n", memory_mb=512)
    assert res.status in ("crashed", "failed"), res
    assert_harness_ok()


def test_write_outside_workdir() -> None:
    name = f"dlm_sbx_escape_{secrets.token_hex(8)}"
    tmp_target = Path("/tmp") / name
    repo_target = REPO / name
    res = run(
        f"""
        for path in ({str(tmp_target)!r}, {str(repo_target)!r}):
            try:
                with open(path, "w") as f:
                    f.write("pwned")
            except OSError as exc:
                print("blocked", path, exc)
        """
    )
    try:
        if IS_ROOT:
            # /tmp inside the sandbox is the (deleted) work dir, the repo is hidden and
            # read-only (or simply not writable by the unprivileged uid).
            assert not tmp_target.exists()
            assert not repo_target.exists()
        elif os.access(REPO, os.W_OK):
            pytest.skip("not root: the program runs as our uid and can write where we can")
    finally:
        for p in (tmp_target, repo_target):
            p.unlink(missing_ok=True)
    assert res.status != "timeout"


@pytest.mark.skipif(not IS_ROOT, reason="without root the program can delete what we can delete")
def test_delete_files_outside_is_blocked(tmp_path: Path) -> None:
    sentinels = [tmp_path / "sentinel.txt", REPO / f".sentinel_{secrets.token_hex(6)}"]
    for s in sentinels:
        s.write_text("keep me")
    try:
        res = run(
            f"""
            import os, shutil
            for p in {[str(s) for s in sentinels]!r}:
                os.remove(p)
            """
        )
        assert res.status == "failed"
        for s in sentinels:
            assert s.read_text() == "keep me"
    finally:
        for s in sentinels:
            s.unlink(missing_ok=True)


def test_killing_the_parent_fails_and_harness_survives() -> None:
    attempts = [
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nimport time\ntime.sleep(1)\n",
        "import os, signal\nos.killpg(os.getpgid(0), signal.SIGKILL)\n",
        f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)\n",
        f"import os, signal\nos.killpg({os.getpgid(0)}, signal.SIGKILL)\n",
    ]
    if IS_ROOT:  # kill(-1) as our own uid would hit every process of ours
        attempts.append("import os, signal\nos.kill(-1, signal.SIGKILL)\n")
    for src in attempts:
        res = run(src)
        assert res.status != "passed", (src, res)
        assert_gone(res)
    assert_harness_ok()


@pytest.mark.parametrize(
    "src",
    [
        "import sys\nsys.exit(0)\nassert False\n",
        "import os\nos._exit(0)\nassert False\n",
        "raise SystemExit\nassert False\n",
        "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\nassert False\n",
    ],
    ids=["sys.exit", "os._exit", "SystemExit", "self-SIGTERM"],
)
def test_early_exit_is_not_passed(src: str) -> None:
    res = run(src)
    assert res.status != "passed", res


@pytest.mark.parametrize(
    "src",
    [
        # Replacing AssertionError does not change what `assert` raises.
        "import builtins\nbuiltins.AssertionError = type('A', (Exception,), {})\nassert 1 == 2\n",
        # A patched __import__ cannot reach the harness epilogue.
        "import builtins\nreal = builtins.__import__\n"
        "builtins.__import__ = lambda *a, **k: real(*a, **k)\nassert 1 == 2\n",
        # Patched sys.exit / os._exit / os.write are not used by the wrapper.
        "import sys, os\nsys.exit = lambda *a: None\nos._exit = lambda *a: None\n"
        "os.write = lambda *a: 0\nassert 1 == 2\n",
        # Printing a fake marker to stdout / stderr means nothing.
        "print('PASSED')\nprint('__DLM_SANDBOX_OK__')\nimport os\nos._exit(0)\n",
        # Swallowing the assertion via excepthook.
        "import sys\nsys.excepthook = lambda *a: None\nassert False\n",
        # Forge attempt: scrape argv, environ and every inherited fd, then write what
        # was found to every fd before exiting 0 early.
        """
import os
loot = open('/proc/self/cmdline', 'rb').read() + open('/proc/self/environ', 'rb').read()
for fd in range(3, 64):
    try:
        os.set_blocking(fd, False)
        loot += os.read(fd, 4096)
    except OSError:
        pass
for fd in range(3, 64):
    try:
        os.write(fd, loot[-64:])
        os.write(fd, loot)
    except OSError:
        pass
os._exit(0)
""",
    ],
    ids=["AssertionError", "__import__", "sys.exit+os", "fake-marker", "excepthook", "scrape"],
)
def test_monkeypatching_and_forgery_are_not_passed(src: str) -> None:
    res = run(src)
    assert res.status != "passed", res


def test_network_is_blocked() -> None:
    if not isolation_info().network_isolated:
        pytest.skip("network namespace not active here (needs root + unshare permission)")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        for target in (("127.0.0.1", port), ("1.1.1.1", 53)):
            res = run(
                f"""
                import socket
                s = socket.socket()
                s.settimeout(1)
                s.connect({target!r})
                """
            )
            assert res.status == "failed", (target, res)
            assert res.network_isolated
    finally:
        server.close()


def test_project_is_not_importable() -> None:
    res = run("import dlm_decode\n")
    assert res.status == "failed"
    assert "ModuleNotFoundError" in res.stderr
    if isolation_info().mount_namespace:
        # The checkout is masked, so even an explicit sys.path entry does not help.
        res = run(f"import sys\nsys.path.insert(0, {str(REPO)!r})\nimport dlm_decode\n")
        assert res.status == "failed"


def test_sigsegv_is_crashed() -> None:
    res = run("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    assert res.status == "crashed" and res.returncode == -signal.SIGSEGV


# ------------------------------------------------------------------------ argument checks
def _nothing_may_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any program would be started."""

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("a program was started despite a bad argument")

    monkeypatch.setattr(sandbox, "_run_one", fail)


def _one_line(err: pytest.ExceptionInfo[BaseException], *parts: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, (part, msg)
    return msg


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (-1, ValueError),
        (0, ValueError),
        (sandbox.MIN_MEMORY_MB - 1, ValueError),
        (sandbox.MAX_MEMORY_MB + 1, ValueError),
        (True, TypeError),
        (1.5, TypeError),
        (float("nan"), TypeError),
        (None, TypeError),
        ("512", TypeError),
    ],
    ids=["-1", "0", "below-min", "above-max", "bool", "float", "nan", "None", "str"],
)
def test_bad_memory_mb_is_a_one_line_error(
    value: object, kind: type[Exception], monkeypatch: pytest.MonkeyPatch
) -> None:
    _nothing_may_run(monkeypatch)
    accepted = f"memory_mb must be an int number of MiB in [{sandbox.MIN_MEMORY_MB}, "
    for call in (
        lambda: run_program("pass", memory_mb=value),  # type: ignore[arg-type]
        lambda: run_programs(["pass"], memory_mb=value),  # type: ignore[arg-type]
    ):
        with pytest.raises(kind) as err:
            call()
        msg = _one_line(err, accepted, "pass e.g. memory_mb=1024")
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and value <= 0):
            assert "there is no 'no limit' value" in msg


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (-float("inf"), ValueError),
        (0, ValueError),
        (-1.0, ValueError),
        (sandbox.MAX_TIMEOUT_S * 2, ValueError),
        ("5", TypeError),
        (None, TypeError),
        (True, TypeError),
    ],
    ids=["nan", "inf", "-inf", "0", "negative", "too-long", "str", "None", "bool"],
)
def test_bad_timeout_is_a_one_line_error(
    value: object, kind: type[Exception], monkeypatch: pytest.MonkeyPatch
) -> None:
    _nothing_may_run(monkeypatch)
    for call in (
        lambda: run_program("pass", timeout=value),  # type: ignore[arg-type]
        lambda: run_programs(["pass"], timeout=value),  # type: ignore[arg-type]
    ):
        with pytest.raises(kind) as err:
            call()
        _one_line(err, "timeout must be a number of seconds in (0, 86400]", "timeout=10.0")


@pytest.mark.parametrize(
    ("kwargs", "kind", "name"),
    [
        ({"nproc": -1}, ValueError, "nproc"),
        ({"nproc": 2.0}, TypeError, "nproc"),
        ({"max_file_bytes": 0}, ValueError, "max_file_bytes"),
        ({"max_file_bytes": None}, TypeError, "max_file_bytes"),
    ],
)
def test_bad_rlimits_are_one_line_errors(
    kwargs: dict[str, object], kind: type[Exception], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _nothing_may_run(monkeypatch)
    with pytest.raises(kind) as err:
        run_program("pass", **kwargs)  # type: ignore[arg-type]
    _one_line(err, f"{name} must be an int", f"pass e.g. {name}=")


@pytest.mark.parametrize(
    ("workers", "kind"), [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError)]
)
def test_bad_workers_is_a_one_line_error(
    workers: object, kind: type[Exception], monkeypatch: pytest.MonkeyPatch
) -> None:
    _nothing_may_run(monkeypatch)
    with pytest.raises(kind) as err:
        run_programs(["pass"], workers=workers)  # type: ignore[arg-type]
    _one_line(err, "workers must be None (one per CPU) or an int >= 1", "workers=4")


@pytest.mark.parametrize(
    ("bad", "kind", "parts"),
    [
        (b"pass", TypeError, ("must be a str of Python source, got bytes", "decode it first")),
        (None, TypeError, ("must be a str of Python source, got NoneType", "program text")),
        (
            "x = 1\ny = '\ud800'\n",
            ValueError,
            ("holds a lone surrogate '\\ud800' at index 11 (line 2)", "not valid UTF-8"),
        ),
    ],
    ids=["bytes", "None", "lone-surrogate"],
)
def test_bad_sources_are_rejected_before_any_program_starts(
    bad: object, kind: type[Exception], parts: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    _nothing_may_run(monkeypatch)
    with pytest.raises(kind) as err:
        run_program(bad)  # type: ignore[arg-type]
    assert str(err.value).startswith("source ")
    _one_line(err, *parts)
    # run_programs checks every source first: the good ones before it never start.
    with pytest.raises(kind) as err:
        run_programs(["pass", "assert True", bad, "pass"])  # type: ignore[list-item]
    assert str(err.value).startswith("sources[2] ")
    _one_line(err, *parts)


def test_a_single_string_is_not_a_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    _nothing_may_run(monkeypatch)
    with pytest.raises(TypeError) as err:
        run_programs("print(1)")
    _one_line(err, "got one str", "use run_program")


# ------------------------------------------------------------------------ scratch dirs
#: The usual world-writable dirs this host has (programs may expect to write there).
SCRATCH_DIRS = [
    d
    for d in ("/var/tmp", "/run/lock", "/dev/shm")
    if os.path.realpath(d) in sandbox._world_writable_dirs()
]


def test_multiprocessing_lock_and_scratch_dirs_are_writable() -> None:
    name = f"dlm_sbx_scratch_{secrets.token_hex(6)}"
    targets = [Path(d) / name for d in ["/tmp", *SCRATCH_DIRS]]
    try:
        res = run(
            f"""
            import multiprocessing, os
            lock = multiprocessing.Lock()  # a POSIX semaphore in /dev/shm
            with lock:
                pass
            child = multiprocessing.get_context("fork").Process(target=lock.acquire)
            child.start()
            child.join(5)
            assert child.exitcode == 0, child.exitcode
            for path in {[str(t) for t in targets]!r}:
                with open(path, "w") as f:
                    f.write("scratch")
                with open(path) as f:
                    assert f.read() == "scratch"
            print("ok")
            """,
            timeout=20.0,
        )
        assert res.status == "passed", res
        assert res.stdout == "ok\n" and res.degraded == ()
        if res.mount_namespace:
            # Private scratch space: nothing reached the host, and it died with the run.
            assert [t for t in targets if t.exists()] == []
        assert_gone(res)
    finally:
        for t in targets:
            t.unlink(missing_ok=True)


def test_scratch_space_is_size_limited() -> None:
    if not isolation_info().mount_namespace:
        pytest.skip("no mount namespace here: the program writes to the host's directories")
    res = run(
        """
        import errno
        total = 0
        chunk = b"x" * (1 << 20)
        for i in range(1000):
            try:
                with open(f"/dev/shm/f{i}", "wb") as f:
                    f.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
            total += len(chunk)
        else:
            raise AssertionError("no size limit")
        print(total)
        """,
        timeout=20.0,
    )
    assert res.status == "passed", res
    assert sandbox.SCRATCH_BYTES // 2 < int(res.stdout) <= sandbox.SCRATCH_BYTES


def test_program_does_not_see_the_host_work_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []
    real_mkdtemp = sandbox.tempfile.mkdtemp

    def recording_mkdtemp(*args: object, **kwargs: object) -> str:
        path = real_mkdtemp(*args, **kwargs)  # type: ignore[call-overload]
        made.append(path)
        return path

    monkeypatch.setattr(sandbox.tempfile, "mkdtemp", recording_mkdtemp)
    res = run(
        """
        import os, sys
        print(open("/proc/self/mountinfo").read())
        print("CWD", os.getcwd(), sys.argv[0], __file__)
        print("ENV", sorted(os.environ.items()))
        print("CMD", open("/proc/self/cmdline", "rb").read().replace(b"\\0", b" ").decode())
        """,
        timeout=10.0,
    )
    assert res.status == "passed", res
    assert len(made) == 1
    workdir = made[0]
    mountinfo = res.stdout.split("CWD", 1)[0]
    assert "/proc" in mountinfo  # the program really read it
    assert workdir not in mountinfo and "dlm_sbx_" not in mountinfo, mountinfo
    if res.mount_namespace:
        # The work dir is the private /tmp: no path, variable or argument names the host's.
        assert workdir not in res.stdout and "dlm_sbx_" not in res.stdout, res.stdout
        assert "CWD /tmp /tmp/program.py /tmp/program.py" in res.stdout


@pytest.mark.skipif(not IS_ROOT, reason="mounts are only set up as root")
def test_failed_mount_is_an_error_not_a_failed_program(monkeypatch: pytest.MonkeyPatch) -> None:
    if not isolation_info().mount_namespace:
        pytest.skip("no mount namespace here")
    missing = f"/nonexistent_dlm_{secrets.token_hex(6)}"
    real = sandbox._world_writable_dirs
    monkeypatch.setattr(sandbox, "_world_writable_dirs", lambda: [*real(), missing])
    started: list[str] = []
    real_mkdtemp = sandbox.tempfile.mkdtemp

    def recording_mkdtemp(*args: object, **kwargs: object) -> str:
        path = real_mkdtemp(*args, **kwargs)  # type: ignore[call-overload]
        started.append(path)
        return path

    monkeypatch.setattr(sandbox.tempfile, "mkdtemp", recording_mkdtemp)
    with pytest.raises(sandbox.SandboxError) as err:
        run_program("print('must not run')\n", timeout=10.0)
    _one_line(err, "sandbox set-up failed, program not run", f"on {missing}:")
    # A batch stops at the first set-up error instead of scoring every program "failed".
    with pytest.raises(sandbox.SandboxError):
        run_programs(["pass"] * 20, timeout=10.0, workers=1)
    assert len(started) <= 1 + 3  # the rest were cancelled
    for path in started:
        assert not Path(path).exists()  # work dirs are cleaned up all the same
    monkeypatch.undo()
    assert_harness_ok()
