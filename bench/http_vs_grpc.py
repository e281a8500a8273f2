"""What the HTTP ingress adds to a short request, compared with the gRPC ingress of the same Serve application.

Both paths enter through a Serve proxy (HTTP proxy vs gRPC proxy) and reach the same replica, Coordinator and
workers, so the difference is the ingress alone: Serve's HTTP path (a request body is fetched from the proxy by a
call back from the replica) and JSON against protobuf.
One service on the zoo (large, small, expert_capital; preset dlf_capital); per row, ``pairs`` rounds each time one
gRPC Generate (logitfusion.client, one channel) and one POST /v1/completions with two HTTP clients (stdlib
http.client keep-alive: "http"; a requests.Session: "http_requests"), in rotating order, same prompt, same greedy
tokens (stop_at_eos off, so every request makes max_tokens tokens). The first rows are floors without model work:
the two health checks (proxy and replica hop), then a request with a body (gRPC ListRecipes vs POST /detokenize).
The machine is shared: the reported overhead is the median of the per-round ratios http / grpc - 1, beside the
medians.

    python -m bench.http_vs_grpc [--pairs 40] [--json results/http_vs_grpc.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

TARGET_OVERHEAD = 0.15  # the target: HTTP adds at most 15 % to a short request
PROMPT = "question: what is the capital of bathebrik? answer:"


def topology(tmp: Path) -> Path:
    data = {
        "models": [{"name": n, "role": r, "path": f"zoo:{n}", "num_cpus": 0.25}
                   for n, r in (("large", "large"), ("small", "small"), ("expert_capital", "expert"))],
        "presets": {"dlf_capital": {"method": "dlf", "experts": ["expert_capital"], "solver": "newton"}},
        "default_preset": "dlf_capital",
        "serve": {"app_name": "lfbench", "coordinator_num_cpus": 0.25},
    }
    path = tmp / "topology.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class RawHttp:
    """A lean keep-alive HTTP/1.1 client (http.client): what the ingress costs without a heavy client library."""

    def __init__(self, address: str) -> None:
        import http.client

        host, port = address.rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=60)

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        self.conn.request(method, path, body=data, headers=headers)
        resp = self.conn.getresponse()
        payload = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {resp.status}: {payload[:200]!r}")
        return json.loads(payload)


def paired(arms: dict, pairs: int) -> dict[str, list[float]]:
    """Each round calls every arm once, in a rotating order; returns arm -> seconds per round. Arms return text,
    which must agree within a round (the same greedy answer through every ingress)."""
    names = list(arms)
    for _ in range(5):  # warm-up: channels, sessions, the workers' first forwards
        for f in arms.values():
            f()
    out: dict[str, list[float]] = {n: [] for n in names}
    for i in range(pairs):
        order = names[i % len(names):] + names[: i % len(names)]
        texts = set()
        for n in order:
            t0 = time.perf_counter()
            texts.add(arms[n]())
            out[n].append(time.perf_counter() - t0)
        if len(texts) != 1:
            raise RuntimeError(f"the ingresses answered differently: {texts}")
    return out


def summarize(kind: str, times: dict[str, list[float]], max_tokens: int | None) -> list[dict]:
    rows = []
    for arm in ("http", "http_requests"):
        if arm not in times:
            continue
        ratios = [h / g - 1.0 for g, h in zip(times["grpc"], times[arm])]
        rows.append({
            "request": kind, "max_tokens": max_tokens, "http_client": arm, "pairs": len(ratios),
            "grpc_ms": 1e3 * statistics.median(times["grpc"]), "http_ms": 1e3 * statistics.median(times[arm]),
            "overhead": statistics.median(ratios),
            "overhead_p90": sorted(ratios)[int(0.9 * (len(ratios) - 1))],
            "target": TARGET_OVERHEAD, "meets_target": statistics.median(ratios) <= TARGET_OVERHEAD,
        })
    return rows


def measure(service, max_tokens: int, pairs: int) -> list[dict]:
    import requests

    from logitfusion.client import FusionClient

    session = requests.Session()
    raw = RawHttp(service.http_address)
    url = f"{service.base_url}/v1/completions"
    body = {"model": "dlf_capital", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "logitfusion": {"stop_at_eos": False}}

    with FusionClient(service.address, timeout_s=60) as client:
        def grpc_once() -> str:
            return client.generate(PROMPT, preset="dlf_capital", max_new_tokens=max_tokens, stop_at_eos=False).text

        def http_once() -> str:
            return raw.call("POST", "/v1/completions", body)["choices"][0]["text"]

        def requests_once() -> str:
            resp = session.post(url, json=body, timeout=60)
            resp.raise_for_status()
            return resp.json()["choices"][0]["text"]

        times = paired({"grpc": grpc_once, "http": http_once, "http_requests": requests_once}, pairs)
    return summarize("completion", times, max_tokens)


def measure_health(service, pairs: int) -> list[dict]:
    """The floor of each path: grpc.health.v1 Check against GET /health (no model work at all)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    raw = RawHttp(service.http_address)
    with grpc.insecure_channel(service.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        def grpc_once() -> str:
            stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
            return "ok"

        def http_once() -> str:
            return raw.call("GET", "/health")["status"]

        times = paired({"grpc": grpc_once, "http": http_once}, pairs)
    return summarize("health", times, None)


def measure_body_floor(service, pairs: int) -> list[dict]:
    """A request WITH a body and no model work: gRPC ListRecipes against POST /detokenize of one token. Serve's
    HTTP path fetches a request body from the proxy with a call back from the replica, which GET /health skips."""
    from logitfusion.client import FusionClient

    raw = RawHttp(service.http_address)
    with FusionClient(service.address, timeout_s=60) as client:
        def grpc_once() -> str:
            client.list_recipes()
            return "ok"

        def http_once() -> str:
            raw.call("POST", "/detokenize", {"tokens": [5]})
            return "ok"

        times = paired({"grpc": grpc_once, "http": http_once}, pairs)
    return summarize("body, no work", times, None)


def table(rows: list[dict]) -> str:
    cols = ["request", "max_tokens", "http_client", "pairs", "grpc_ms", "http_ms", "overhead", "overhead_p90", "target",
            "meets_target"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            cells.append(f"{v:.2f}" if c.endswith("_ms") else f"{100 * v:+.1f}%" if c.startswith("overhead")
                         else f"{100 * v:.0f}%" if c == "target" else "" if v is None else str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    import torch

    from logitfusion.cluster.cli import free_port, run_service

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--json", default="results/http_vs_grpc.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        service = run_service(topology(Path(tmp)), grpc_port=free_port(), http_port=free_port(), blocking=False,
                              num_cpus=4, access_log=False)
        try:
            load = os.getloadavg()[0]
            rows = measure_health(service, args.pairs) + measure_body_floor(service, args.pairs)
            for n in args.max_tokens:
                rows += measure(service, n, args.pairs)
            load_after = os.getloadavg()[0]
        finally:
            service.shutdown()
    report = {"section": "http_vs_grpc", "rows": rows, "loadavg_before": load, "loadavg_after": load_after,
              "cpus": os.cpu_count()}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(table(rows))
    print(f"\nload average {load:.2f} -> {load_after:.2f} on {os.cpu_count()} CPUs; wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
