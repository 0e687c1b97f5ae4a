"""TLS, mutual TLS and bearer tokens on every channel of a real stack (four processes on loopback ports).

A throw-away PKI is made with the ``openssl`` CLI: a CA, one service certificate (SANs 127.0.0.1 and localhost,
server and client use: the orchestrator presents it to its stages) and a client certificate signed by that CA, and a
second, rogue CA with a client certificate of its own. Every service of the stack speaks mutual TLS and requires
the token; the orchestrator reaches its stages with the same certificate and token, so a generation that completes
proves the inter-stage channels are secured too. The image equals the plaintext stack's image for the same request
(security changes the transport, not a pixel).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.client import ChituClient, GenerateOptions
from services.config import ClientSecurityConfig, ConfigError, TlsConfig
from services.media import decode_png
from services.proto.chitu.v1 import encoder_pb2, encoder_pb2_grpc
from tests.net import free_port

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token-for-tests"
PROMPT = "a small red circle on the left, on a blue background"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=d)


def _signed(d: Path, name: str, ca: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(ext)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)


ENCODER_HEALTH_PORT = free_port()
"""The encoder's plaintext health-only port (``server.health_port``), as Kubernetes' gRPC probes need it."""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _signed(d, "service", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                "extendedKeyUsage=serverAuth,clientAuth\n")
    _signed(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _ca(d, "rogue")
    _signed(d, "intruder", "rogue", "extendedKeyUsage=clientAuth\n")
    (d / "token").write_text(f"# the stack's token\n{TOKEN}\n")
    (d / "wrong-token").write_text("not-the-token\n")
    return d


@pytest.fixture(scope="module")
def secure_stack(tiny_flux: Path, pki: Path, tmp_path_factory: pytest.TempPathFactory):
    from clients.stack import LocalStack, StackConfig, StackSecurityConfig

    security = StackSecurityConfig(ca_file=str(pki / "ca.pem"), cert_file=str(pki / "service.pem"),
                                   key_file=str(pki / "service.key"), token_file=str(pki / "token"))
    cfg = StackConfig(checkpoints={"tiny-flux": str(tiny_flux)}, listen="127.0.0.1:0", device="cpu",
                      dtype="float32", security=security,
                      stage_overrides={"encoder": [f"server.health_port={ENCODER_HEALTH_PORT}"]})
    stack = LocalStack(cfg, workdir=tmp_path_factory.mktemp("secure-stack"))
    stack.start()
    yield stack
    stack.stop()


def client_security(pki: Path, cert: str = "client", token: str = "token", ca: str = "ca") -> ClientSecurityConfig:
    return ClientSecurityConfig(ca_file=str(pki / f"{ca}.pem"), cert_file=str(pki / f"{cert}.pem") if cert else "",
                                key_file=str(pki / f"{cert}.key") if cert else "",
                                token_file=str(pki / token) if token else "")


def _image(address: str, security: ClientSecurityConfig | None) -> np.ndarray:
    with ChituClient(address, security=security) as c:
        result = c.generate_result(PROMPT, "tiny-flux", GenerateOptions(steps=3, seed=5, width=64, height=48),
                                   timeout=120)
    return decode_png(result.artifacts[0].data)


def test_authorised_client_gets_the_same_image_as_over_plaintext(secure_stack, flux_stack, pki: Path) -> None:
    secure = _image(secure_stack.address, client_security(pki))
    plain = _image(flux_stack.address, None)
    assert secure.shape == (48, 64, 3) and secure.std() > 0
    np.testing.assert_array_equal(secure, plain)


@pytest.mark.parametrize(("token", "needle"), [("", "requires a bearer token"), ("wrong-token", "not accepted")],
                         ids=["no-token", "wrong-token"])
def test_missing_or_wrong_token_is_unauthenticated(secure_stack, pki: Path, token: str, needle: str) -> None:
    with ChituClient(secure_stack.address, security=client_security(pki, token=token)) as c, \
            pytest.raises(grpc.RpcError) as err:
        c.list_models()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and needle in err.value.details()
    with ChituClient(secure_stack.address, security=client_security(pki)) as c:  # still serving
        assert [m.name for m in c.list_models().models] == ["tiny-flux"]


@pytest.mark.parametrize("who", ["plaintext", "no-client-certificate", "rogue-ca-certificate"])
def test_transport_without_valid_credentials_is_refused(secure_stack, pki: Path, who: str) -> None:
    security = {"plaintext": None, "no-client-certificate": client_security(pki, cert=""),
                "rogue-ca-certificate": client_security(pki, cert="intruder")}[who]
    with ChituClient(secure_stack.address, security=security) as c, pytest.raises(grpc.RpcError) as err:
        c.list_models(timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_stages_require_the_token_too_and_health_needs_none(secure_stack, pki: Path) -> None:
    """A stage port refuses a call without the token (the orchestrator's calls carry it); health checks, which
    probes make without one, answer over mutual TLS."""
    from services.security import open_channel

    encoder = secure_stack.service("encoder").address
    with open_channel(encoder, client_security(pki, token=""), []) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            encoder_pb2_grpc.TextEncoderServiceStub(ch).GetEncoderInfo(encoder_pb2.GetEncoderInfoRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with open_channel(encoder, client_security(pki), []) as ch:
        info = encoder_pb2_grpc.TextEncoderServiceStub(ch).GetEncoderInfo(encoder_pb2.GetEncoderInfoRequest(),
                                                                           timeout=10).info
    assert info.family == "flux"


def test_cli_connects_with_tls_and_token(secure_stack, pki: Path, tmp_path: Path) -> None:
    flags = ["--server", secure_stack.address, "--ca-file", str(pki / "ca.pem"), "--cert-file",
             str(pki / "client.pem"), "--key-file", str(pki / "client.key"), "--token-file", str(pki / "token")]
    proc = subprocess.run([sys.executable, "-m", "clients.cli", "models", *flags], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [m["name"] for m in json.loads(proc.stdout)["models"]] == ["tiny-flux"]
    proc = subprocess.run([sys.executable, "-m", "clients.cli", "generate", PROMPT, *flags, "--steps", "2",
                           "--width", "64", "--height", "48", "--output", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip().splitlines()[-1]).suffix == ".png"
    proc = subprocess.run([sys.executable, "-m", "clients.cli", "models", "--server", secure_stack.address,
                           "--token-file", str(pki / "token")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "never travels in plaintext" in proc.stderr


def test_security_config_errors_name_the_field(pki: Path) -> None:
    with pytest.raises(ConfigError, match="never travels in plaintext"):
        ClientSecurityConfig(token_file=str(pki / "token")).validate()
    with pytest.raises(ConfigError, match="cert_file and key_file"):
        TlsConfig(cert_file=str(pki / "service.pem")).validate()
    with pytest.raises(ConfigError, match="client_ca_file"):
        TlsConfig(client_ca_file=str(pki / "ca.pem")).validate()
    with pytest.raises(ConfigError, match="not a readable file"):
        ClientSecurityConfig(ca_file=str(pki / "missing.pem")).validate()


def test_plaintext_health_port_answers_health_only(secure_stack) -> None:
    """``server.health_port``: probes that cannot speak TLS read the same status there; nothing else is served."""
    with grpc.insecure_channel(f"127.0.0.1:{ENCODER_HEALTH_PORT}") as ch:
        for service in ("", "chitu.v1.TextEncoderService"):
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            encoder_pb2_grpc.TextEncoderServiceStub(ch).GetEncoderInfo(encoder_pb2.GetEncoderInfoRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_node_client_with_tls_and_token(secure_stack, pki: Path) -> None:
    import shutil

    node = shutil.which("node")
    assert node, "Node.js is required (scripts/setup.sh installs the client's packages with npm)"
    proc = subprocess.run([node, "test/secure.js", secure_stack.address, "tiny-flux", str(pki / "ca.pem"),
                           str(pki / "client.pem"), str(pki / "client.key"), str(pki / "token")],
                          cwd=REPO / "clients" / "node", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '"ok":true' in proc.stdout


def test_chitu_up_with_security_flags(tiny_flux: Path, pki: Path, tmp_path: Path) -> None:
    """`chitu up --ca-file --cert-file --key-file --token-file`: the whole stack behind mutual TLS and the token."""
    import re
    import signal

    flags = ["--ca-file", str(pki / "ca.pem"), "--cert-file", str(pki / "service.pem"), "--key-file",
             str(pki / "service.key"), "--token-file", str(pki / "token")]
    proc = subprocess.Popen([sys.executable, "-m", "clients.cli", "up", "--listen", "127.0.0.1:0", "--device", "cpu",
                             "--dtype", "float32", "--checkpoint", f"tiny-flux={tiny_flux}", "--workdir",
                             str(tmp_path / "up"), *flags], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"orchestrator at (\S+)", line)
        assert match, line
        with ChituClient(match.group(1), security=client_security(pki)) as c:
            assert [m.name for m in c.list_models().models] == ["tiny-flux"]
        with ChituClient(match.group(1)) as c, pytest.raises(grpc.RpcError) as err:
            c.list_models(timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        import os

        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
