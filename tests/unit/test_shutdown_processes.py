"""cluster.shutdown with real processes and real signals (no Ray): the process tree, reaping, the signal guard."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import grpc
import pytest

from logitfusion import errors
from logitfusion.cluster import shutdown

pytestmark = pytest.mark.timeout(60)


def _spawn(code: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _wait_for_descendants(n: int, timeout_s: float = 20.0) -> list[shutdown.Proc]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        procs = shutdown.descendants()
        if len(procs) >= n:
            return procs
        time.sleep(0.05)  # polling /proc for processes another process starts
    pytest.fail(f"expected {n} descendant processes, saw {shutdown.descendants()}")


def test_descendants_include_grandchildren_in_other_process_groups_and_reap_ends_them():
    # a child that starts a grandchild in a process group of its own (as the raylet starts workers) and one that
    # ignores SIGTERM (as the DashboardAgent did)
    proc = _spawn("""
        import os, signal, subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                          " time.sleep(300)"], start_new_session=True, stdout=subprocess.DEVNULL)
        print("ready", flush=True)
        time.sleep(300)
    """)
    try:
        procs = _wait_for_descendants(2)
        assert proc.pid in {p.pid for p in procs} and len(procs) == 2
        assert all(shutdown.alive(p) for p in procs)
        t0 = time.monotonic()
        signalled = shutdown.reap(procs, grace_s=0.2, kill_grace_s=0.5)
        assert {p.pid for p in signalled} == {p.pid for p in procs}
        assert not any(shutdown.alive(p) for p in procs) and time.monotonic() - t0 < 10
    finally:
        proc.kill()
        proc.wait()


def test_reap_leaves_processes_that_exit_by_themselves_alone():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    procs = _wait_for_descendants(1)
    assert shutdown.reap(procs, grace_s=20) == []  # exited within the grace: nothing signalled
    proc.wait()


def test_a_recycled_pid_is_not_the_same_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        p = next(p for p in _wait_for_descendants(1) if p.pid == proc.pid)
        assert shutdown.alive(p)
        assert not shutdown.alive(shutdown.Proc(p.pid, p.start_ticks + 1, p.name))
    finally:
        proc.kill()
        proc.wait()
    assert not shutdown.alive(p)


GUARDED = """
    import subprocess, sys, time
    from logitfusion.cluster.shutdown import ShutdownRequested, SignalGuard
    guard = SignalGuard().install()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True,
                             stdout=subprocess.DEVNULL)
    try:
        print("ready", flush=True)
        time.sleep(300)
    except ShutdownRequested as exc:
        print(f"draining after {exc}", flush=True)
        time.sleep(float(sys.argv[1]))  # a drain that takes this long
        child.kill()
        print("drained", flush=True)
    sys.exit(0)
"""


def _guarded(drain_s: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(GUARDED), str(drain_s)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_first_signal_raises_shutdown_requested_and_the_drain_runs_to_its_end(sig):
    proc = _guarded(0.5)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert out.splitlines() == [f"draining after received {sig.name}", "drained"]


def test_second_signal_exits_at_once_and_kills_every_descendant():
    proc = _guarded(300)
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline().startswith("draining")
    grandchildren = shutdown.descendants(proc.pid)
    assert len(grandchildren) == 1  # the guarded process's own child, in a session of its own
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM and time.monotonic() - t0 < 5
    assert shutdown.wait_gone(grandchildren, 5.0) == []  # SIGKILLed with it, though in a session of its own


def test_shutting_down_is_unavailable_and_its_retry_hint_survives_the_wire():
    err = errors.ShuttingDown("the server is shutting down and admits no new request; retry in 5 s",
                              retry_after_s=5.0)
    code, details = errors.to_status(err)
    assert code == grpc.StatusCode.UNAVAILABLE
    back = errors.from_status(code, details)
    assert isinstance(back, errors.ShuttingDown) and back.retry_after_s == 5.0
    assert isinstance(back, errors.ModelUnavailable)  # a client handling UNAVAILABLE handles it too
    other = errors.from_status(grpc.StatusCode.UNAVAILABLE, "model 'large' is unavailable")
    assert type(other) is errors.ModelUnavailable
