"""Stage endpoints as the orchestrator sees them: one channel each, a health monitor, the stage's self-description,
and the mapping of a stage's gRPC errors to statuses that name the stage and its address."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.config import ClientSecurityConfig
from services.errors import Cancelled, DeadlineExceeded, ServiceError, Unavailable, from_code
from services.log import get_logger
from services.proto.chitu.v1 import (
    common_pb2,
    denoiser_pb2,
    denoiser_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    vae_pb2,
    vae_pb2_grpc,
)
from services.security import open_aio_channel
from services.server import channel_options

log = get_logger(__name__)

STAGE_ENUM = {"encoder": common_pb2.STAGE_ENCODE, "denoiser": common_pb2.STAGE_DENOISE, "vae": common_pb2.STAGE_DECODE}
_STUBS = {"encoder": encoder_pb2_grpc.TextEncoderServiceStub, "denoiser": denoiser_pb2_grpc.DenoiserServiceStub,
          "vae": vae_pb2_grpc.VaeServiceStub}
_SERVICE = {"encoder": "chitu.v1.TextEncoderService", "denoiser": "chitu.v1.DenoiserService",
            "vae": "chitu.v1.VaeService"}


@dataclass(eq=False)
class StageEndpoint:
    """One replica of one stage."""

    stage: str
    address: str
    max_message_mb: int
    security: ClientSecurityConfig | None = None
    """TLS / client certificate / token toward this stage (None: plaintext)."""
    channel: grpc.aio.Channel = field(init=False)
    stub: object = field(init=False)
    serving: bool = False
    info: common_pb2.StageModelInfo | None = None
    last_error: str = "not checked yet"

    def __post_init__(self) -> None:
        self.channel = open_aio_channel(self.address, self.security, channel_options(self.max_message_mb))
        self.stub = _STUBS[self.stage](self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def check(self, timeout: float) -> None:
        """Refresh ``serving`` (and ``info`` once serving)."""
        try:
            resp = await self._health.Check(health_pb2.HealthCheckRequest(service=_SERVICE[self.stage]), timeout=timeout)
            serving = resp.status == health_pb2.HealthCheckResponse.SERVING
            self.last_error = "" if serving else "health check says NOT_SERVING"
            if serving:
                self.info = await self._fetch_info(timeout)
        except grpc.aio.AioRpcError as exc:
            serving = False
            self.last_error = f"{exc.code().name}: {exc.details()}"
        if serving != self.serving:
            log.info("stage_health_changed", stage=self.stage, address=self.address, serving=serving,
                     reason=self.last_error)
        self.serving = serving

    async def _fetch_info(self, timeout: float) -> common_pb2.StageModelInfo:
        if self.stage == "encoder":
            return (await self.stub.GetEncoderInfo(encoder_pb2.GetEncoderInfoRequest(), timeout=timeout)).info
        if self.stage == "denoiser":
            return (await self.stub.GetDenoiserInfo(denoiser_pb2.GetDenoiserInfoRequest(), timeout=timeout)).info
        return (await self.stub.GetVaeInfo(vae_pb2.GetVaeInfoRequest(), timeout=timeout)).info

    async def close(self) -> None:
        await self.channel.close()

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Turn this stage's RPC errors into ServiceErrors that name the stage and its address."""
        try:
            yield
        except grpc.aio.AioRpcError as exc:
            raise stage_error(self.stage, self.address, exc) from None


def stage_error(stage: str, address: str, exc: grpc.aio.AioRpcError) -> ServiceError:
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"{stage} stage at {address} is unavailable: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"deadline exceeded in the {stage} stage at {address}")
    if code == grpc.StatusCode.CANCELLED:
        return Cancelled(f"{stage} stage at {address} cancelled the request: {details}")
    return from_code(code, f"{stage} stage: {details}")


class StagePool:
    """The replicas of one stage for one route; picks a serving one round-robin."""

    def __init__(self, endpoints: list[StageEndpoint]):
        self.endpoints = endpoints
        self._rr = itertools.count()

    @property
    def stage(self) -> str:
        return self.endpoints[0].stage

    def serving(self) -> bool:
        return any(ep.serving for ep in self.endpoints)

    def candidates(self) -> list[StageEndpoint]:
        """Serving replicas first (rotated), then the others: a stale health view still gets one real try."""
        n = len(self.endpoints)
        start = next(self._rr) % n
        rotated = self.endpoints[start:] + self.endpoints[:start]
        return [ep for ep in rotated if ep.serving] + [ep for ep in rotated if not ep.serving]

    def info(self) -> common_pb2.StageModelInfo | None:
        for ep in self.endpoints:
            if ep.info is not None:
                return ep.info
        return None


class EndpointRegistry:
    """All distinct stage endpoints (a shared encoder appears once), with one health monitor task."""

    def __init__(self, max_message_mb: int, interval: float, security: ClientSecurityConfig | None = None):
        self._endpoints: dict[tuple[str, str], StageEndpoint] = {}
        self._max_message_mb = max_message_mb
        self._security = security
        self._interval = interval
        self._task: asyncio.Task | None = None

    def get(self, stage: str, address: str) -> StageEndpoint:
        key = (stage, address)
        if key not in self._endpoints:
            self._endpoints[key] = StageEndpoint(stage, address, self._max_message_mb, self._security)
        return self._endpoints[key]

    def all(self) -> list[StageEndpoint]:
        return list(self._endpoints.values())

    async def check_all(self) -> None:
        await asyncio.gather(*(ep.check(timeout=max(self._interval, 1.0)) for ep in self._endpoints.values()))

    async def start(self) -> None:
        await self.check_all()
        self._task = asyncio.create_task(self._monitor(), name="stage-health")

    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check_all()
            except Exception:  # noqa: BLE001 - the monitor must survive anything
                log.exception("health_monitor_error")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.gather(*(ep.close() for ep in self._endpoints.values()))
