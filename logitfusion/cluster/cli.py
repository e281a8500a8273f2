"""`logitfusion serve` and `logitfusion generate`: start the service (embedded local Ray by default), call it.

    logitfusion serve --config configs/zoo.yaml              # embedded Ray on loopback, gRPC on serve.grpc_port,
                                                             # HTTP (OpenAI-style API, /metrics) on serve.http_port
    logitfusion serve --config FILE --address HOST:6379      # join a running Ray cluster instead
    logitfusion generate --address 127.0.0.1:9000 "prompt" --preset dlf_capital

Ray token authentication (Ray 2.60 turns it on by default for a new local cluster and, when no token exists,
writes one to ~/.ray/auth_token): the embedded cluster keeps authentication ON with a fresh random token per process
in RAY_AUTH_TOKEN, which every Ray process the driver starts inherits; nothing is written to the home directory and
separate runs never share a token. The token stays for the life of the process (Ray caches it in the driver: a second
cluster started by the same process must use the same one). Anything the operator set (RAY_AUTH_MODE, RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH) is respected as is; RAY_AUTH_MODE=disabled runs without authentication, with a warning.
Joining a cluster (--address) needs that cluster's token, provided the way Ray documents it. The token guards Ray's
own control plane (GCS, dashboard, jobs, actor calls); FusionService clients reach only Serve's gRPC proxy, which
does not ask for it (serve.auth_token_env in the topology adds a bearer token for them).
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from logitfusion.client import generate_main as client_generate_main
from logitfusion.cluster.shutdown import ShutdownRequested, SignalGuard, descendants, reap
from logitfusion.errors import ConfigError

logger = logging.getLogger(__name__)

SERVICE_NAME = "logitfusion.v1.FusionService"


def ensure_local_auth() -> bool:
    """Token authentication for an embedded local Ray cluster (see the module docstring).

    Only the token is provided here: RAY_AUTH_MODE is left to Ray, whose ray.init() switches token mode on for a new
    local cluster and refreshes its process-wide config when it does (setting the variable ourselves after Ray's
    config was first read would leave this driver in the old mode while the GCS starts in token mode). Returns True
    when this call generated the process's token.
    """
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        logger.warning("RAY_AUTH_MODE=%s: the embedded Ray cluster runs without token authentication", mode)
        return False
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return False
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_local_ray(host: str = "127.0.0.1", num_cpus: int | None = None, max_message_bytes: int = 1 << 20) -> None:
    """Embedded Ray on ``host`` (loopback by default) with token auth on, no dashboard, one torch thread per worker.

    num_cpus are logical: actors ask for fractions (0.25 per model by default), so 4 is plenty on a small machine.
    """
    import ray

    # Serve's gRPC proxy accepts no message above this (gRPC's own RESOURCE_EXHAUSTED); the replica refuses, by
    # name, anything over limits.max_message_bytes below it. Read by the proxy process at start.
    os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(max(16 << 20, 2 * max_message_bytes)))
    ensure_local_auth()
    ray.init(
        num_cpus=num_cpus or max(4, os.cpu_count() or 1),
        include_dashboard=False,
        _node_ip_address=host,
        logging_level=logging.WARNING,
        configure_logging=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )


def wait_until_serving(address: str, timeout_s: float, poll_s: float = 0.5) -> None:
    """Poll grpc.health.v1 Check until SERVING (the proxy routes only once a replica is up); TimeoutError else."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    stop = threading.Event()
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            stop.wait(poll_s)  # a poll interval, not a synchronisation
    raise TimeoutError(f"{address} did not report SERVING within {timeout_s} s (last: {last})")


