"""The whole stack as local processes: per checkpoint an encoder, a denoiser group per transformer expert and a
VAE, plus one orchestrator.

Each service is its own process (``python -m clients.cli serve <stage> --config FILE``) on an ephemeral loopback
port that it writes to a ready file once SERVING; the orchestrator gets the resulting route table. Checkpoints
whose encoder (resp. VAE) components are identical (same family, configs and weights: ``services.fingerprint``)
share one encoder (resp. VAE) service, which serves the other models' names as aliases. A two-expert checkpoint
(Wan2.2-A14B) gets two denoiser groups, one per transformer (route ``denoiser`` and ``denoiser_2``). Used by
``chitu up``, ``chitu run`` and the end-to-end tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from services.assets import CACHE_DIR
from services.config import ClientSecurityConfig, ConfigError, check_readable
from services.fingerprint import FileHashCache, stage_fingerprint
from services.log import get_logger
from services.registry import load_adapter

log = get_logger(__name__)

STAGES = ("encoder", "denoiser", "vae")


@dataclasses.dataclass
class StackSecurityConfig:
    """One certificate for every service of a local stack (PEM files; its SANs must name the hosts served, e.g.
    127.0.0.1): every port speaks mutual TLS against ``ca_file``, every service requires the token of
    ``token_file`` (but on health and reflection), and the orchestrator presents the same certificate and token to
    its stages. Clients need ``ca_file``, a certificate signed by it and the token. Empty ``cert_file``: plaintext."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    token_file: str = ""

    def validate(self) -> None:
        if any((self.ca_file, self.key_file, self.token_file)) and not (self.cert_file and self.key_file and
                                                                        self.ca_file):
            raise ConfigError("stack security: ca_file, cert_file and key_file are set together (token_file is "
                              "optional with them)")
        for name in ("ca_file", "cert_file", "key_file", "token_file"):
            check_readable(f"stack security: {name}", getattr(self, name))

    def server(self) -> dict[str, Any]:
        """The ``server`` config block of every service."""
        if not self.cert_file:
            return {}
        return {"tls": {"cert_file": self.cert_file, "key_file": self.key_file, "client_ca_file": self.ca_file},
                "auth": {"token_file": self.token_file}}

    def client(self) -> dict[str, Any]:
        """How the orchestrator (or any client of the stack) connects."""
        if not self.cert_file:
            return {}
        return {"ca_file": self.ca_file, "cert_file": self.cert_file, "key_file": self.key_file,
                "token_file": self.token_file}


@dataclasses.dataclass
class StackConfig:
    """What ``chitu up`` starts."""

    checkpoints: dict[str, str] = dataclasses.field(default_factory=dict)
    """Model name -> diffusers checkpoint folder; empty means the embedded default model."""
    listen: str = "127.0.0.1:50051"
    """Address of the orchestrator (the public API)."""
    device: str = "auto"
    """Device of every stage (``cpu``, ``cuda``, ``auto``)."""
    dtype: str = "auto"
    """Weight dtype of every stage."""
    log_level: str = "info"
    """Log level of every service."""
    start_timeout_seconds: float = 300.0
    """How long services may take to become SERVING."""
    stage_overrides: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    """Extra ``key=value`` config overrides per stage kind (``encoder``, ``denoiser``, ``vae``, ``orchestrator``)."""
    share_components: bool = True
    """One encoder (resp. VAE) service for all checkpoints whose encoder (resp. VAE) components are identical."""
    hash_cache: str = str(CACHE_DIR / "file-hashes.json")
    """Where content hashes of checkpoint files are cached between runs (empty: hash every time)."""
    security: StackSecurityConfig = dataclasses.field(default_factory=StackSecurityConfig)
    """TLS, mutual TLS and a bearer token on every channel of the stack (default: plaintext on loopback)."""
    stage_gpus: dict[str, str] = dataclasses.field(default_factory=dict)
    """Which GPUs a service sees (``CUDA_VISIBLE_DEVICES`` of its process), e.g. ``{"denoiser": "0,1,2,3",
    "denoiser:wan22.transformer_2": "4,5,6,7", "encoder": "0"}``. Keys: a stage kind (every service of that kind) or
    ``kind:service-name`` (one service; a model's second expert group is named ``<model>.<component>``), the
    latter winning. Values: comma-separated GPU indices of this machine. A denoiser group's ranks take the GPUs it
    sees in order, so two groups on one host get disjoint lists. Services not named see every GPU."""

    def validate(self) -> None:
        self.security.validate()
        for key, gpus in self.stage_gpus.items():
            kind = key.partition(":")[0]
            if kind not in STAGE_KINDS:
                raise ConfigError(f"stage_gpus key {key!r}: must be a stage kind {list(STAGE_KINDS)} or kind:service-name")
            if not gpus or not all(part.isdigit() for part in gpus.split(",")):
                raise ConfigError(f"stage_gpus[{key!r}] = {gpus!r}: give comma-separated GPU indices, e.g. 0 or 2,3")
        for name, path in self.checkpoints.items():
            if not (Path(path) / "model_index.json").is_file():
                raise ConfigError(f"checkpoint {name}={path} is not a diffusers folder (no model_index.json)")
        if ":" not in self.listen:
            raise ConfigError(f"listen={self.listen!r} must be host:port")


