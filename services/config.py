"""Typed configuration: dataclasses loaded from YAML, with ``--set a.b=value`` overrides from the CLI.

Every stage's configuration is one dataclass tree. Every field has a default and a docstring-style comment;
choices are ``Literal[...]``; cross-field checks live in one ``validate()`` method per class. There is no
global config and no switch read from environment variables.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names the field."""


# ----------------------------------------------------------------------------------------------------------------
# Shared sub-configs
# ----------------------------------------------------------------------------------------------------------------


def check_readable(field: str, path: str) -> None:
    """``path`` (when set) must be a file: the message names ``field``."""
    if path and not Path(path).is_file():
        raise ConfigError(f"{field}={path!r} is not a readable file")


def token_lines(path: str) -> list[str]:
    """The tokens of a token file: its non-blank lines, stripped, without ``#`` comments."""
    lines = (line.strip() for line in Path(path).read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


@dataclasses.dataclass
class TlsConfig:
    """TLS of a listening service (PEM files). No ``cert_file``: plaintext (inside a mesh that terminates TLS, or on
    loopback)."""

    cert_file: str = ""
    """Certificate chain this service presents."""
    key_file: str = ""
    """Private key of ``cert_file``."""
    client_ca_file: str = ""
    """Set: mutual TLS, every client must present a certificate that chains to this CA."""

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)

    def validate(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("server.tls: cert_file and key_file are set together (both PEM files) or not at all")
        if self.client_ca_file and not self.cert_file:
            raise ConfigError("server.tls.client_ca_file (mutual TLS) needs cert_file and key_file")
        for name in ("cert_file", "key_file", "client_ca_file"):
            check_readable(f"server.tls.{name}", getattr(self, name))


@dataclasses.dataclass
class AuthConfig:
    """Bearer tokens a service accepts (``authorization: Bearer <token>`` metadata). Health checks and reflection
    never need one (probes cannot send it)."""

    token_file: str = ""
    """File with one accepted token per line (blank lines and ``#`` comments ignored); read at start, so rotating
    tokens is a rolling restart. Empty: no token required."""

    def validate(self) -> None:
        check_readable("server.auth.token_file", self.token_file)

    def tokens(self) -> frozenset[str]:
        """The accepted tokens (empty: none required)."""
        if not self.token_file:
            return frozenset()
        found = frozenset(token_lines(self.token_file))
        if not found:
            raise ConfigError(f"server.auth.token_file={self.token_file!r} lists no token")
        return found


@dataclasses.dataclass
class ClientSecurityConfig:
    """How a client connects to a service: the orchestrator to its stages (``stage_client``), ``chitu generate``
    and ``ChituClient`` to the orchestrator. No ``ca_file``: plaintext."""

    ca_file: str = ""
    """CA that the server's certificate must chain to; set: TLS."""
    cert_file: str = ""
    """Client certificate, for servers that require mutual TLS."""
    key_file: str = ""
    """Private key of ``cert_file``."""
    server_name: str = ""
    """Name to check in the server's certificate when the address's host is not in it (an IP, a node port)."""
    token_file: str = ""
    """File whose first non-comment line is the bearer token sent on every call; needs TLS (tokens never travel in
    plaintext)."""

    @property
    def tls(self) -> bool:
        return bool(self.ca_file)

    def validate(self, where: str = "client") -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError(f"{where}: cert_file and key_file are set together or not at all")
        if (self.cert_file or self.server_name) and not self.ca_file:
            raise ConfigError(f"{where}: cert_file/server_name need ca_file (TLS)")
        if self.token_file and not self.ca_file:
            raise ConfigError(f"{where}.token_file needs ca_file: a bearer token never travels in plaintext")
        for name in ("ca_file", "cert_file", "key_file", "token_file"):
            check_readable(f"{where}.{name}", getattr(self, name))

    def token(self) -> str:
        if not self.token_file:
            return ""
        tokens = token_lines(self.token_file)
        if not tokens:
            raise ConfigError(f"token_file={self.token_file!r} holds no token")
        return tokens[0]


@dataclasses.dataclass
class ServerConfig:
    """Where and how a service listens."""

    host: str = "127.0.0.1"
    """Interface to bind (``0.0.0.0`` in containers)."""
    port: int = 0
    """TCP port; 0 picks a free port (written to ``ready_file``)."""
    max_message_mb: int = 256
    """Largest gRPC message accepted or sent, in MiB."""
    max_tensor_mb: int = 1024
    """Largest tensor accepted (declared size, checked before any bytes are used), in MiB."""
    grace_seconds: float = 30.0
    """On SIGTERM: how long in-flight requests may take to finish before the server stops."""
    ready_file: str = ""
    """If set, ``host:port`` is written here once the service is SERVING (used by ``chitu up``)."""
    metrics_port: int = -1
    """Port of the Prometheus ``/metrics`` endpoint (same host); -1 disables it, 0 picks a free port."""
    health_port: int = -1
    """A second, plaintext port that serves only the gRPC health service (same status as the main port), for
    Kubernetes' gRPC probes, which cannot speak TLS; -1 disables it, 0 picks a free port."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Lowest log level written (JSON lines on stderr)."""
    log_file: str = ""
    """If set, logs also go to this file."""
    tls: TlsConfig = dataclasses.field(default_factory=TlsConfig)
    """TLS (and mutual TLS) of this service's port."""
    auth: AuthConfig = dataclasses.field(default_factory=AuthConfig)
    """Bearer tokens required on every RPC but health and reflection."""

    @property
    def max_tensor_bytes(self) -> int:
        return self.max_tensor_mb * 1024 * 1024

    def validate(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"server.port must be in [0, 65535], got {self.port}")
        if not -1 <= self.health_port < 65536:
            raise ConfigError(f"server.health_port must be -1 (off) or in [0, 65535], got {self.health_port}")
        if self.health_port > 0 and self.health_port in (self.port, self.metrics_port):
            raise ConfigError(f"server.health_port={self.health_port} is already the service or metrics port")
        if not -1 <= self.metrics_port < 65536:
            raise ConfigError(f"server.metrics_port must be -1 (off) or in [0, 65535], got {self.metrics_port}")
        if self.max_message_mb < 1:
            raise ConfigError(f"server.max_message_mb must be >= 1, got {self.max_message_mb}")
        if self.max_tensor_mb < 1:
            raise ConfigError(f"server.max_tensor_mb must be >= 1, got {self.max_tensor_mb}")
        if self.grace_seconds < 0:
            raise ConfigError(f"server.grace_seconds must be >= 0, got {self.grace_seconds}")


@dataclasses.dataclass
class ModelConfig:
    """Which checkpoint a stage serves, under which name, on which device."""

    name: str = ""
    """Model name clients use; defaults to the checkpoint folder's name."""
    checkpoint: str = ""
    """Path to a diffusers-format checkpoint folder (model_index.json + component folders)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype; ``auto`` is bfloat16 on GPU and float32 on CPU."""
    device: str = "auto"
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available)."""
    aliases: list[str] = dataclasses.field(default_factory=list)
    """Further model names this stage accepts (a shared encoder or VAE pool)."""

    def validate(self) -> None:
        if not self.checkpoint:
            raise ConfigError("model.checkpoint is required (a diffusers-format folder)")
        if not (Path(self.checkpoint) / "model_index.json").is_file():
            raise ConfigError(f"model.checkpoint={self.checkpoint!r} has no model_index.json")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"model.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    @property
    def served_name(self) -> str:
        return self.name or Path(self.checkpoint).resolve().name

    def served_names(self) -> list[str]:
        return [self.served_name, *self.aliases]


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming the field."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where} must be one of {list(allowed)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for arg in args:
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError("; ".join(errors))
    if origin is list:
        (item_tp,) = get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
        return {_coerce(k, key_tp, where): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    if isinstance(value, tp):
        return value
    raise ConfigError(f"{where} must be {_type_name(tp)}, got {value!r}")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys are an error that lists the valid ones."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; valid keys at "
                          f"{where or 'top level'}: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Plain-data form of a config (for run_config.yaml and logs)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a nested mapping."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.path=value")
    key, raw = override.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {override!r} has an empty key")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a mapping")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def validate_tree(obj: Any) -> None:
    """Call ``validate()`` on every dataclass in the tree, children first."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            validate_tree(getattr(obj, f.name))
        check = getattr(obj, "validate", None)
        if callable(check):
            check()
    elif isinstance(obj, list):
        for v in obj:
            validate_tree(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            validate_tree(v)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> T:
    """Load ``cls`` from a YAML file (optional), then ``base`` and CLI overrides, then validate."""
    data: dict[str, Any] = {}
    if path:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data.update(loaded)
    if base:
        for key, value in base.items():
            data.setdefault(key, value)
    for item in overrides or []:
        apply_override(data, item)
    cfg = from_dict(cls, data)
    validate_tree(cfg)
    return cfg


def dump_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
