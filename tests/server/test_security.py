"""Who may call: TLS, mutual TLS, bearer tokens; and names that must not leave the repository.

Each test makes its own CA and certificates (the `cryptography` package) and starts its own server.
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import RunningServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from nnserve_client import Client, Unauthenticated, Unavailable, tls_credentials
from nnserve_contract.stubs import grpc_predict_v2_pb2 as pb
from nnserve_contract.stubs import grpc_predict_v2_pb2_grpc as pb_grpc

PIXELS = np.zeros((1, 64), np.float32)
Pem = tuple[bytes, bytes]  # (private key, certificate)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> Pem:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


class CertificateAuthority:
    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, name: str, server: bool) -> Pem:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
        )
        if server:
            sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return _pem(key, builder.sign(self.key, hashes.SHA256()))


def _files(folder: Path, **contents: bytes) -> dict[str, str]:
    paths = {}
    for name, data in contents.items():
        path = folder / f"{name}.pem"
        path.write_bytes(data)
        paths[name] = str(path)
    return paths


@pytest.fixture(scope="module")
def authority() -> CertificateAuthority:
    return CertificateAuthority("nnserve test CA")


def test_tls_serves_clients_that_trust_its_ca(
    own_server: Callable[..., RunningServer], authority: CertificateAuthority, tmp_path: Path
) -> None:
    key, chain = authority.issue("nnserve", server=True)
    files = _files(tmp_path, key=key, chain=chain)
    running = own_server("--tls-cert-file", files["chain"], "--tls-key-file", files["key"])
    with Client(running.target, credentials=tls_credentials(authority.pem)) as client:
        assert len(client.classify("digits-fnn", PIXELS)) == 1
    with Client(running.target, timeout=3, retries=0) as plaintext, pytest.raises(Unavailable):
        plaintext.live()
    stranger = CertificateAuthority("someone else")
    untrusting = tls_credentials(stranger.pem)
    with Client(running.target, credentials=untrusting, timeout=3, retries=0) as client, pytest.raises(Unavailable):
        client.live()


def test_mutual_tls_refuses_clients_without_a_valid_certificate(
    own_server: Callable[..., RunningServer], authority: CertificateAuthority, tmp_path: Path
) -> None:
    key, chain = authority.issue("nnserve", server=True)
    files = _files(tmp_path, key=key, chain=chain, ca=authority.pem)
    running = own_server(
        "--tls-cert-file", files["chain"], "--tls-key-file", files["key"], "--tls-client-ca-file", files["ca"]
    )
    client_key, client_chain = authority.issue("a trusted caller", server=False)
    with Client(running.target, credentials=tls_credentials(authority.pem, client_key, client_chain)) as client:
        assert len(client.classify("digits-fnn", PIXELS)) == 1
    # No certificate, or one from another CA: the handshake fails, nothing is served.
    strange_key, strange_chain = CertificateAuthority("someone else").issue("a stranger", server=False)
    for credentials in (
        tls_credentials(authority.pem),
        tls_credentials(authority.pem, strange_key, strange_chain),
    ):
        with (
            Client(running.target, credentials=credentials, timeout=3, retries=0) as client,
            pytest.raises(Unavailable),
        ):
            client.classify("digits-fnn", PIXELS)
    with Client(running.target, credentials=tls_credentials(authority.pem, client_key, client_chain)) as client:
        assert client.ready()  # still serving the callers it trusts


def test_a_bearer_token_guards_every_rpc_but_health(own_server: Callable[..., RunningServer], tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-t0ken\n")
    running = own_server("--auth-token-file", str(token_file))
    with Client(running.target, token="s3cret-t0ken") as client:
        assert len(client.classify("digits-fnn", PIXELS)) == 1
    for token in (None, "wrong", "s3cret-t0ke"):
        with Client(running.target, token=token, retries=0) as client:
            with pytest.raises(Unauthenticated, match="token"):
                client.infer("digits-fnn", {"input": PIXELS})
            with pytest.raises(Unauthenticated):
                list(client.generate("digits-fnn", prompt="x"))
    with grpc.insecure_channel(running.target) as channel:
        # Health stays open: Kubernetes' probes carry no token.
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        # Reflection (a bidirectional stream) is guarded like the rest.
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        with pytest.raises(grpc.RpcError) as caught:
            list(reflection)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _load(target: str, name: str) -> grpc.RpcError:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name), timeout=10)
        return caught.value


def test_model_names_cannot_reach_outside_the_repository(
    own_server: Callable[..., RunningServer], model_repository: Path, tmp_path: Path
) -> None:
    repository = tmp_path / "models"
    shutil.copytree(model_repository / "digits-fnn", repository / "digits-fnn")
    outside = tmp_path / "outside"
    shutil.copytree(model_repository / "echo", outside / "echo")
    (repository / "escape").symlink_to(outside / "echo")  # a model folder that leads out
    (repository / "half-out").mkdir()
    (repository / "half-out" / "1").symlink_to(outside / "echo" / "1")  # a version folder that does
    running = own_server(repository=repository)
    for name in ("../outside/echo", "..", "/etc", "digits-fnn/../../outside", "a\x00b", "escape"):
        error = _load(running.target, name)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, error.details())
    with Client(running.target) as client:
        assert [m.name for m in client.models() if m.ready] == ["digits-fnn"]
        assert len(client.classify("digits-fnn", PIXELS)) == 1  # still serving
    with grpc.insecure_channel(running.target) as channel:
        index = pb_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
    states = {(m.name, m.version): (m.state, m.reason) for m in index.models}
    assert states[("half-out", "1")] == ("UNAVAILABLE", "resolves outside the model repository")
    assert ("escape", "1") not in states
    assert "resolves outside the model repository" in running.log()


def test_entries_the_repository_skips_are_named_in_a_warning(
    own_server: Callable[..., RunningServer], model_repository: Path, tmp_path: Path
) -> None:
    repository = tmp_path / "models"
    shutil.copytree(model_repository / "digits-fnn", repository / "digits-fnn")
    shutil.copytree(model_repository / "echo", repository / "bad name!")
    (repository / "loop").symlink_to(repository / "loop")  # a link to itself
    (repository / "ring-a").symlink_to(repository / "ring-b")
    (repository / "ring-b").symlink_to(repository / "ring-a")
    running = own_server("--poll-interval-s", "0.2", repository=repository)
    time.sleep(1)  # a few rescans: each entry is still said once
    log = running.log()
    assert log.count("repository entry 'bad name!' skipped: model names are letters") == 1
    for name in ("loop", "ring-a", "ring-b"):
        assert log.count(f"repository entry '{name}' skipped: it cannot be followed") == 1, log
    with Client(running.target) as client:
        assert [m.name for m in client.models()] == ["digits-fnn"]


def test_repository_control_can_be_turned_off(own_server: Callable[..., RunningServer]) -> None:
    running = own_server("--no-repository-control")
    error = _load(running.target, "digits-fnn")
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "--no-repository-control" in (error.details() or "")
    with Client(running.target) as client:
        assert client.model_ready("digits-fnn")  # nothing was unloaded
