"""TLS, mutual TLS and bearer tokens for every gRPC channel (configuration: ``services.config.TlsConfig``,
``AuthConfig``, ``ClientSecurityConfig``).

Servers: a TLS port when ``server.tls.cert_file`` is set, requiring client certificates when ``client_ca_file`` is
set; a token check on every RPC but health and reflection when ``server.auth.token_file`` is set (UNAUTHENTICATED,
saying what is missing, before the handler runs). Clients: TLS against ``ca_file``, a client certificate for mutual
TLS, and the token as call credentials (gRPC sends call credentials over TLS channels only).
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

import grpc

from services.config import ClientSecurityConfig, TlsConfig

AUTHORIZATION_KEY = "authorization"
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""Methods that never need a token: Kubernetes probes and grpcurl's discovery cannot send one."""


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials | None:
    """Credentials of a TLS port, or None for plaintext."""
    if not tls.enabled:
        return None
    pair = (Path(tls.key_file).read_bytes(), Path(tls.cert_file).read_bytes())
    client_ca = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


def channel_credentials(sec: ClientSecurityConfig) -> grpc.ChannelCredentials | None:
    """TLS (+ client certificate, + token as call credentials) for a channel, or None for plaintext."""
    if not sec.tls:
        return None
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(sec.ca_file).read_bytes(),
        private_key=Path(sec.key_file).read_bytes() if sec.key_file else None,
        certificate_chain=Path(sec.cert_file).read_bytes() if sec.cert_file else None)
    token = sec.token()
    if token:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return creds


def secure_options(sec: ClientSecurityConfig) -> list[tuple[str, Any]]:
    """Channel options that TLS needs (the name checked in the server's certificate)."""
    return [("grpc.ssl_target_name_override", sec.server_name)] if sec.tls and sec.server_name else []


def _secured(sec: ClientSecurityConfig | None, options: list[tuple[str, Any]]
             ) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, Any]]]:
    creds = channel_credentials(sec) if sec is not None else None
    return creds, options if creds is None else [*options, *secure_options(sec)]


def open_channel(address: str, sec: ClientSecurityConfig | None, options: list[tuple[str, Any]]) -> grpc.Channel:
    """A blocking channel to ``address``, secured as ``sec`` says (None, or no ``ca_file``: plaintext)."""
    creds, options = _secured(sec, options)
    if creds is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, creds, options=options)


def open_aio_channel(address: str, sec: ClientSecurityConfig | None, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
    """The asyncio form of ``open_channel``."""
    creds, options = _secured(sec, options)
    if creds is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, creds, options=options)


def token_problem(method: str, metadata: dict[str, str], tokens: frozenset[str]) -> str:
    """Why this call's credentials are refused ("" when accepted)."""
    if not tokens or method.startswith(EXEMPT_PREFIXES):
        return ""
    value = metadata.get(AUTHORIZATION_KEY, "")
    if not value:
        return "this service requires a bearer token: send 'authorization: Bearer <token>' metadata"
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return "the authorization metadata must be 'Bearer <token>'"
    if not any(hmac.compare_digest(token.strip().encode(), t.encode()) for t in tokens):
        return "the bearer token is not accepted by this service"
    return ""
