"""Child processes that die with their parent (issue #10, class 8).

A demo or test run killed with SIGKILL cannot run its ``finally`` blocks, so whatever it started
(Kafka broker JVM, Faust worker, fleet exporter, Xvfb) would run forever. Every process this
project starts on behalf of a parent that owns it goes through :func:`spawn_owned`: on Linux the
child asks the kernel for a signal when its parent dies (``prctl(PR_SET_PDEATHSIG)``).

Three details make that reliable:

* The request is made by a tiny launcher (this interpreter, isolated, no site) that then
  ``exec``s the real program, so the program itself (a JVM, a Python service) keeps the setting
  (it survives ``execve`` of a non-setuid binary) and the parent needs no ``preexec_fn``, which is
  unsafe in a threaded process.
* The kernel's "parent" is the *thread* that forked, not the process: a child started from a
  short-lived thread would be killed when that thread ends. Children are therefore always forked
  by the main thread or by one spawner thread that lives as long as the process.
* The parent may die between the fork and the ``prctl``; the launcher then sees another parent
  pid and exits instead of running unowned.

Elsewhere (macOS, Windows) the child is started plainly: the owner's own cleanup still applies.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

# Runs in the child as `python -I -S -c _LAUNCHER <parent pid> <signal> <program> <args...>`.
# PR_SET_PDEATHSIG = 1 (linux/prctl.h). Kept free of imports beyond ctypes and os.
_LAUNCHER = """\
import ctypes, os, sys
parent, sig = int(sys.argv[1]), int(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(1, sig, 0, 0, 0) != 0:
    sys.stderr.write("handtrace launcher: prctl(PR_SET_PDEATHSIG) failed: %s\\n" % os.strerror(ctypes.get_errno()))
    os._exit(70)
if os.getppid() != parent:
    os._exit(71)
argv = sys.argv[3:]
try:
    os.execv(argv[0], argv)
except OSError as e:
    sys.stderr.write("handtrace launcher: cannot run %s: %s\\n" % (argv[0], e))
    os._exit(127)
"""

PDEATHSIG_SUPPORTED = sys.platform.startswith("linux")
"""Whether children can be tied to their parent's life (Linux only)."""

LAUNCH_FAILED_CODES = {70: "prctl failed", 71: "the parent died while the child started",
                       127: "the program could not be executed"}
"""Exit codes of the launcher itself (before the program runs)."""


def launcher_argv(argv: Sequence[str], death_signal: int = signal.SIGKILL,
                  parent_pid: int | None = None) -> list[str]:
    """The command that runs ``argv`` with the parent-death signal set (Linux).

    Args:
        argv: The program (a path, or a name looked up on PATH now) and its arguments.
        death_signal: The signal the child receives when its parent dies.
        parent_pid: The pid the child must see as its parent (default: this process).
    """
    if not argv:
        raise ValueError("empty command")
    program = argv[0]
    if os.sep not in program:
        found = shutil.which(program)
        if found is None:
            raise FileNotFoundError(f"{program!r} is not on PATH")
        program = found
    pid = os.getpid() if parent_pid is None else parent_pid
    return [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(pid), str(int(death_signal)), program, *argv[1:]]


class _Spawner:
    """One thread, alive as long as the process, that forks children for other threads."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, fn: Callable[[], Any]) -> Any:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="handtrace-spawner", daemon=True)
                self._thread.start()
        done: Future[Any] = Future()
        self._jobs.put((fn, done))
        return done.result()

    def _loop(self) -> None:
        while True:
            fn, done = self._jobs.get()
            try:
                done.set_result(fn())
            except BaseException as e:  # noqa: BLE001 -- handed to the caller's thread
                done.set_exception(e)


_SPAWNER = _Spawner()


def spawn_owned(argv: Sequence[str], *, death_signal: int = signal.SIGKILL,
                **popen_kwargs: Any) -> subprocess.Popen[Any]:
    """Start ``argv`` as a child that dies when this process dies, even by SIGKILL (Linux).

    Takes :class:`subprocess.Popen`'s keyword arguments (``env``, ``cwd``, ``stdout``,
    ``start_new_session`` ...; not ``preexec_fn`` or ``shell``). The returned Popen's pid is
    the program's own (the launcher ``exec``s it), so signals and process groups work as usual.

    Args:
        argv: The program and its arguments.
        death_signal: What the child gets when its parent dies (SIGKILL: nothing can delay it).
        popen_kwargs: Passed to Popen.
    """
    for banned in ("preexec_fn", "shell", "executable"):
        if banned in popen_kwargs:
            raise TypeError(f"spawn_owned does not take {banned}")
    if not PDEATHSIG_SUPPORTED:
        return subprocess.Popen(list(argv), **popen_kwargs)
    cmd = launcher_argv(argv, death_signal)

    def start() -> subprocess.Popen[Any]:
        return subprocess.Popen(cmd, **popen_kwargs)

    if threading.current_thread() is threading.main_thread():
        return start()
    result: subprocess.Popen[Any] = _SPAWNER.run(start)
    return result


def run_owned(argv: Sequence[str], *, timeout: float | None = None,
              **popen_kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Like ``subprocess.run(argv, capture_output=True, text=True)``, the child owned as by
    :func:`spawn_owned` (for tools such as ``mvn`` or the Kafka storage formatter)."""
    proc = spawn_owned(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kwargs)
    try:
        out, errs = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, errs)


def stop_child(proc: subprocess.Popen[Any], timeout_s: float = 30.0, *, group: bool = False) -> int | None:
    """SIGTERM ``proc`` (its whole process group with ``group``), SIGKILL after ``timeout_s``;
    return its exit code (None if it could not be reaped)."""
    if proc.poll() is not None:
        return proc.returncode

    def send(sig: int) -> None:
        try:
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            pass

    send(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
    try:
        return proc.wait(10)
    except subprocess.TimeoutExpired:
        return None
