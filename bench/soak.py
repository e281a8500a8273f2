"""Soak: a long mixed load on a real service; every request must end with exactly one final status.

    python -m bench.soak --config configs/zoo.yaml --duration-s 600 --min-requests 2000 --json results/soak.json

Starts the service (embedded Ray on loopback, as `logitfusion serve` does) and runs ``concurrency`` client threads
(default: the topology's max_concurrent_requests, i.e. at the limit) until both the duration and the request count
are reached. Each request is one of: unary Generate, GenerateStream, a stream the client cancels after a few tokens,
a request with a deadline too short to finish, a bad input (INVALID_ARGUMENT expected), and bursts above the limit
(RESOURCE_EXHAUSTED expected for some). Presets rotate over the topology's presets.

Criteria, reported in the JSON (``criteria``) and the table:
- lost = 0 and duplicated = 0: every request id gets exactly one final status (a thread that never returns counts as
  lost; a second status for an id counts as duplicated);
- unexpected = 0: each kind ends only with the statuses it may end with (never INTERNAL or UNKNOWN);
- rss_growth <= 10 %: every model worker's resident memory, from the sample at ``--rss-from-s`` (120 s: minute 2)
  to the end (read from /proc: the workers run on this machine);
- sequences_empty: every worker's own sequence table is empty at the end (FusionDeployment.stats, live_sequences).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from logitfusion.client import build_request
from logitfusion.v1 import fusion_pb2_grpc

logger = logging.getLogger(__name__)

# kind -> the final statuses it may end with
EXPECTED: dict[str, frozenset[str]] = {
    "unary": frozenset({"OK", "RESOURCE_EXHAUSTED"}),
    "stream": frozenset({"OK", "RESOURCE_EXHAUSTED"}),
    "cancel": frozenset({"CANCELLED", "OK", "RESOURCE_EXHAUSTED"}),  # OK: it finished before the cancel
    "deadline": frozenset({"DEADLINE_EXCEEDED", "OK", "RESOURCE_EXHAUSTED"}),
    "bad": frozenset({"INVALID_ARGUMENT"}),
    "burst": frozenset({"OK", "RESOURCE_EXHAUSTED"}),
}
WEIGHTS = {"unary": 4, "stream": 4, "cancel": 2, "deadline": 1, "bad": 2, "burst": 1}
BAD_INPUTS = (
    {"max_new_tokens": 0},
    {"temperature": -1.0},
    {"top_p": 0.0},
    {"preset": "no_such_preset"},
    {"method": "dlf", "solver": "gradient"},
    {"stop": [""]},
    {"draft_model": "nobody"},
)
PROMPTS = ("hello", "what is the capital of", "a b c", "Q: 2 + 2 =", "colour of the sky:", "\u00e9t\u00e9 \u4e16\u754c")


@dataclass
class Ledger:
    """Final statuses by request id; a second status for an id is a duplicate."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    started: dict[str, str] = field(default_factory=dict)  # id -> kind
    final: dict[str, str] = field(default_factory=dict)  # id -> status name
    duplicated: list[str] = field(default_factory=list)

    def start(self, rid: str, kind: str) -> None:
        with self.lock:
            self.started[rid] = kind

    def finish(self, rid: str, status: str) -> None:
        with self.lock:
            if rid in self.final:
                self.duplicated.append(rid)
            else:
                self.final[rid] = status


def _code(exc: grpc.RpcError) -> str:
    return exc.code().name if hasattr(exc, "code") else "UNKNOWN"


