"""Executors fan the engine's calls out to the group's workers.

``Executor`` is the contract the engine sees; ``UniProcExecutor`` runs one worker in this process on a dedicated
thread (device work never blocks the event loop, and calls reach the worker in the order they were made).
A multi-process executor implements the same contract for groups of several ranks.
"""

from __future__ import annotations

from typing import Protocol

from denoiser_svc.config import DenoiserServiceConfig
from denoiser_svc.types import DenoiseJob, FinishedRequest
from denoiser_svc.worker import StepHandle, Worker
from services.stage import WorkThread


class Executor(Protocol):
    """What the engine may ask of a denoiser group."""

    async def start(self) -> None:
        """Initialise devices, load the model on every rank, compile and warm up."""

    async def add_request(self, job: DenoiseJob) -> None:
        """Make the request resident on every rank (initial latents, schedule, branch inputs)."""

    async def execute_step(self, request_id: str, step: int) -> StepHandle:
        """Launch one step of a resident request on every rank; the handle waits for rank 0's completion."""

    async def wait(self, handle: StepHandle) -> float:
        """Wait for a launched step; returns its wall time."""

    async def finish_request(self, request_id: str) -> FinishedRequest:
        """Drop the request from every rank and return its latents (and scheduler state when the job asked for
        it), on the CPU."""

    async def abort_request(self, request_id: str) -> None:
        """Drop the request from every rank without results."""

    def healthy(self) -> bool:
        """False once any rank has failed."""

    def describe(self) -> dict[str, str]:
        """Facts for the info RPC (layout, backends)."""

    async def shutdown(self) -> None:
        """Stop every rank."""


class UniProcExecutor:
    """A group of one: the worker lives in this process."""

    def __init__(self, config: DenoiserServiceConfig):
        self.config = config
        self.worker = Worker(config)
        self.thread = WorkThread("denoiser")
        self._healthy = False

    async def start(self) -> None:
        await self.thread.run(self.worker.init_device)
        await self.thread.run(self.worker.load_model)
        if self.config.warmup:
            job = await self.thread.run(self.worker.warmup_job)
            await self.thread.run(self.worker.compile_or_warm_up_model, job)
        self._healthy = True

    async def add_request(self, job: DenoiseJob) -> None:
        await self.thread.run(self.worker.add_request, job)

    async def execute_step(self, request_id: str, step: int) -> StepHandle:
        return await self.thread.run(self.worker.execute_step, request_id, step)

    async def wait(self, handle: StepHandle) -> float:
        return await self.thread.run(handle.wait)

    async def finish_request(self, request_id: str) -> FinishedRequest:
        return await self.thread.run(self.worker.finish_request, request_id)

    async def abort_request(self, request_id: str) -> None:
        await self.thread.run(self.worker.abort_request, request_id)

    def healthy(self) -> bool:
        return self._healthy

    def describe(self) -> dict[str, str]:
        return {"world_size": "1", "device": str(self.worker.device), "dtype": str(self.worker.dtype),
                **self.worker.runtime_facts}

    async def shutdown(self) -> None:
        self._healthy = False
        await self.thread.run(self.worker.shutdown)
        self.thread.shutdown()
