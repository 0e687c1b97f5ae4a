"""Domain types passed between the denoiser's layers (no proto below the server)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from denoiser_svc.cache.policy import CachePolicy
from services.families.base import SamplingParams


@dataclass
class DenoiseJob:
    """One validated Denoise request."""

    request_id: str
    params: SamplingParams
    conditionings: dict[str, torch.Tensor]
    negative_conditionings: dict[str, torch.Tensor] = field(default_factory=dict)
    initial_latents: torch.Tensor | None = None
    start_step: int = 0
    end_step: int = 0
    """One past the last step; always resolved (never 0) by the server."""
    scheduler_state: dict[str, torch.Tensor] = field(default_factory=dict)
    """Scheduler history to resume at ``start_step`` (hand-over from another group; empty for a fresh run)."""
    return_scheduler_state: bool = False
    """Export the scheduler's history after ``end_step`` (another group continues the run)."""
    cache: CachePolicy | None = None
    """FlexCache policy (validated against the model); None means full compute."""


@dataclass
class StepEvent:
    """A finished step."""

    step: int
    """Steps finished in the whole schedule (1-based)."""
    total_steps: int
    seconds: float


@dataclass
class FinishedRequest:
    """What a worker hands back for a finished request (on the CPU)."""

    latents: torch.Tensor
    scheduler_state: dict[str, torch.Tensor] = field(default_factory=dict)
    """Filled only when the job asked for it (``return_scheduler_state``)."""
    metadata: dict[str, str] = field(default_factory=dict)
    """Facts for ``DenoiseSummary.metadata`` (FlexCache accounting: ``cache.*``)."""


@dataclass
class LatentsEvent:
    """The final latents (on the CPU) and the request's timings."""

    latents: torch.Tensor
    step_seconds: list[float]
    queue_seconds: float
    total_seconds: float
    end_step: int = 0
    """One past the last step run (where a second expert's group continues)."""
    scheduler_state: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    """``DenoiseSummary.metadata`` (FlexCache accounting: ``cache.*``)."""