STAGE_KINDS = ("encoder", "denoiser", "vae", "orchestrator")


@dataclasses.dataclass
class PlannedService:
    """One stage service ``chitu up`` will start."""

    kind: str
    """``encoder``, ``denoiser`` or ``vae``."""
    name: str
    """Service name (config, log and ready-file names): the model's name, ``<model>.<component>`` for a second
    expert's denoiser group."""
    checkpoint: str
    served_name: str
    aliases: list[str] = dataclasses.field(default_factory=list)
    component: str = "transformer"
    """The transformer a denoiser group runs."""


def plan_stack(checkpoints: dict[str, str], share: bool = True,
               cache: FileHashCache | None = None) -> tuple[list[PlannedService], dict[str, dict[str, list[str]]]]:
    """The services for ``checkpoints`` (model name -> folder) and each model's route (route key -> service names).

    Encoders and VAEs are shared between checkpoints with identical components (when ``share``); every checkpoint
    has its own denoiser group per expert.
    """
    services: list[PlannedService] = []
    shared: dict[tuple[str, str], PlannedService] = {}
    routes: dict[str, dict[str, list[str]]] = {}
    cache = cache or FileHashCache()
    for name, path in checkpoints.items():
        adapter = load_adapter(path)  # fails early on an unsupported family
        checkpoint = str(Path(path).resolve())
        route: dict[str, list[str]] = {}
        for kind in ("encoder", "vae"):
            key = (kind, stage_fingerprint(adapter, kind, cache) if share else name)
            svc = shared.get(key)
            if svc is None:
                svc = shared[key] = PlannedService(kind, name, checkpoint, name)
                services.append(svc)
            else:
                svc.aliases.append(name)
            route[kind] = [svc.name]
        experts = adapter.expert_components()
        if len(experts) > 2:
            raise ConfigError(f"checkpoint {name}={path} has {len(experts)} experts; at most 2 are supported")
        for i, component in enumerate(experts):
            svc = PlannedService("denoiser", name if i == 0 else f"{name}.{component}", checkpoint, name,
                                 component=component)
            services.append(svc)
            route["denoiser" if i == 0 else "denoiser_2"] = [svc.name]
        routes[name] = route
    return services, routes


@dataclasses.dataclass
class Service:
    kind: str
    name: str
    config_path: Path
    ready_file: Path
    log_path: Path
    process: subprocess.Popen | None = None
    address: str = ""
    gpus: str | None = None
    """``CUDA_VISIBLE_DEVICES`` of its process (None: inherited)."""


