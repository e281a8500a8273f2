"""Graceful shutdown of `logitfusion serve` and `logitfusion demo`: the signals, and nothing left behind.

    guard = SignalGuard().install()        # SIGTERM and SIGINT: the first raises ShutdownRequested in the main thread
    ...                                    # start and serve; after ray.init (which installs Ray's own SIGTERM
    guard.install()                        # handler) install again
    procs = descendants()                  # every process this one started, directly or not (raylet's workers too)
    reap(procs, grace_s=10)                # wait for them to exit; SIGTERM, then SIGKILL, whatever does not

The first signal ends the main thread's wait (or interrupts start-up) with ShutdownRequested, a BaseException like
KeyboardInterrupt, so that the caller drains and stops in order; from then on the handler stays installed, and a
second signal exits at once (status 128 + signal number) after SIGKILL to every descendant process, so nothing is
left behind even then. Why not Ray's own handler: it marks the node draining, kills the node's processes and calls
sys.exit from inside the handler, which ends the driver (its C++ core worker) mid-call: the issue saw SIGABRT and the
raylet's children (DashboardAgent, RuntimeEnvAgent) outlive it. Processes are found through /proc (Linux): by
parent, since the raylet's workers and agents get process groups of their own; a process is identified by pid and
start time, so a recycled pid is never signalled.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_PROC = Path("/proc")


class ShutdownRequested(BaseException):  # noqa: N818 - named like KeyboardInterrupt, which it generalises
    """The first SIGTERM or SIGINT: stop serving gracefully."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"received {signal.Signals(signum).name}")
        self.signum = signum


class SignalGuard:
    """SIGTERM/SIGINT handling of a serving process; install() from the main thread.

    First signal: ``received`` is set and ShutdownRequested is raised in the main thread. Second: every descendant
    process is killed and the process exits at once with status 128 + signum.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> SignalGuard:
        """(Re)install the handlers; call again after anything that installs its own (ray.init does for SIGTERM)."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("SignalGuard.install must run in the main thread")
        for sig in SIGNALS:
            prev = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, prev)
        return self

    def restore(self) -> None:
        """Put back the handlers found at the first install()."""
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            raise ShutdownRequested(signum)
        name = signal.Signals(signum).name
        procs = descendants()
        try:
            sys.stderr.write(f"logitfusion: second signal ({name}): exiting now, killing {len(procs)} process(es)\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - the exit must not depend on stderr
            pass
        kill(procs, signal.SIGKILL)
        os._exit(128 + signum)


# ------------------------------------------------------------------------------------------------ processes


@dataclass(frozen=True)
class Proc:
    """A process, identified by pid and start time (clock ticks since boot) so that a reused pid never matches."""

    pid: int
    start_ticks: int
    name: str


def _stat(pid: int) -> tuple[str, str, int, int] | None:
    """(name, state, ppid, start_ticks) from /proc/<pid>/stat, or None when the process is gone."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except (OSError, ValueError):
        return None
    left, right = raw.find("("), raw.rfind(")")  # the name may hold spaces and parentheses
    rest = raw[right + 2:].split()
    return raw[left + 1:right], rest[0], int(rest[1]), int(rest[19])


def _cmd_name(pid: int, fallback: str) -> str:
    try:
        cmd = (_PROC / str(pid) / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return fallback
    return cmd or fallback


def descendants(root: int | None = None) -> list[Proc]:
    """Every live process below ``root`` (default: this one) in the parent tree; [] where /proc is missing."""
    if not _PROC.is_dir():
        return []
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    info: dict[int, tuple[str, str, int, int]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        st = _stat(int(entry.name))
        if st is not None:
            info[int(entry.name)] = st
            children.setdefault(st[2], []).append(int(entry.name))
    out: list[Proc] = []
    todo = list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        name, state, _, start = info[pid]
        if state != "Z":
            out.append(Proc(pid, start, _cmd_name(pid, name)))
        todo.extend(children.get(pid, ()))
    return out


def alive(p: Proc) -> bool:
    """True while the process runs (a zombie has exited; a new process under the same pid is not it)."""
    st = _stat(p.pid)
    return st is not None and st[3] == p.start_ticks and st[1] != "Z"


def kill(procs: Iterable[Proc], sig: int) -> list[Proc]:
    """Send ``sig`` to each live process of ``procs``; returns those it was sent to."""
    sent = []
    for p in procs:
        if alive(p):
            try:
                os.kill(p.pid, sig)
                sent.append(p)
            except ProcessLookupError:
                pass
    return sent


def wait_gone(procs: Sequence[Proc], timeout_s: float, poll_s: float = 0.1) -> list[Proc]:
    """Wait until none of ``procs`` runs; returns those still running after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    tick = threading.Event()
    left = [p for p in procs if alive(p)]
    while left and time.monotonic() < deadline:
        tick.wait(poll_s)  # polling /proc: exits of non-children cannot be waited for
        left = [p for p in left if alive(p)]
    return left


def reap(procs: Sequence[Proc], grace_s: float = 10.0, kill_grace_s: float = 5.0) -> list[Proc]:
    """Make sure every process of ``procs`` ends: wait ``grace_s`` for them to exit by themselves (Ray stops its
    own), then SIGTERM the rest, then SIGKILL what still runs after ``kill_grace_s``. Returns the ones that had to be
    signalled (logged by name); none should be."""
    left = wait_gone(procs, grace_s)
    if not left:
        return []
    logger.warning("still running %.0f s after Ray stopped, sending SIGTERM: %s", grace_s,
                   ", ".join(f"{p.name} (pid {p.pid})" for p in left))
    kill(left, signal.SIGTERM)
    stubborn = wait_gone(left, kill_grace_s)
    if stubborn:
        logger.warning("ignored SIGTERM for %.0f s, sending SIGKILL: %s", kill_grace_s,
                       ", ".join(f"{p.name} (pid {p.pid})" for p in stubborn))
        kill(stubborn, signal.SIGKILL)
        wait_gone(stubborn, kill_grace_s)
    return left