def wait_until_http_serving(base_url: str, timeout_s: float, poll_s: float = 0.5) -> None:
    """Poll GET {base_url}/health until 200 (Serve's HTTP proxy routes once the application runs); TimeoutError."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    stop = threading.Event()
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=5.0) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(exc)
        stop.wait(poll_s)  # a poll interval, not a synchronisation
    raise TimeoutError(f"{base_url}/health did not answer 200 within {timeout_s} s (last: {last})")


@dataclass
class RunningService:
    """A started service: where it listens and how long it took to start."""

    address: str  # host:port of the gRPC ingress
    app_name: str
    startup_s: float  # from the call to SERVING
    started_ray: bool  # this process started (or joined) Ray and shuts it down
    replicas: int = 1  # serve.replicas: how many pipelines a drain must reach
    drain_timeout_s: float = 30.0  # serve.drain_timeout_s
    http_address: str = ""  # host:port of the HTTP ingress (OpenAI-style API, /health, /metrics)

    @property
    def base_url(self) -> str:
        """http://host:port of the HTTP ingress (the OpenAI client's base_url is this plus /v1)."""
        return f"http://{self.http_address}"

    def drain(self, timeout_s: float | None = None) -> list[dict]:
        """Every replica at once: health NOT_SERVING, new requests UNAVAILABLE (retry pushback); requests in flight
        run on for up to ``timeout_s`` (default serve.drain_timeout_s), then are cancelled. Returns each replica's
        report {"replica", "finished", "cancelled"}.

        Serve's handle routes each call to the least busy of two replicas and a draining replica holds its drain
        calls open, so calls spread over the replicas; a few more are sent until every replica has answered.
        """
        from ray import serve

        wait_s = self.drain_timeout_s if timeout_s is None else timeout_s
        handle = serve.get_app_handle(self.app_name)
        reports: dict[str, dict] = {}
        deadline = time.monotonic() + wait_s + 60.0  # the drain itself ends by wait_s; the rest is Ray's latency
        calls = 0
        while len(reports) < self.replicas and calls < 4 * self.replicas and time.monotonic() < deadline:
            batch = [handle.drain.remote(wait_s) for _ in range(self.replicas - len(reports))]
            calls += len(batch)
            for resp in batch:
                report = resp.result(timeout_s=max(1.0, deadline - time.monotonic()))
                reports[report["replica"]] = report
        if len(reports) < self.replicas:
            logger.warning("drain reached %d of %d replicas", len(reports), self.replicas)
        return list(reports.values())

    def stop(self, reason: str = "stop") -> None:
        """Drain (see drain()), then shut down; every step is attempted even when an earlier one fails."""
        t0 = time.monotonic()
        logger.info("%s: draining for up to serve.drain_timeout_s=%g s", reason, self.drain_timeout_s)
        try:
            for r in self.drain():
                logger.info("replica %s drained: %d request(s) finished, %d cancelled", r["replica"], r["finished"],
                            r["cancelled"])
        except Exception:  # noqa: BLE001 - a failed drain must not keep the process (and Ray) alive
            logger.exception("drain failed; shutting down anyway")
        self.shutdown()
        logger.info("stopped in %.1f s", time.monotonic() - t0)

    def shutdown(self) -> None:
        """Delete the application (its replicas close their pipelines), stop Serve, and Ray if we started it; then
        make sure no process this one started is left (shutdown.reap)."""
        import ray
        from ray import serve

        procs = descendants()
        try:
            try:
                serve.delete(self.app_name, _blocking=True)
            finally:
                serve.shutdown()
        finally:
            if self.started_ray:
                procs = list({p: None for p in [*procs, *descendants()]})  # workers started since the first look
                ray.shutdown()
                reap(procs)


