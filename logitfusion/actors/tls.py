"""TLS for the coordinator-to-worker gRPC streams (worker.proto), for pipelines whose workers sit on other machines.

    tls = WorkerTLS(cert_file="worker.pem", key_file="worker.key", ca_file="ca.pem")             # server TLS
    tls = WorkerTLS(..., client_cert_file="coord.pem", client_key_file="coord.key")            # mutual TLS
    server.add_secure_port(addr, tls.server_credentials())     # the worker (WorkerServer)
    grpc.secure_channel(addr, tls.channel_credentials(), options=[*opts, *tls.channel_options()])  # RemoteRunner

One certificate may serve every worker: workers are dialled by IP (a restarted worker comes back on another port,
maybe another node), so the coordinator checks the worker's certificate against ``server_name`` (a DNS name in the
certificate's subjectAltName, default "logitfusion-worker") rather than against the IP it dials. ``ca_file`` is the
CA the coordinator trusts for worker certificates and, with mutual TLS, the CA the workers trust for the
coordinator's client certificate. Files are PEM, read where they are used (each worker reads its own on its node:
mount them from a Secret on every Ray pod), never shipped through Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

DEFAULT_SERVER_NAME = "logitfusion-worker"


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{what}: {path} is not a PEM file")
    return data


@dataclass(frozen=True)
class WorkerTLS:
    """Where the PEM files are (see the module docstring). Mutual TLS when both client files are set."""

    cert_file: str  # the workers' certificate chain (server side)
    key_file: str  # its private key
    ca_file: str  # CA of the worker certificates (coordinator side); with mutual TLS also of the client certificate
    client_cert_file: str | None = None  # the coordinator's certificate: set with client_key_file for mutual TLS
    client_key_file: str | None = None
    server_name: str = DEFAULT_SERVER_NAME  # the name the coordinator verifies in the worker's certificate

    def __post_init__(self) -> None:
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError("worker_tls: set both client_cert_file and client_key_file (mutual TLS) or neither")
        if not self.server_name:
            raise ValueError("worker_tls.server_name must not be empty")

    @property
    def mutual(self) -> bool:
        return self.client_cert_file is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        """The worker's side: its certificate; with mutual TLS, clients must present one signed by ca_file."""
        pair = (_read(self.key_file, "worker_tls.key_file"), _read(self.cert_file, "worker_tls.cert_file"))
        if self.mutual:
            return grpc.ssl_server_credentials([pair], root_certificates=_read(self.ca_file, "worker_tls.ca_file"),
                                               require_client_auth=True)
        return grpc.ssl_server_credentials([pair])

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """The coordinator's side: trust ca_file only; present the client certificate with mutual TLS."""
        ca = _read(self.ca_file, "worker_tls.ca_file")
        if self.mutual:
            return grpc.ssl_channel_credentials(
                root_certificates=ca,
                private_key=_read(self.client_key_file, "worker_tls.client_key_file"),  # type: ignore[arg-type]
                certificate_chain=_read(self.client_cert_file, "worker_tls.client_cert_file"),  # type: ignore[arg-type]
            )
        return grpc.ssl_channel_credentials(root_certificates=ca)

    def channel_options(self) -> list[tuple[str, Any]]:
        """Verify the worker's certificate against server_name, whatever IP is dialled."""
        return [("grpc.ssl_target_name_override", self.server_name), ("grpc.default_authority", self.server_name)]
