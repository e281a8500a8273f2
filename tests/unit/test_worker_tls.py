"""TLS on the coordinator-to-worker streams: WorkerServer + RemoteRunner over real gRPC on loopback, without Ray,
with a CA, worker and client certificates generated here (cryptography). The worker's certificate names only
"logitfusion-worker" (no IP), as one certificate for every worker would: the client verifies that name.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from logitfusion.actors.remote import RemoteRunner
from logitfusion.actors.tls import WorkerTLS
from logitfusion.actors.tls_testing import write_test_pki
from logitfusion.actors.worker import WorkerServer
from logitfusion.cluster.topology import Topology, load_topology
from logitfusion.engine.runner import ExtendOp, RunnerUnavailable, StepPlan
from logitfusion.engine.testing import tiny_runner
from logitfusion.errors import ConfigError

pytest.importorskip("cryptography")

pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)

PLAN = StepPlan(extends=(ExtendOp("a", (1, 2, 3, 4), "last"), ExtendOp("b", (5, 6), "all")))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    """A CA; a worker certificate for the DNS name logitfusion-worker; a client certificate; and a second,
    unrelated CA with its own worker certificate (an impostor)."""
    return write_test_pki(tmp_path_factory.mktemp("pki"))


def _server_tls(pki, mutual=False, impostor=False) -> WorkerTLS:
    cert, key = ("other_worker_cert", "other_worker_key") if impostor else ("worker_cert", "worker_key")
    return WorkerTLS(cert_file=pki[cert], key_file=pki[key], ca_file=pki["ca"],
                     client_cert_file=pki["client_cert"] if mutual else None,
                     client_key_file=pki["client_key"] if mutual else None)


def _client_tls(pki, with_cert=False, ca="ca") -> WorkerTLS:
    return WorkerTLS(cert_file=pki["worker_cert"], key_file=pki["worker_key"], ca_file=pki[ca],
                     client_cert_file=pki["client_cert"] if with_cert else None,
                     client_key_file=pki["client_key"] if with_cert else None)


@pytest.fixture(scope="module")
def reference():
    runner = tiny_runner("large", threaded=False)
    want = runner.step(PLAN)
    runner.close()
    return want


def _serve(tls: WorkerTLS | None):
    runner = tiny_runner("large", threaded=False)
    return runner, WorkerServer(runner, tls=tls)


def _refused(address: str, tls: WorkerTLS | None) -> str:
    with pytest.raises(RunnerUnavailable) as info:
        RemoteRunner("large", lambda: address, reconnect_timeout_s=2, call_timeout_s=1, tls=tls)
    return str(info.value)


@pytest.mark.parametrize("mutual", [False, True], ids=["server-tls", "mutual-tls"])
def test_tls_stream_gives_the_same_logits_and_refuses_the_wrong_clients(pki, reference, mutual):
    runner, server = _serve(_server_tls(pki, mutual=mutual))
    try:
        remote = RemoteRunner("large", lambda: server.address, reconnect_timeout_s=10, tls=_client_tls(pki, mutual))
        try:
            got = remote.step(PLAN)
            assert all(torch.equal(g, w) for g, w in zip(got, reference, strict=True))
            assert remote.sequences() == {"a": 4, "b": 2}
        finally:
            remote.close()
        _refused(server.address, None)  # plaintext client: the TLS handshake never completes
        _refused(server.address, _client_tls(pki, mutual, ca="other_ca"))  # does not trust the worker's CA
        if mutual:
            _refused(server.address, _client_tls(pki, with_cert=False))  # no client certificate
    finally:
        server.stop(0)
        runner.close()


def test_client_refuses_a_worker_whose_certificate_another_ca_signed(pki):
    runner, server = _serve(_server_tls(pki, impostor=True))
    try:
        _refused(server.address, _client_tls(pki))
    finally:
        server.stop(0)
        runner.close()


def test_plaintext_worker_is_refused_by_a_tls_client(pki):
    runner, server = _serve(None)
    try:
        _refused(server.address, _client_tls(pki))
    finally:
        server.stop(0)
        runner.close()


def test_bad_files_name_the_field(tmp_path, pki):
    with pytest.raises(ValueError, match="worker_tls.ca_file: cannot read"):
        WorkerTLS(cert_file=pki["worker_cert"], key_file=pki["worker_key"], ca_file=str(tmp_path / "nope.pem")
                  ).channel_credentials()
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match="worker_tls.key_file: .* is not a PEM file"):
        WorkerTLS(cert_file=pki["worker_cert"], key_file=str(tmp_path / "junk.pem"), ca_file=pki["ca"]
                  ).server_credentials()
    with pytest.raises(ValueError, match="client_cert_file and client_key_file"):
        WorkerTLS(cert_file="a", key_file="b", ca_file="c", client_cert_file="d")


def test_topology_worker_tls_resolves_paths_and_checks_the_client_pair(tmp_path):
    d = {
        "models": [{"name": "large", "role": "large", "path": "large"}],
        "presets": {"large_base": {"method": "single", "model": "large"}},
        "default_preset": "large_base",
        "serve": {"worker_tls": {"cert_file": "tls/worker.pem", "key_file": "tls/worker.key", "ca_file": "/etc/ca.pem",
                                 "client_cert_file": "tls/c.pem", "client_key_file": "tls/c.key"}},
    }
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(d))
    tls = load_topology(path).worker_tls()
    assert tls.cert_file == str(tmp_path / "tls/worker.pem") and tls.ca_file == "/etc/ca.pem"
    assert tls.mutual and tls.server_name == "logitfusion-worker"
    del d["serve"]["worker_tls"]["client_key_file"]
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match="client_cert_file .* and client_key_file"):
        load_topology(path)
    assert Topology.model_validate({k: v for k, v in d.items() if k != "serve"}).worker_tls() is None
