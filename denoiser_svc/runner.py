"""ModelRunner: prepares one request and runs one denoising step of it (every CFG branch, the mix, the
scheduler update). Pure computation on this rank; no queueing, no I/O."""

from __future__ import annotations

from typing import Any

import torch

from denoiser_svc.types import DenoiseJob
from services.families.base import DenoiseState, FamilyAdapter


class ModelRunner:
    def __init__(self, adapter: FamilyAdapter, model: Any):
        self.adapter = adapter
        self.model = model

    @torch.inference_mode()
    def prepare(self, job: DenoiseJob) -> DenoiseState:
        return self.adapter.prepare(self.model, job.params, job.conditionings, job.negative_conditionings,
                                    job.initial_latents, job.start_step, job.end_step)

    @torch.inference_mode()
    def step(self, state: DenoiseState, step: int) -> None:
        """Advance ``state.latents`` by schedule step ``step`` (0-based)."""
        preds = {b: self.adapter.forward(self.model, state, state.latents, step, b) for b in state.branches}
        noise = self.adapter.combine(state, preds["cond"], preds["uncond"]) if state.do_cfg else preds["cond"]
        state.latents = self.adapter.scheduler_step(state, noise, step)
