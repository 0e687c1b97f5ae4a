"""Domain types passed between the denoiser's layers (no proto below the server)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

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


@dataclass
class StepEvent:
    """A finished step."""

    step: int
    """Steps finished in the whole schedule (1-based)."""
    total_steps: int
    seconds: float


@dataclass
class LatentsEvent:
    """The final latents (on the CPU) and the request's timings."""

    latents: torch.Tensor
    step_seconds: list[float]
    queue_seconds: float
    total_seconds: float
