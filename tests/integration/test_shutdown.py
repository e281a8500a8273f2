"""Graceful shutdown, from outside: `logitfusion serve` and `logitfusion demo` as real subprocesses, real signals.

Each server runs in a session of its own (start_new_session), so every process it starts, directly or through the
raylet (GCS, dashboard, DashboardAgent, RuntimeEnvAgent, Serve actors, model workers), carries that session id:
"nothing left behind" is checked as "no live process of that session" after the server exits.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from logitfusion import errors
from logitfusion.client import FusionClient, build_request
from logitfusion.v1 import fusion_pb2_grpc

import service_models  # tests/integration/service_models.py

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 420.0  # a Serve start takes 1-3 minutes on a loaded 2-core machine


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("family")
    service_models.write_family(root)
    return root


def write_config(family: Path, name: str, drain_timeout_s: float) -> Path:
    from logitfusion.cluster.cli import free_port

    d = service_models.topology_dict(family)
    d["serve"].update(grpc_port=free_port(), http_port=free_port(), app_name=name, drain_timeout_s=drain_timeout_s)
    path = family / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


class Server:
    """A `logitfusion` subprocess in a session of its own, its output collected line by line."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                   PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "logitfusion.cli", *args], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_for_line(self, needle: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1.0)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if needle in line:
                return line
        pytest.fail(f"no line with {needle!r} within {timeout_s} s; output:\n{self.text()[-4000:]}")

    def text(self) -> str:
        return "".join(self.output)

    def session_processes(self) -> list[str]:
        """Live processes of this server's session (its pid is the session id), as 'pid name'."""
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                raw = (entry / "stat").read_text()
            except OSError:
                continue
            rest = raw[raw.rfind(")") + 2:].split()
            if int(rest[3]) == self.proc.pid and rest[0] != "Z":
                out.append(f"{entry.name} {raw[raw.find('(') + 1:raw.rfind(')')]}")
        return out

    def kill_session(self) -> None:
        """Cleanup after a failed test: SIGKILL whatever of the session still runs."""
        for p in self.session_processes():
            try:
                os.kill(int(p.split()[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_until(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    tick = threading.Event()
    last = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        tick.wait(0.1)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")


def health(address: str) -> str:
    with grpc.insecure_channel(address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def http_status(url: str, body: dict | None = None) -> tuple[int, dict, str]:
    """(status, headers with lower-case names, body text) of a GET (or a JSON POST when ``body`` is given), errors included."""
    import json
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read().decode()


def assert_nothing_left(server: Server, exit_timeout_s: float, expect_rc: int) -> None:
    rc = server.proc.wait(timeout=exit_timeout_s)
    assert rc == expect_rc, server.text()[-4000:]
    # A SIGKILLed process may take a moment to be reaped; a live one never stops being listed.
    left = wait_until(lambda: not server.session_processes() or None, 15.0, "the session's processes to end") \
        if server.session_processes() else None
    assert not server.session_processes(), (left, server.text()[-2000:])


class Stream:
    """A GenerateStream consumed on a thread: tokens, and how it ended."""

    def __init__(self, address: str, max_new_tokens: int) -> None:
        self.tokens: list[int] = []
        self.first = threading.Event()
        self.error: errors.FusionError | None = None
        self.finish = None
        self.done = threading.Event()
        self._client = FusionClient(address, timeout_s=300.0)
        threading.Thread(target=self._run, args=(max_new_tokens,), daemon=True).start()

    def _run(self, n: int) -> None:
        try:
            call = self._client.generate_stream("drain me", max_new_tokens=n, stop_at_eos=False, preset="dlf_multi")
            for ev in call:
                self.tokens.append(ev.token_id)
                self.first.set()
            self.finish = call.completion.finish_reason if call.completion else None
        except errors.FusionError as exc:
            self.error = exc
        finally:
            self.first.set()
            self.done.set()
            self._client.close()


def streaming(server: Server, max_new_tokens: int) -> tuple[str, Stream]:
    """Once ``server`` serves: its gRPC address, and a GenerateStream that has received its first token."""
    line = server.wait_for_line("serving logitfusion.v1.FusionService on", START_TIMEOUT_S)
    address = line.split(" on ")[1].split()[0]
    stream = Stream(address, max_new_tokens=max_new_tokens)
    assert stream.first.wait(120) and not stream.error, stream.error
    return address, stream


def test_sigterm_drains_in_flight_request_refuses_new_ones_and_leaves_nothing(family):
    config = write_config(family, "lfdrain1", drain_timeout_s=240.0)
    server = Server("serve", "--config", str(config))
    try:
        line = server.wait_for_line("and the OpenAI-style HTTP API on", START_TIMEOUT_S)  # the line naming both
        address = line.split(" on ")[1].split()[0]
        assert health(address) == "SERVING"
        stream = Stream(address, max_new_tokens=300)
        assert stream.first.wait(120) and not stream.error, stream.error
        t_signal = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: health(address) == "NOT_SERVING", 15.0, "health NOT_SERVING")
        not_serving_s = time.monotonic() - t_signal
        # A new request is refused with UNAVAILABLE and gRPC's retry pushback.
        with grpc.insecure_channel(address) as ch:
            with pytest.raises(grpc.RpcError) as info:
                fusion_pb2_grpc.FusionServiceStub(ch).Generate(build_request("late", max_new_tokens=2), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
        refused = errors.from_rpc_error(info.value)
        assert isinstance(refused, errors.ShuttingDown) and refused.retry_after_s > 0, info.value.details()
        # the HTTP ingress drains with it: /health 503, a new completion 503 with Retry-After
        base = line.split(" API on ")[1].split()[0].removesuffix("/v1")
        assert http_status(f"{base}/health")[0] == 503
        status, headers, body = http_status(f"{base}/v1/completions", {"prompt": "late", "max_tokens": 2})
        assert status == 503 and int(headers["retry-after"]) > 0 and "shutting down" in body, (status, body)
        # The request in flight runs to its end: every token, finish reason "length".
        assert stream.done.wait(240), "the in-flight stream did not end"
        assert stream.error is None and len(stream.tokens) == 300 and stream.finish == "length", stream.error
        assert_nothing_left(server, exit_timeout_s=180, expect_rc=0)
        out = server.text()
        assert "1 request(s) finished, 0 cancelled" in out and "SIGABRT" not in out
        print(f"\nNOT_SERVING {not_serving_s:.2f} s after SIGTERM; stopped "
              f"{time.monotonic() - t_signal:.1f} s after it")
    finally:
        server.proc.kill()
        server.kill_session()


def test_sigint_cancels_what_outlives_the_drain_timeout_with_a_clear_status(family):
    config = write_config(family, "lfdrain2", drain_timeout_s=1.0)
    server = Server("serve", "--config", str(config))
    try:
        _, stream = streaming(server, max_new_tokens=1500)
        server.proc.send_signal(signal.SIGINT)
        assert stream.done.wait(120), "the in-flight stream did not end"
        assert isinstance(stream.error, errors.ShuttingDown), stream.error
        assert "serve.drain_timeout_s (1 s)" in str(stream.error) and len(stream.tokens) < 1500
        assert_nothing_left(server, exit_timeout_s=180, expect_rc=0)
        assert "0 request(s) finished, 1 cancelled" in server.text()
    finally:
        server.proc.kill()
        server.kill_session()


def test_second_signal_exits_at_once_and_leaves_nothing(family):
    config = write_config(family, "lfdrain3", drain_timeout_s=240.0)
    server = Server("serve", "--config", str(config))
    try:
        address, stream = streaming(server, max_new_tokens=1500)
        server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: health(address) == "NOT_SERVING", 15.0, "health NOT_SERVING")  # draining now
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert_nothing_left(server, exit_timeout_s=10, expect_rc=128 + signal.SIGTERM)
        print(f"\nexited {time.monotonic() - t0:.2f} s after the second SIGTERM")
        assert "second signal (SIGTERM): exiting now" in server.text()
        assert stream.done.wait(60)
        assert stream.error is not None and len(stream.tokens) < 1500  # the connection went away with the server
    finally:
        server.proc.kill()
        server.kill_session()


def test_interrupted_demo_stops_the_service_and_leaves_nothing():
    server = Server("demo")
    try:
        server.wait_for_line("serving on", START_TIMEOUT_S)
        # Ctrl-C in a terminal: SIGINT to the whole foreground process group (the demo and the Ray processes that
        # share its group: GCS, raylet, dashboard, agents), while the demo asks its first questions
        os.killpg(server.proc.pid, signal.SIGINT)
        assert_nothing_left(server, exit_timeout_s=180, expect_rc=0)
        assert "interrupted (received SIGINT): draining and stopping the service" in server.text()
        assert "stopped" in server.text().splitlines()[-1]
    finally:
        server.proc.kill()
        server.kill_session()
