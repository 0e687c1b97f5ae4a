"""Executors fan the engine's calls out to the group's workers.

``Executor`` is the contract the engine sees; ``UniProcExecutor`` runs one worker in this process on a dedicated
thread (device work never blocks the event loop, and calls reach the worker in the order they were made).
``MultiProcExecutor`` is rank 0 of a group of several processes: its own worker runs like UniProcExecutor's, and
before each call it broadcasts a small control message that ranks 1..N-1 follow (``denoiser_svc.parallel``).
``make_executor`` picks one from the config; ``run_group_process`` is the entry of every process of a group.

Failure of a multi-process group (a rank exits, stops its heartbeat, or a collective fails): every pending and
later call raises UNAVAILABLE at once (never waits on the dead rank), the engine fails its requests, and this
process asks its host to drain (SIGTERM to itself: health NOT_SERVING, kept for ``failure_linger_seconds``), then
exits non-zero so that its supervisor (Kubernetes) restarts the whole group.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from denoiser_svc.config import DenoiserServiceConfig
from denoiser_svc.parallel.control import AddRequest, ControlChannel, Drop, Shutdown, Step
from denoiser_svc.parallel.launch import Heartbeat, Rendezvous, destroy_group, spawn_workers
from denoiser_svc.parallel.sharding import check_layout
from denoiser_svc.types import DenoiseJob, FinishedRequest
from denoiser_svc.worker import StepHandle, Worker
from services.config import dump_yaml
from services.errors import ServiceError, Unavailable
from services.log import get_logger
from services.registry import load_adapter
from services.stage import WorkThread

log = get_logger(__name__)

T = TypeVar("T")


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

    async def on_drain(self) -> None:
        """Called by the host after it reported NOT_SERVING on SIGTERM, before it stops the server."""

    async def shutdown(self) -> None:
        """Stop every rank."""

    left_cleanly: bool
    """False when shutdown could not destroy the process group in time: the process must then exit hard."""


class UniProcExecutor:
    """A group of one: the worker lives in this process."""

    def __init__(self, config: DenoiserServiceConfig):
        self.config = config
        self.worker = Worker(config)
        self.thread = WorkThread("denoiser")
        self._healthy = False
        self.left_cleanly = True  # no process group to destroy

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
                **self.worker.runtime_facts, **self.worker.serving_facts()}

    async def on_drain(self) -> None:
        return None

    async def shutdown(self) -> None:
        self._healthy = False
        await self.thread.run(self.worker.shutdown)
        self.thread.shutdown()


class GroupFailed(RuntimeError):
    """A rank of the group died or stopped answering; the process must exit non-zero."""


class MultiProcExecutor:
    """Rank 0 of a group of ``parallel.world_size`` processes (see module doc)."""

    def __init__(self, config: DenoiserServiceConfig, rendezvous: Rendezvous | None = None):
        self.config = config
        self.rendezvous = rendezvous
        """torchrun's rendezvous, or None: this process launches ranks 1..N-1 itself."""
        self.thread = WorkThread("denoiser")
        self.worker: Worker | None = None
        self.channel: ControlChannel | None = None
        self.procs: list[subprocess.Popen] = []
        self.heartbeat: Heartbeat | None = None
        self._config_dir: tempfile.TemporaryDirectory | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failed = asyncio.Event()
        self._failure = ""
        self._healthy = False
        self.left_cleanly = True
        self._watch_task: asyncio.Task | None = None

    # -- start -------------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # model-dependent layout checks (heads vs ulysses_degree, true CFG for cfg_degree=2) before any rank starts
        check_layout(self.config.parallel, load_adapter(self.config.model.checkpoint), self.config.component)
        rdv = self.rendezvous
        if rdv is None:
            rdv = Rendezvous.host(self.config.parallel)
            self._config_dir = tempfile.TemporaryDirectory(prefix="chitu-denoiser-group-")
            path = Path(self._config_dir.name) / "denoiser.yaml"
            dump_yaml(self.config, path)
            self.procs = spawn_workers(path, rdv)
        self.worker = Worker(self.config, rdv)
        self._watch_task = asyncio.create_task(self._watch_children(), name="denoiser-group-watch")
        await self._call(self.worker.init_device)
        self.channel = ControlChannel(self.worker.groups.control)
        self.heartbeat = Heartbeat(self.config.parallel, rdv, list(range(1, rdv.world_size)), self._rank_died)
        self.heartbeat.start()
        await self._call(self.worker.load_model)
        if self.config.warmup:
            job = await self._call(self.worker.warmup_job)
            await self._call(self.worker.compile_or_warm_up_model, job)
        await self._call(self.channel.barrier)
        self._healthy = True
        log.info("group_ready", layout=self.config.parallel.describe(), world_size=rdv.world_size,
                 worker_pids=[p.pid for p in self.procs])

    # -- the engine's calls --------------------------------------------------------------------------------------------
    async def add_request(self, job: DenoiseJob) -> None:
        worker = self._worker()
        # rank 0 prepares first: a request that cannot be prepared fails here, before any other rank sees it
        await self._call(worker.add_request, job, fatal=False)
        await self._call(self.channel.send, AddRequest(job))

    async def execute_step(self, request_id: str, step: int) -> StepHandle:
        return await self._call(self._step_all, request_id, step)

    def _step_all(self, request_id: str, step: int) -> StepHandle:
        self.channel.send(Step(request_id, step))
        return self._worker().execute_step(request_id, step)

    async def wait(self, handle: StepHandle) -> float:
        return await self._call(handle.wait)

    async def finish_request(self, request_id: str) -> FinishedRequest:
        return await self._call(self._finish_all, request_id)

    def _finish_all(self, request_id: str) -> FinishedRequest:
        out = self._worker().finish_request(request_id)  # every rank holds the same latents: rank 0's are returned
        self.channel.send(Drop(request_id))
        return out

    async def abort_request(self, request_id: str) -> None:
        await self._call(self._abort_all, request_id)

    def _abort_all(self, request_id: str) -> None:
        self._worker().abort_request(request_id)
        self.channel.send(Drop(request_id))

    def healthy(self) -> bool:
        return self._healthy and not self._failed.is_set()

    def describe(self) -> dict[str, str]:
        par = self.config.parallel
        facts = {"world_size": str(par.world_size), "parallel_layout": par.describe(),
                 "worker_pids": ",".join(str(p.pid) for p in self.procs),
                 "launcher": self.rendezvous.launcher if self.rendezvous else "self"}
        if self.worker is not None:
            facts.update({"device": str(self.worker.device), "dtype": str(self.worker.dtype),
                          "parallel_groups": self.worker.groups.describe(), **self.worker.runtime_facts,
                          **self.worker.serving_facts()})
        if self._failure:
            facts["group_failure"] = self._failure
        return facts

    # -- failure -------------------------------------------------------------------------------------------------------
    def _worker(self) -> Worker:
        if self.worker is None or self.channel is None:
            raise Unavailable("the denoiser group has not started")
        return self.worker

    async def _call(self, fn: Callable[..., T], *args: Any, fatal: bool = True) -> T:
        """Run ``fn`` on the work thread, but give up at once (UNAVAILABLE) when the group fails meanwhile. With
        ``fatal``, any error of ``fn`` fails the group: collectives may have been left half done."""
        if self._failed.is_set():
            raise Unavailable(f"the denoiser group failed: {self._failure}")
        call = asyncio.ensure_future(self.thread.run(fn, *args))
        failed = asyncio.ensure_future(self._failed.wait())
        try:
            await asyncio.wait({call, failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            failed.cancel()
        if call.done():
            exc = call.exception()
            if exc is None:
                return call.result()
            if not fatal and isinstance(exc, ServiceError):
                raise exc
            if not fatal and not self._failed.is_set():
                raise exc
            # a collective that fails usually means a peer died: name it when it is one of ours
            error = f"{type(exc).__name__}: {str(exc)[:300]}"
            self._fail(self._dead_child() or f"rank 0 failed in {getattr(fn, '__name__', fn)}: {error}")
        # the call may stay blocked in a collective with a dead peer: it is abandoned with the process
        call.add_done_callback(lambda f: f.cancelled() or f.exception())
        raise Unavailable(f"the denoiser group failed: {self._failure}")

    def _rank_died(self, reason: str) -> None:
        """From the heartbeat thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._fail, reason)

    def _dead_child(self, wait: float = 1.0) -> str:
        """Which launched rank has exited (waiting up to ``wait`` s for its exit to be seen), or ''."""
        deadline = time.monotonic() + wait
        while True:
            for rank, proc in enumerate(self.procs, start=1):
                code = proc.poll()
                if code is not None:
                    return f"rank {rank} (pid {proc.pid}) exited with code {code}"
            if time.monotonic() >= deadline:
                return ""
            time.sleep(0.05)

    async def _watch_children(self) -> None:
        while not self._failed.is_set():
            reason = self._dead_child(wait=0.0)
            if reason:
                self._fail(reason)
                return
            await asyncio.sleep(0.1)

    def _fail(self, reason: str) -> None:
        if self._failed.is_set():
            return
        self._failure = reason
        self._failed.set()
        log.error("denoiser_group_failed", reason=reason, layout=self.config.parallel.describe())
        if self._healthy:
            # serving: ask the host to drain (NOT_SERVING, in-flight requests end UNAVAILABLE); it then calls
            # on_drain (the linger) and shutdown, which raises GroupFailed (exit non-zero). While starting, the
            # failed call raises out of start() instead.
            os.kill(os.getpid(), signal.SIGTERM)

    async def on_drain(self) -> None:
        if self._failed.is_set():
            await asyncio.sleep(self.config.parallel.failure_linger_seconds)

    # -- stop ----------------------------------------------------------------------------------------------------------
    async def shutdown(self) -> None:
        was_healthy, self._healthy = self.healthy(), False
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if was_healthy and self.channel is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._call(self.channel.send, Shutdown()), timeout=30)
        self._stop_children(grace=30.0 if was_healthy else 0.0)
        if self._watch_task is not None:
            self._watch_task.cancel()
        if was_healthy and self.worker is not None:
            self.left_cleanly = False  # until the destroy below returns
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.thread.run(self._destroy),
                                       timeout=self.config.parallel.destroy_timeout_seconds + 30)
        self.thread.shutdown()
        if self._config_dir is not None:
            self._config_dir.cleanup()
        if self._failed.is_set():
            raise GroupFailed(self._failure)

    def _destroy(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
        self.left_cleanly = destroy_group(self.config.parallel.destroy_timeout_seconds)

    def _stop_children(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def make_executor(config: DenoiserServiceConfig, rendezvous: Rendezvous | None = None) -> Executor:
    """The executor the config asks for: one process, or rank 0 of a group of ``parallel.world_size``."""
    if config.parallel.world_size == 1:
        return UniProcExecutor(config)
    return MultiProcExecutor(config, rendezvous)


def run_group_process(config: DenoiserServiceConfig,
                      serve: Callable[[DenoiserServiceConfig, Executor], Awaitable[None]]) -> None:
    """Entry of every process of a denoiser group. Under torchrun (its launcher variables present), ranks other
    than 0 run the worker loop; rank 0 (or the only process) runs ``serve`` with its executor. Exits non-zero when
    the group failed."""
    from denoiser_svc.parallel import worker_main

    rdv = Rendezvous.from_torchrun()
    if rdv is not None and config.parallel.world_size > 1 and rdv.rank != 0:
        raise SystemExit(worker_main.run_worker(config, rdv))
    executor = make_executor(config, rdv)
    try:
        asyncio.run(serve(config, executor))
    except GroupFailed as exc:
        log.error("denoiser_group_exit", reason=str(exc), exit_code=1)
        # a work thread may still be blocked in a collective with the dead rank: leave without joining it
        os._exit(1)
    if not executor.left_cleanly:
        log.warning("denoiser_group_exit_without_destroy", exit_code=0)
        # drained and shut down, but the process group's destroy did not return: the interpreter would wait for it
        os._exit(0)
