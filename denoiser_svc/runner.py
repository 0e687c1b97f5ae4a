"""ModelRunner: prepares one request and runs one denoising step of it (every CFG branch, the mix, the
scheduler update). Pure computation on this rank; no queueing, no I/O.

In a group of several ranks the runner computes this rank's part: the CFG branch(es) this rank owns
(``CfgCombiner``), each transformer call sharded over the sequence-parallel group (``SequenceSharder``, whose
hooks split and gather inside the call). Every rank ends the step with the same latents.
"""

from __future__ import annotations

from typing import Any

import torch

from denoiser_svc.cache import FlexCache
from denoiser_svc.parallel.cfg import CfgCombiner
from denoiser_svc.parallel.groups import ParallelGroups
from denoiser_svc.parallel.sharding import SequenceSharder
from denoiser_svc.types import DenoiseJob
from services.families.base import Branch, DenoiseState, FamilyAdapter


class ModelRunner:
    def __init__(self, adapter: FamilyAdapter, model: Any, groups: ParallelGroups | None = None,
                 sharder: SequenceSharder | None = None, cache: FlexCache | None = None):
        self.adapter = adapter
        self.model = model
        self.cache = cache if cache is not None else FlexCache(adapter, model)
        """FlexCache sessions of the requests that asked for one (see ``denoiser_svc.cache``)."""
        self.groups = groups or ParallelGroups.single()
        self.cfg = CfgCombiner(self.groups.get_cfg_group())
        self.sharder = sharder
        """None when the sequence is not sharded (sequence-parallel degree 1)."""

    @torch.inference_mode()
    def prepare(self, job: DenoiseJob) -> DenoiseState:
        state = self.adapter.prepare(self.model, job.params, job.conditionings, job.negative_conditionings,
                                     job.initial_latents, job.start_step, job.end_step)
        if job.scheduler_state:  # resuming another group's run (Wan2.2's second expert)
            self.adapter.import_scheduler_state(state, job.scheduler_state)
        state.request_id = job.request_id
        self.cache.open(job.request_id, job.cache, state)
        return state

    @torch.inference_mode()
    def step(self, state: DenoiseState, step: int) -> None:
        """Advance ``state.latents`` by schedule step ``step`` (0-based)."""
        preds = self.cache.forward(state.request_id, step, self.cfg.local_branches(state),
                                   lambda b: self.forward(state, step, b))
        noise = self.cfg.guided(self.adapter, state, preds)
        state.latents = self.adapter.scheduler_step(state, noise, step)

    def forward(self, state: DenoiseState, step: int, branch: Branch) -> torch.Tensor:
        """One transformer call for one branch (sequence-sharded inside when the group shards)."""
        if self.sharder is None:
            return self.adapter.forward(self.model, state, state.latents, step, branch)
        with self.sharder.scope():
            return self.adapter.forward(self.model, state, state.latents, step, branch)

    def release(self, request_id: str) -> dict[str, str]:
        """Drop the request's FlexCache session (if any); returns its accounting (``cache.*`` metadata)."""
        return self.cache.release(request_id)