class Soak:
    """The client side of a soak run against ``address``."""

    def __init__(self, address: str, presets: list[str], max_concurrent: int, seed: int = 0,
                 max_new_tokens: int = 12) -> None:
        self.address = address
        self.presets = presets
        self.max_concurrent = max_concurrent
        self.max_new_tokens = max_new_tokens
        self.ledger = Ledger()
        self._seed = seed
        self._ids = iter(range(1, 1 << 62))
        self._ids_lock = threading.Lock()
        self._channel = grpc.insecure_channel(address)
        self._stub = fusion_pb2_grpc.FusionServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def _rid(self, kind: str) -> str:
        with self._ids_lock:
            rid = f"soak-{next(self._ids)}-{kind}"
        self.ledger.start(rid, kind)
        return rid

    def one(self, rng: random.Random, kind: str) -> str:
        """Run one request of ``kind`` (a burst: several at once), record its final status and return it."""
        if kind == "burst":
            threads = [threading.Thread(target=self.one, args=(random.Random(rng.random()), "unary"))
                       for _ in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return "burst"
        rid = self._rid(kind)
        status = "UNKNOWN"
        try:
            status = self._call(rng, kind, rid)
        except grpc.RpcError as exc:
            status = _code(exc)
        except Exception as exc:  # noqa: BLE001 - recorded as its own status, reported as unexpected
            status = f"CLIENT_{type(exc).__name__}"
        finally:
            self.ledger.finish(rid, status)
        return status

    def _call(self, rng: random.Random, kind: str, rid: str) -> str:
        kw: dict[str, Any] = {"preset": rng.choice(self.presets), "max_new_tokens": rng.randint(2, self.max_new_tokens),
                              "temperature": rng.choice([0.0, 0.7]), "seed": rng.randint(0, 1000)}
        if kind == "bad":
            kw.update(rng.choice(BAD_INPUTS))
        if kind in ("cancel", "deadline"):
            kw.update(max_new_tokens=self.max_new_tokens * 4, stop_at_eos=False)
        req = build_request(rng.choice(PROMPTS), request_id=rid, **kw)
        if kind in ("unary", "bad"):
            self._stub.Generate(req, timeout=120)
            return "OK"
        if kind == "deadline":
            self._stub.Generate(req, timeout=rng.uniform(0.05, 0.5))
            return "OK"
        call = self._stub.GenerateStream(req, timeout=120)
        limit = rng.randint(1, 3) if kind == "cancel" else None
        for n, _ in enumerate(call, start=1):
            if limit is not None and n >= limit:
                call.cancel()
        return "OK"

    def run(self, concurrency: int, duration_s: float, min_requests: int, max_duration_s: float,
            on_tick=None, tick_s: float = 10.0) -> float:
        """Client threads until both duration_s and min_requests are reached (at most max_duration_s)."""
        t0 = time.monotonic()
        stop = threading.Event()

        def worker(i: int) -> None:
            rng = random.Random(self._seed * 1000 + i)
            kinds, weights = list(WEIGHTS), list(WEIGHTS.values())
            while not stop.is_set():
                if self.one(rng, rng.choices(kinds, weights)[0]) == "RESOURCE_EXHAUSTED":
                    stop.wait(rng.uniform(0.05, 0.3))  # a polite client backs off when refused for overload

        threads = [threading.Thread(target=worker, args=(i,), daemon=True, name=f"soak-{i}")
                   for i in range(concurrency)]
        for t in threads:
            t.start()
        next_tick = t0
        while True:
            now = time.monotonic()
            if on_tick is not None and now >= next_tick:
                on_tick(now - t0)
                next_tick = now + tick_s
            enough = now - t0 >= duration_s and len(self.ledger.started) >= min_requests
            if enough or now - t0 >= max_duration_s:
                break
            stop.wait(0.5)  # the main thread samples memory while the client threads run
        stop.set()
        for t in threads:
            t.join(timeout=180)  # every call has a deadline of at most 120 s
        self.hung_threads = sum(t.is_alive() for t in threads)
        return time.monotonic() - t0


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def worker_pids(app: Any) -> dict[str, int]:
    import ray

    names = app.workers.remote().result(timeout_s=60)
    return {m: ray.get(ray.get_actor(n, namespace=ns).pid.remote(), timeout=60) for m, (n, ns) in names.items()}


def settle(app: Any, timeout_s: float = 60.0) -> dict[str, Any]:
    """Poll the replica's stats until no request runs and every worker's table is empty (or the timeout)."""
    deadline = time.monotonic() + timeout_s
    tick = threading.Event()
    stats = app.stats.remote().result(timeout_s=60)
    while time.monotonic() < deadline:
        stats = app.stats.remote().result(timeout_s=60)
        if not stats["active_requests"] and not any(stats["live_sequences"].values()):
            break
        tick.wait(0.2)  # releases travel to the workers asynchronously
    return stats


def run_soak(service: Any, topology: Any, *, duration_s: float, min_requests: int, concurrency: int | None = None,
             rss_from_s: float = 120.0, seed: int = 0, max_new_tokens: int = 12) -> dict[str, Any]:
    """Soak a started service (cluster.cli.RunningService); returns the report (see the module docstring)."""
    from ray import serve

    app = serve.get_app_handle(service.app_name)
    pids = worker_pids(app)
    concurrency = concurrency or topology.limits.max_concurrent_requests
    samples: list[tuple[float, dict[str, int | None]]] = []
    soak = Soak(service.address, sorted(topology.presets), topology.limits.max_concurrent_requests, seed,
                max_new_tokens)
    try:
        elapsed = soak.run(concurrency, duration_s, min_requests, max_duration_s=3 * duration_s + 600,
                           on_tick=lambda t: samples.append((t, {m: rss_bytes(p) for m, p in pids.items()})),
                           tick_s=max(1.0, min(10.0, duration_s / 20)))
    finally:
        soak.close()
    samples.append((elapsed, {m: rss_bytes(p) for m, p in pids.items()}))
    stats = settle(app)
    ledger = soak.ledger
    by_kind: dict[str, Counter] = defaultdict(Counter)
    unexpected: Counter = Counter()
    for rid, kind in ledger.started.items():
        status = ledger.final.get(rid, "LOST")
        by_kind[kind][status] += 1
        if status not in EXPECTED[kind]:
            unexpected[f"{kind}:{status}"] += 1
    base_t, base = next(((t, s) for t, s in samples if t >= rss_from_s), samples[0])
    end = samples[-1][1]
    growth = {m: (end[m] - base[m]) / base[m] if base.get(m) and end.get(m) else None for m in pids}
    lost = len(ledger.started) - len(ledger.final)
    report = {
        "address": service.address,
        "duration_s": round(elapsed, 1),
        "concurrency": concurrency,
        "requests": len(ledger.started),
        "final_statuses": len(ledger.final),
        "lost": lost,
        "duplicated": len(ledger.duplicated),
        "hung_client_threads": soak.hung_threads,
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "unexpected": dict(unexpected),
        "rss_from_s": round(base_t, 1),
        "rss_bytes_from": base,
        "rss_bytes_end": end,
        "rss_growth": {m: (round(g, 4) if g is not None else None) for m, g in growth.items()},
        "rss_samples": [{"t_s": round(t, 1), **s} for t, s in samples],
        "end_stats": {"active_requests": stats["active_requests"], "live_sequences": stats["live_sequences"]},
    }
    report["criteria"] = {
        "no_lost_or_duplicated": lost == 0 and not ledger.duplicated and soak.hung_threads == 0,
        "only_expected_statuses": not unexpected,
        "rss_growth_at_most_10pct": all(g is not None and g <= 0.10 for g in growth.values()),
        "sequences_empty": not stats["active_requests"] and not any(stats["live_sequences"].values()),
    }
    return report


def print_table(report: dict[str, Any]) -> None:
    print(f"soak: {report['requests']} requests in {report['duration_s']} s, concurrency {report['concurrency']}")
    print(f"  final statuses {report['final_statuses']}, lost {report['lost']}, duplicated {report['duplicated']}")
    print(f"  {'kind':<9} statuses")
    for kind, counts in report["by_kind"].items():
        print(f"  {kind:<9} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"  {'worker':<16} {'rss from (MiB)':>14} {'rss end (MiB)':>14} {'growth':>8}   "
          f"(from t={report['rss_from_s']} s)")
    for m, g in report["rss_growth"].items():
        a, b = report["rss_bytes_from"].get(m), report["rss_bytes_end"].get(m)
        print(f"  {m:<16} {(a or 0) / 2**20:>14.1f} {(b or 0) / 2**20:>14.1f} "
              f"{'n/a' if g is None else f'{100 * g:+.1f}%':>8}")
    print(f"  end: active {report['end_stats']['active_requests']}, live sequences "
          f"{report['end_stats']['live_sequences']}")
    for name, ok in report["criteria"].items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/zoo.yaml")
    p.add_argument("--duration-s", type=float, default=600.0)
    p.add_argument("--min-requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=None, help="client threads (default: max_concurrent_requests)")
    p.add_argument("--rss-from-s", type=float, default=120.0, help="memory growth is measured from this time on")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the report here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from logitfusion.cluster.cli import free_port, run_service
    from logitfusion.cluster.topology import load_topology

    topology = load_topology(a.config)
    service = run_service(a.config, grpc_port=free_port(), http_port=free_port(), blocking=False, access_log=False)
    try:
        report = run_soak(service, topology, duration_s=a.duration_s, min_requests=a.min_requests,
                          concurrency=a.concurrency, rss_from_s=a.rss_from_s, seed=a.seed,
                          max_new_tokens=a.max_new_tokens)
        report["config"] = str(a.config)
    finally:
        service.stop("soak done")
    print_table(report)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0 if all(report["criteria"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
