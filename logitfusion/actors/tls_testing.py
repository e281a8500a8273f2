"""Throw-away certificates for the TLS tests (never for a deployment): a CA, a worker certificate for the DNS name
the coordinator verifies, a client certificate (mutual TLS), and an unrelated CA with a worker certificate of its
own (an impostor). Needs `cryptography` (pinned in requirements.txt for the tests).

    files = write_test_pki(tmp_dir)   # {"ca", "worker_cert", "worker_key", "client_cert", "client_key",
                                      #  "other_ca", "other_worker_cert", "other_worker_key"} -> PEM paths
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from logitfusion.actors.tls import DEFAULT_SERVER_NAME


def write_test_pki(directory: str | Path, server_name: str = DEFAULT_SERVER_NAME) -> dict[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(cn: str, key: Any, issuer: tuple[x509.Name, Any] | None, *, ca: bool = False,
             dns: str | None = None, usage: Any = None) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(issuer[0] if issuer else name(cn))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if dns:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
        if usage is not None:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return b.sign(issuer[1] if issuer else key, hashes.SHA256())

    def write(file: str, obj: Any) -> str:
        path = root / file
        if isinstance(obj, x509.Certificate):
            path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
        else:
            path.write_bytes(obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return str(path)

    files: dict[str, str] = {}
    for prefix, ca_cn in (("", "lf-test-ca"), ("other_", "other-ca")):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = cert(ca_cn, ca_key, None, ca=True)
        wkey = ec.generate_private_key(ec.SECP256R1())
        files[f"{prefix}ca"] = write(f"{prefix}ca.pem", ca_cert)
        files[f"{prefix}worker_cert"] = write(f"{prefix}worker.pem", cert(
            "worker", wkey, (ca_cert.subject, ca_key), dns=server_name, usage=ExtendedKeyUsageOID.SERVER_AUTH))
        files[f"{prefix}worker_key"] = write(f"{prefix}worker.key", wkey)
        if not prefix:
            ckey = ec.generate_private_key(ec.SECP256R1())
            files["client_cert"] = write("client.pem", cert("coordinator", ckey, (ca_cert.subject, ca_key),
                                                            usage=ExtendedKeyUsageOID.CLIENT_AUTH))
            files["client_key"] = write("client.key", ckey)
    return files