def run_service(
    config: str | Path,
    *,
    address: str | None = None,
    grpc_port: int | None = None,
    http_port: int | None = None,
    blocking: bool = True,
    num_cpus: int | None = None,
    access_log: bool = True,
    guard: SignalGuard | None = None,
) -> RunningService:
    """Start Serve with gRPC ingress and the topology's application; return once it reports SERVING.

    address None: embedded local Ray on serve.host (loopback by default); else join that Ray cluster.
    grpc_port: overrides serve.grpc_port; http_port: overrides serve.http_port. blocking: serve until Ctrl-C, then shut down.
    access_log: False keeps Serve's per-call access log lines (and its INFO chatter) off the console, as the demo
    wants; warnings and errors still show. guard: the process's SignalGuard (re-installed once Ray has started; the
    blocking wait ends on its first signal, with a drain).
    """
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions
    from ray.serve.schema import LoggingConfig

    from logitfusion.cluster.serve_app import SERVICER_FUNCTIONS, build_app
    from logitfusion.cluster.topology import load_topology

    t0 = time.monotonic()
    topology = load_topology(config)
    port = grpc_port or topology.serve.grpc_port
    host = topology.serve.host
    started = False
    if not ray.is_initialized():
        try:
            if address is None:
                start_local_ray(host, num_cpus=num_cpus, max_message_bytes=topology.limits.max_message_bytes)
            else:
                ray.init(address=address, logging_level=logging.WARNING, configure_logging=False)
        except BaseException:  # a signal (or an error) while Ray starts: stop what did start
            procs = descendants()
            if ray.is_initialized():
                ray.shutdown()
            reap(procs)
            raise
        started = True
    if guard is not None:
        guard.install()  # ray.init installed Ray's own SIGTERM handler; ours stays in charge
    hport = http_port or topology.serve.http_port
    service = RunningService(f"{host}:{port}", topology.serve.app_name, 0.0, started, topology.serve.replicas,
                             topology.serve.drain_timeout_s, f"{host}:{hport}")
    log_config = None if access_log else LoggingConfig(log_level="WARNING", enable_access_log=False)
    try:
        serve.start(
            http_options=HTTPOptions(host=host, port=hport),
            grpc_options=gRPCOptions(port=port, grpc_servicer_functions=list(SERVICER_FUNCTIONS)),
            logging_config=log_config,
        )
        serve.run(build_app({"config": str(config)}), name=topology.serve.app_name, route_prefix="/",
                  logging_config=log_config)
        wait_until_serving(service.address, timeout_s=topology.serve.startup_timeout_s)
        wait_until_http_serving(service.base_url, timeout_s=topology.serve.startup_timeout_s)
    except BaseException:
        service.shutdown()
        raise
    service.startup_s = time.monotonic() - t0
    logger.info("serving %s on %s (started in %.1f s)", SERVICE_NAME, service.address, service.startup_s)
    if blocking:
        print(f"logitfusion: serving {SERVICE_NAME} on {service.address} and the OpenAI-style HTTP API on "
              f"{service.base_url}/v1 (started in {service.startup_s:.1f} s); Ctrl-C or SIGTERM drains and stops",
              flush=True)
        reason = "stop"
        try:
            threading.Event().wait()
        except (KeyboardInterrupt, ShutdownRequested) as exc:
            reason = str(exc) or "interrupted"
            print(f"logitfusion: {reason}: draining (up to serve.drain_timeout_s={service.drain_timeout_s:g} s), "
                  "a second signal exits at once", flush=True)
        finally:
            service.stop(reason)
        print("logitfusion: stopped", flush=True)
    return service


def serve_main(args: argparse.Namespace) -> int:
    """`logitfusion serve --config FILE [--address RAY] [--port N]`: exits 0 after a drained stop on SIGTERM/SIGINT
    (a second signal: at once, 128 + its number)."""
    guard = SignalGuard().install()
    try:
        run_service(args.config, address=args.address, grpc_port=args.port,
                    http_port=getattr(args, "http_port", None), blocking=True, guard=guard)
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except (KeyboardInterrupt, ShutdownRequested) as exc:  # during start-up: run_service has stopped everything
        sys.stderr.write(f"logitfusion: {exc or 'interrupted'} while starting; stopped\n")
    return 0


def generate_main(args: argparse.Namespace) -> int:
    """`logitfusion generate --address HOST:PORT "prompt"`: streams the text, then the per-step weights."""
    return client_generate_main(args)