class LocalStack:
    """Start, wait for, and stop the services of a local stack."""

    def __init__(self, config: StackConfig, workdir: str | Path | None = None):
        config.validate()
        self.config = config
        self._tmp = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="chitu-stack-")
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.log_dir = self.workdir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.services: list[Service] = []
        self.address = ""
        self.models: list[str] = []

    # -- configs ---------------------------------------------------------------------------------------------------
    def _write(self, kind: str, name: str, data: dict[str, Any]) -> Service:
        cfg_path = self.workdir / "configs" / f"{kind}-{name}.yaml"
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        ready = self.workdir / "ready" / f"{kind}-{name}"
        ready.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            ready.unlink()
        data = {**data, "server": {**data.get("server", {}), "ready_file": str(ready),
                                   "log_level": self.config.log_level}}
        cfg_path.write_text(yaml.safe_dump(data, sort_keys=False))
        return Service(kind, name, cfg_path, ready, self.log_dir / f"{kind}-{name}.log")

    def _launch(self, svc: Service, env: dict[str, str] | None = None) -> None:
        """Start ``svc`` in its own session (``env``: the child's environment, default this process's)."""
        cmd = [sys.executable, "-m", "clients.cli", "serve", svc.kind, "--config", str(svc.config_path)]
        for override in self.config.stage_overrides.get(svc.kind, []):
            cmd += ["--set", override]
        env = os.environ.copy() if env is None else dict(env)
        if svc.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = svc.gpus
        log_file = open(svc.log_path, "ab")  # noqa: SIM115 - handed to the child, closed on stop
        svc.process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                       cwd=str(Path(__file__).resolve().parent.parent), env=env)
        svc._log_file = log_file  # type: ignore[attr-defined]
        self.services.append(svc)

    def _wait_ready(self, services: list[Service]) -> None:
        deadline = time.monotonic() + self.config.start_timeout_seconds
        pending = list(services)
        while pending:
            for svc in list(pending):
                if svc.ready_file.is_file():
                    svc.address = svc.ready_file.read_text().strip()
                    pending.remove(svc)
                elif svc.process is not None and svc.process.poll() is not None:
                    raise RuntimeError(f"{svc.kind} service {svc.name!r} exited with code {svc.process.returncode}; "
                                       f"log {svc.log_path}:\n{_tail(svc.log_path)}")
            if time.monotonic() > deadline:
                names = [f"{s.kind}-{s.name}" for s in pending]
                raise TimeoutError(f"services {names} not SERVING after {self.config.start_timeout_seconds}s; "
                                   f"logs in {self.log_dir}")
            time.sleep(0.05)

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> str:
        """Start every service and return the orchestrator's address once the whole stack is SERVING."""
        checkpoints = self.config.checkpoints
        if not checkpoints:
            from services.assets import default_checkpoint

            path = default_checkpoint()
            checkpoints = {path.name: str(path)}
        try:
            cache = FileHashCache(self.config.hash_cache or None)
            plan, model_routes = plan_stack(checkpoints, self.config.share_components, cache)
            cache.save()
            self._check_gpu_keys(plan)
            stage_services = []
            for planned in plan:
                model = {"name": planned.served_name, "checkpoint": planned.checkpoint, "device": self.config.device,
                         "dtype": self.config.dtype, "aliases": planned.aliases}
                data: dict[str, Any] = {"model": model, "server": self.config.security.server()}
                if planned.kind == "denoiser":
                    data["component"] = planned.component
                svc = self._write(planned.kind, planned.name, data)
                svc.gpus = self._gpus(planned.kind, planned.name)
                self._launch(svc)
                stage_services.append(svc)
            self._wait_ready(stage_services)
            address = {(s.kind, s.name): s.address for s in stage_services}
            host, port = self.config.listen.rsplit(":", 1)
            routes = [{"model": name, **{key: [address[("denoiser" if key == "denoiser_2" else key, n)] for n in names]
                                         for key, names in route.items()}}
                      for name, route in model_routes.items()]
            sec = self.config.security
            orch = self._write("orchestrator", "main", {"server": {"host": host, "port": int(port), **sec.server()},
                                                        "routes": routes, "stage_client": sec.client()})
            orch.gpus = self._gpus("orchestrator", "main")
            self._launch(orch)
            self._wait_ready([orch])
            self.address = orch.address
            self.models = list(checkpoints)
            return self.address
        except BaseException:
            self.stop()
            raise

    def _check_gpu_keys(self, plan: list[PlannedService]) -> None:
        names = {f"{p.kind}:{p.name}" for p in plan} | {"orchestrator:main"}
        unknown = [k for k in self.config.stage_gpus if ":" in k and k not in names]
        if unknown:
            raise ConfigError(f"stage_gpus names no service of this stack: {unknown}; services: {sorted(names)}")

    def _gpus(self, kind: str, name: str) -> str | None:
        return self.config.stage_gpus.get(f"{kind}:{name}", self.config.stage_gpus.get(kind))

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM every service (they drain), then SIGKILL what is left after ``grace`` seconds."""
        for svc in reversed(self.services):
            if svc.process is not None and svc.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(svc.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for svc in self.services:
            if svc.process is None:
                continue
            try:
                svc.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(svc.process.pid, signal.SIGKILL)
                svc.process.wait()
            svc._log_file.close()  # type: ignore[attr-defined]
        self.services.clear()

    def kill(self, svc: Service, sig: int = signal.SIGKILL) -> int:
        """Signal one service and wait for it to exit; returns its exit code."""
        assert svc.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(svc.process.pid, sig)
        return svc.process.wait(timeout=60)

    def restart(self, svc: Service) -> None:
        """Start a stopped service again on the same address (its config is rewritten with the old port)."""
        assert svc.process is not None and svc.process.poll() is not None, "stop the service first"
        svc._log_file.close()  # type: ignore[attr-defined]
        data = yaml.safe_load(svc.config_path.read_text())
        data["server"]["port"] = int(svc.address.rsplit(":", 1)[1])
        svc.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
        with contextlib.suppress(FileNotFoundError):
            svc.ready_file.unlink()
        self.services.remove(svc)
        self._launch(svc)
        self._wait_ready([svc])

    def client_security(self) -> ClientSecurityConfig | None:
        """How a client connects to this stack's orchestrator (None: plaintext)."""
        client = self.config.security.client()
        return ClientSecurityConfig(**client) if client else None

    def service(self, kind: str, name: str | None = None) -> Service:
        for svc in self.services:
            if svc.kind == kind and (name is None or svc.name == name):
                return svc
        raise KeyError(f"no {kind} service {name or ''}")

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
