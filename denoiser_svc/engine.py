"""DenoiserEngine: the queue and the step-level scheduling loop of a denoiser group.

Requests wait in a bounded FIFO queue, become resident on the group (at most ``max_active_requests``), and advance
one step at a time; between two steps the engine may switch request (``round_robin``), drop a cancelled one, or
admit a new one. Steps are pipelined: step i+1 is launched before waiting for step i, so the device never idles
on the host, and progress is reported from step completions (a device event), never by reading tensors.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from denoiser_svc.config import EngineConfig
from denoiser_svc.executor import Executor
from denoiser_svc.types import DenoiseJob, LatentsEvent, StepEvent
from denoiser_svc.worker import StepHandle
from services.errors import Cancelled, Internal, ResourceExhausted, ServiceError, Unavailable
from services.log import bind_request, get_logger

log = get_logger(__name__)


@dataclass(eq=False)
class _Request:
    job: DenoiseJob
    enqueued_at: float
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    next_step: int = 0
    started_at: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    resident: bool = False

    def emit(self, event: object) -> None:
        self.events.put_nowait(event)

    def fail(self, exc: BaseException) -> None:
        if not self.done:
            self.done = True
            self.emit(exc)


@dataclass
class _InFlight:
    request: _Request
    step: int
    handle: StepHandle


@dataclass
class EngineStats:
    completed: int = 0
    cancelled: int = 0
    failed: int = 0


class DenoiserEngine:
    def __init__(self, config: EngineConfig, executor: Executor):
        self.config = config
        self.executor = executor
        self._waiting: collections.deque[_Request] = collections.deque()
        self._active: list[_Request] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._rr = 0
        self.stats = EngineStats()

    # -- public ----------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="denoiser-engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for req in [*self._waiting, *self._active]:
            req.fail(Unavailable("denoiser is shutting down"))

    def counts(self) -> dict[str, int]:
        return {"active_requests": len(self._active), "queued_requests": len(self._waiting),
                "completed_requests": self.stats.completed, "cancelled_requests": self.stats.cancelled,
                "failed_requests": self.stats.failed}

    async def submit(self, job: DenoiseJob) -> AsyncIterator[StepEvent | LatentsEvent]:
        """Queue a job and yield its step events, then its latents. Closing the iterator (the RPC was cancelled
        or its deadline passed) makes the engine drop the job before its next step."""
        if not self.executor.healthy():
            raise Unavailable("denoiser group is not healthy")
        if self._task is None or self._task.done():
            raise Unavailable("denoiser engine is not running")
        if len(self._waiting) >= self.config.max_queued_requests and len(self._active) >= self.config.max_active_requests:
            raise ResourceExhausted(f"denoiser queue is full ({len(self._waiting)} waiting, "
                                    f"{len(self._active)} running); retry later")
        req = _Request(job=job, enqueued_at=time.perf_counter(), next_step=job.start_step)
        self._waiting.append(req)
        self._wake.set()
        try:
            while True:
                event = await req.events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, LatentsEvent):
                    return
        finally:
            if not req.done:
                req.cancelled = True
                self._wake.set()

    # -- loop ------------------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        in_flight: _InFlight | None = None
        while True:
            try:
                if not self.executor.healthy():
                    self._fail_all(Unavailable("a rank of the denoiser group failed; the group is restarting"))
                    in_flight = None
                await self._admit()
                await self._drop_cancelled(in_flight)
                if in_flight is not None and in_flight.request.cancelled:
                    in_flight = None
                req = self._pick()
                if req is None:
                    if in_flight is not None:
                        await self._complete(in_flight)
                        in_flight = None
                        continue
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                step = req.next_step
                try:
                    handle = await self.executor.execute_step(req.job.request_id, step)
                except Exception as exc:  # noqa: BLE001 - a failing step fails its request, not the engine
                    await self._fail_request(req, exc)
                    continue
                req.next_step += 1
                # GPU steps run asynchronously: the previous step is awaited only after this one is queued,
                # so the device never waits for the host; CPU steps are already done.
                if in_flight is not None:
                    await self._complete(in_flight)
                    in_flight = None
                current = _InFlight(req, step, handle)
                if handle.done or req.next_step >= req.job.end_step:
                    await self._complete(current)
                else:
                    in_flight = current
                if req.next_step >= req.job.end_step:
                    await self._finish(req)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep serving other requests
                log.exception("engine_loop_error")
                await asyncio.sleep(0.01)

    async def _admit(self) -> None:
        while self._waiting and len(self._active) < self.config.max_active_requests:
            req = self._waiting.popleft()
            if req.cancelled:
                self._count_cancel(req)
                continue
            try:
                with bind_request(req.job.request_id):
                    await self.executor.add_request(req.job)
            except Exception as exc:  # noqa: BLE001
                req.fail(exc if isinstance(exc, ServiceError) else Internal(f"denoiser could not admit: {type(exc).__name__}: {exc}"))
                self.stats.failed += 1
                continue
            req.resident = True
            req.started_at = time.perf_counter()
            self._active.append(req)
            if req.next_step >= req.job.end_step:  # an empty step range: hand back the prepared latents
                await self._finish(req)

    async def _drop_cancelled(self, in_flight: _InFlight | None) -> None:
        for req in [r for r in self._active if r.cancelled]:
            if in_flight is not None and in_flight.request is req:
                await self.executor.wait(in_flight.handle)
            self._active.remove(req)
            await self.executor.abort_request(req.job.request_id)
            self._count_cancel(req)

    def _count_cancel(self, req: _Request) -> None:
        self.stats.cancelled += 1
        req.fail(Cancelled("request cancelled"))
        log.info("request_cancelled", request_id=req.job.request_id, at_step=req.next_step)

    def _pick(self) -> _Request | None:
        if not self._active:
            return None
        if self.config.policy == "round_robin":
            self._rr = (self._rr + 1) % len(self._active)
            return self._active[self._rr]
        return self._active[0]

    async def _complete(self, item: _InFlight) -> None:
        seconds = await self.executor.wait(item.handle)
        req = item.request
        req.step_seconds.append(seconds)
        req.emit(StepEvent(step=item.step + 1, total_steps=req.job.params.steps, seconds=seconds))

    async def _finish(self, req: _Request) -> None:
        self._active.remove(req)
        try:
            out = await self.executor.finish_request(req.job.request_id)
        except Exception as exc:  # noqa: BLE001
            await self._fail_request(req, exc, resident=False)
            return
        now = time.perf_counter()
        req.done = True
        self.stats.completed += 1
        req.emit(LatentsEvent(latents=out.latents, step_seconds=req.step_seconds,
                              queue_seconds=req.started_at - req.enqueued_at, total_seconds=now - req.enqueued_at,
                              end_step=req.job.end_step, scheduler_state=out.scheduler_state,
                              metadata=out.metadata))

    async def _fail_request(self, req: _Request, exc: Exception, resident: bool = True) -> None:
        with bind_request(req.job.request_id):
            log.error("request_failed_in_step", error=f"{type(exc).__name__}: {exc}")
        if req in self._active:
            self._active.remove(req)
        if resident:
            try:
                await self.executor.abort_request(req.job.request_id)
            except Exception:  # noqa: BLE001
                log.exception("abort_failed")
        self.stats.failed += 1
        req.fail(exc if isinstance(exc, ServiceError) else Internal(f"denoiser step failed: {type(exc).__name__}: {exc}"))

    def _fail_all(self, exc: ServiceError) -> None:
        for req in [*self._waiting, *self._active]:
            req.fail(exc)
            self.stats.failed += 1
        self._waiting.clear()
        self._active.clear()
