"""Configuration of a denoiser group."""

from __future__ import annotations

import dataclasses
from typing import Literal

from services.config import ConfigError, ModelConfig, ServerConfig
from services.runtime import RuntimeConfig


@dataclasses.dataclass
class EngineConfig:
    """Queueing and step-level scheduling."""

    max_active_requests: int = 1
    """Requests resident on the group at once (each holds latents and state on every rank)."""
    max_queued_requests: int = 64
    """Requests waiting beyond the active ones; more are refused with RESOURCE_EXHAUSTED."""
    policy: Literal["fifo", "round_robin"] = "fifo"
    """Which active request runs the next step: the oldest (lowest latency) or each in turn (fairness)."""
    latent_chunk_bytes: int = 4 * 1024 * 1024
    """Size of each latents chunk streamed back."""

    def validate(self) -> None:
        if self.max_active_requests < 1:
            raise ConfigError(f"engine.max_active_requests must be >= 1, got {self.max_active_requests}")
        if self.max_queued_requests < 0:
            raise ConfigError(f"engine.max_queued_requests must be >= 0, got {self.max_queued_requests}")
        if self.latent_chunk_bytes < 1024:
            raise ConfigError(f"engine.latent_chunk_bytes must be >= 1024, got {self.latent_chunk_bytes}")


@dataclasses.dataclass
class DenoiserServiceConfig:
    """``chitu serve denoiser --config FILE``."""

    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)
    """Listening address (rank 0), message caps, drain time, logging."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """Checkpoint whose transformer and scheduler config are loaded."""
    component: str = "transformer"
    """Which transformer of the checkpoint this group runs (``transformer_2`` for Wan2.2's low-noise expert)."""
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    """Queueing and scheduling."""
    warmup: bool = True
    """Run one small request at start-up (before SERVING) so the first real request pays no lazy initialisation."""
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
    """Attention kernel (or ``auto``), fused projections, regional compilation, CUDA graphs."""
