"""Configuration of the orchestrator: the route table and limits."""

from __future__ import annotations

import dataclasses

from services.config import ClientSecurityConfig, ConfigError, ServerConfig


@dataclasses.dataclass
class RouteConfig:
    """Where one model's stages live. Several models may list the same encoder or VAE endpoints (a shared pool)."""

    model: str = ""
    """Model name clients use."""
    encoder: list[str] = dataclasses.field(default_factory=list)
    """``host:port`` of each text-encoder replica."""
    denoiser: list[str] = dataclasses.field(default_factory=list)
    """``host:port`` of each denoiser group (rank 0)."""
    vae: list[str] = dataclasses.field(default_factory=list)
    """``host:port`` of each VAE replica."""
    denoiser_2: list[str] = dataclasses.field(default_factory=list)
    """``host:port`` of each denoiser group running the checkpoint's second expert (``component: transformer_2``,
    Wan2.2's low-noise transformer); empty for single-transformer models. The ``denoiser`` groups run the first
    expert's steps and the orchestrator hands the latents over at the boundary step."""
    max_inflight: int = 4
    """Generations of this model in the stages at once; more wait in the orchestrator's queue."""

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("routes[].model must be set")
        for stage in ("encoder", "denoiser", "vae"):
            if not getattr(self, stage):
                raise ConfigError(f"route {self.model!r}: {stage} needs at least one endpoint")
        for stage in ("encoder", "denoiser", "vae", "denoiser_2"):
            for ep in getattr(self, stage):
                if ":" not in ep:
                    raise ConfigError(f"route {self.model!r}: {stage} endpoint {ep!r} must be host:port")
        overlap = sorted(set(self.denoiser) & set(self.denoiser_2))
        if overlap:
            raise ConfigError(f"route {self.model!r}: {overlap} listed under both denoiser and denoiser_2; each "
                              "expert runs on its own denoiser group")
        if self.max_inflight < 1:
            raise ConfigError(f"route {self.model!r}: max_inflight must be >= 1")


@dataclasses.dataclass
class OrchestratorConfig:
    """``chitu serve orchestrator --config FILE``."""

    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)
    """Listening address of the public API."""
    routes: list[RouteConfig] = dataclasses.field(default_factory=list)
    """One entry per served model."""
    health_interval_seconds: float = 1.0
    """How often each stage endpoint's health is checked."""
    max_queued_per_model: int = 256
    """Requests waiting per model beyond ``max_inflight``; more are refused with RESOURCE_EXHAUSTED."""
    default_deadline_seconds: float = 3600.0
    """Deadline applied to stage calls when the client sets none."""
    stage_client: ClientSecurityConfig = dataclasses.field(default_factory=ClientSecurityConfig)
    """How the orchestrator connects to its stages: TLS (``ca_file``), a client certificate for stages that require
    mutual TLS, and the bearer token the stages accept."""

    def validate(self) -> None:
        if not self.routes:
            raise ConfigError("routes must list at least one model")
        names = [r.model for r in self.routes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"routes: model(s) {dupes} listed twice")
        if self.health_interval_seconds <= 0:
            raise ConfigError("health_interval_seconds must be > 0")
