"""Issue 10, through the whole service: a model worker that stalls (SIGSTOP: alive, its stream open, no answer).

One module-scoped service (embedded Ray on loopback, Serve gRPC ingress, tiny random Llamas on disk) with a short
request timeout, so the stalled request's deadline comes within the test. The request that reads the stalled model
ends with DEADLINE_EXCEEDED at that deadline; a request that does not read it is answered meanwhile, token for token
as before; the service stays SERVING; after SIGCONT every worker's sequence table ends empty and the stalled model
serves again.
"""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest
import yaml

from logitfusion.client import build_request
from logitfusion.v1 import fusion_pb2_grpc

import service_models  # tests/integration/service_models.py

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

APP = "lfstall"
TIMEOUT_S = 12.0  # limits.request_timeout_s of this deployment


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    service_models.write_family(root)
    topo = service_models.topology_dict(root, request_timeout_s=TIMEOUT_S)
    topo["serve"]["app_name"] = APP
    topo["serve"]["stall_timeout_s"] = 0.5
    config = root / "topology.yaml"
    config.write_text(yaml.safe_dump(topo, sort_keys=False))
    with service_models.serving(config) as svc:
        yield svc


def generate(address: str, preset: str, prompt: str = "the stalled one") -> tuple[str, list[int], float]:
    """(status code name, token ids, seconds) of one unary Generate."""
    t0 = time.monotonic()
    try:
        with grpc.insecure_channel(address) as ch:
            resp = fusion_pb2_grpc.FusionServiceStub(ch).Generate(
                build_request(prompt, preset=preset, max_new_tokens=12, stop_at_eos=False), timeout=120)
        return "OK", list(resp.token_ids), time.monotonic() - t0
    except grpc.RpcError as exc:
        return exc.code().name, [], time.monotonic() - t0


def test_a_sigstopped_worker_fails_only_its_requests_at_their_deadline(service):
    from ray import serve

    app = serve.get_app_handle(APP)
    workers = service_models.worker_actors(app)
    pid = ray.get(workers["expert_b"].pid.remote(), timeout=60)
    code, proxy_ref, _ = generate(service.address, "proxy_a")  # reads large, small, expert_a
    code_multi, multi_ref, _ = generate(service.address, "dlf_multi")  # reads expert_b too
    assert code == code_multi == "OK"
    os.kill(pid, signal.SIGSTOP)
    try:
        code, tokens, alone_s = generate(service.address, "proxy_a")
        assert code == "OK" and tokens == proxy_ref, code  # does not read expert_b: answered, identical
        code, _, stalled_s = generate(service.address, "dlf_multi")
        assert code == "DEADLINE_EXCEEDED", code
        assert TIMEOUT_S - 0.5 <= stalled_s < TIMEOUT_S + 30, stalled_s
        print(f"\nstalled worker, through the service: a request not reading it answered in {alone_s:.1f} s; the one "
              f"reading it ended DEADLINE_EXCEEDED after {stalled_s:.1f} s (request_timeout_s {TIMEOUT_S:g})")
    finally:
        os.kill(pid, signal.SIGCONT)

    def idle():
        s = app.stats.remote().result(timeout_s=60)
        return s if not s["active_requests"] and not any(s["live_sequences"].values()) else None

    service_models.wait_for(idle, 120, "no request running and empty sequence tables on every worker",
                            tolerate_errors=True, tick_s=0.2)
    code, tokens, _ = generate(service.address, "dlf_multi")
    assert code == "OK" and tokens == multi_ref  # the continued worker serves again, identically
