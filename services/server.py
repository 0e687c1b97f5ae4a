"""gRPC ``aio`` server bootstrap shared by every stage service.

- health service: NOT_SERVING until the model is loaded and warmed, SERVING after, NOT_SERVING again on
  SIGTERM while in-flight requests drain (``server.stop(grace)``);
- reflection on;
- one interceptor that binds the request id (``x-request-id`` metadata, else a fresh one) to every log line
  and turns ``ServiceError`` into a gRPC status with its message (unexpected exceptions become INTERNAL and
  are logged with their traceback);
- message size caps from config; the bound port is written to ``ready_file`` once SERVING;
- TLS / mutual TLS on the port and a bearer-token check on every RPC but health and reflection, when configured
  (``services.security``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.config import ServerConfig
from services.errors import ServiceError
from services.log import get_logger
from services.metrics import ServiceMetrics
from services.security import server_credentials, token_problem

log = get_logger(__name__)

REQUEST_ID_KEY = "x-request-id"


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def channel_options(max_message_mb: int) -> list[tuple[str, Any]]:
    size = max_message_mb * 1024 * 1024
    return [
        ("grpc.max_send_message_length", size),
        ("grpc.max_receive_message_length", size),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # a restarted stage must be found again within a health interval, not after gRPC's 120 s backoff cap
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1_000),
    ]


def server_options(max_message_mb: int) -> list[tuple[str, Any]]:
    size = max_message_mb * 1024 * 1024
    return [
        ("grpc.max_send_message_length", size),
        ("grpc.max_receive_message_length", size),
        ("grpc.so_reuseport", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


class _CallRecord:
    """The metrics of one RPC: in flight from creation, recorded once by ``finish`` (later calls do nothing)."""

    def __init__(self, metrics: ServiceMetrics | None, method: str):
        self.metrics, self.method = metrics, method
        self.started = time.perf_counter()
        self.done = False
        if metrics is not None:
            metrics.in_flight.labels(metrics.service, method).inc()
            if metrics.is_work(method):
                metrics.work_in_flight += 1

    def finish(self, code: grpc.StatusCode) -> None:
        m, method = self.metrics, self.method
        if self.done or m is None:
            return
        self.done = True
        m.requests.labels(m.service, method, code.name).inc()
        m.seconds.labels(m.service, method).observe(time.perf_counter() - self.started)
        m.in_flight.labels(m.service, method).dec()
        if m.is_work(method):
            m.work_in_flight -= 1

    async def abort(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
        """Record the failure, then abort: grpc.aio sends the status from inside ``abort``, so recording after it
        would let a client see the error before the counter moves."""
        self.finish(code)
        await context.abort(code, message)


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext, call: _CallRecord) -> None:
    if isinstance(exc, ServiceError):
        log.info("request_failed", method=call.method, code=exc.code.name, error=exc.message)
        await call.abort(context, exc.code, exc.message)
    log.exception("request_crashed", method=call.method)
    await call.abort(context, grpc.StatusCode.INTERNAL,
                     f"internal error in {call.method}: {type(exc).__name__}: {exc}")


class RequestIdInterceptor(grpc.aio.ServerInterceptor):
    """Binds the request id to the handler's logs, maps errors to statuses and records RPC metrics, for all four
    RPC shapes."""

    def __init__(self, metrics: ServiceMetrics | None = None, tokens: frozenset[str] = frozenset()):
        self.metrics = metrics
        self.tokens = tokens
        """Accepted bearer tokens (empty: none required; health and reflection never need one)."""

    async def intercept_service(self, continuation: Callable[..., Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        metadata = dict(details.invocation_metadata or ())
        request_id = metadata.get(REQUEST_ID_KEY) or new_request_id()
        method = details.method.decode() if isinstance(details.method, bytes) else details.method

        refused = token_problem(method, metadata, self.tokens)

        def bind() -> None:
            # each RPC runs in its own task, so binding without reset cannot leak into other requests
            import structlog

            structlog.contextvars.bind_contextvars(request_id=request_id, method=method)

        if handler.unary_unary or handler.stream_unary:
            inner = handler.unary_unary or handler.stream_unary

            async def unary_out(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
                bind()
                call, code = _CallRecord(self.metrics, method), grpc.StatusCode.OK
                try:
                    if refused:
                        code = grpc.StatusCode.UNAUTHENTICATED
                        await call.abort(context, code, refused)
                    return await inner(request_or_iterator, context)
                except asyncio.CancelledError:
                    code = grpc.StatusCode.CANCELLED
                    raise
                except grpc.aio.AbortError:
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                except Exception as exc:  # noqa: BLE001 - boundary: every error becomes a status
                    code = exc.code if isinstance(exc, ServiceError) else grpc.StatusCode.INTERNAL
                    await _abort_for(exc, context, call)
                finally:
                    call.finish(code)

            factory = (grpc.unary_unary_rpc_method_handler if handler.unary_unary
                       else grpc.stream_unary_rpc_method_handler)
        else:
            inner = handler.unary_stream or handler.stream_stream

            async def unary_out(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[misc]
                bind()
                call, code = _CallRecord(self.metrics, method), grpc.StatusCode.OK
                try:
                    if refused:
                        code = grpc.StatusCode.UNAUTHENTICATED
                        await call.abort(context, code, refused)
                    async for item in inner(request_or_iterator, context):
                        yield item
                except (asyncio.CancelledError, GeneratorExit):
                    code = grpc.StatusCode.CANCELLED
                    raise
                except grpc.aio.AbortError:
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                except Exception as exc:  # noqa: BLE001 - boundary: every error becomes a status
                    code = exc.code if isinstance(exc, ServiceError) else grpc.StatusCode.INTERNAL
                    await _abort_for(exc, context, call)
                finally:
                    call.finish(code)

            factory = (grpc.unary_stream_rpc_method_handler if handler.unary_stream
                       else grpc.stream_stream_rpc_method_handler)
        return factory(unary_out, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)


class ServiceHost:
    """Runs one gRPC service: start NOT_SERVING, load, flip to SERVING, drain on SIGTERM."""

    def __init__(self, name: str, config: ServerConfig, service_names: Sequence[str]):
        self.name = name
        self.config = config
        self.service_names = list(service_names)
        self.metrics = ServiceMetrics(name)
        self.server = grpc.aio.server(interceptors=[RequestIdInterceptor(self.metrics, config.auth.tokens())],
                                      options=server_options(config.max_message_mb))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = 0
        self.metrics_port = -1
        self.health_port = -1
        self.health_server: grpc.aio.Server | None = None
        """Plaintext, health-only server (``server.health_port``): probes reach it where the main port needs TLS."""
        self._stop = asyncio.Event()
        self.serving = False

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.serving = serving
        self.metrics.serving.labels(self.name).set(1 if serving else 0)
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    def request_stop(self) -> None:
        self._stop.set()

    async def start(self) -> None:
        reflection.enable_server_reflection([*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME],
                                            self.server)
        target = f"{self.config.host}:{self.config.port}"
        creds = server_credentials(self.config.tls)
        self.port = (self.server.add_insecure_port(target) if creds is None
                     else self.server.add_secure_port(target, creds))
        if self.port == 0:
            raise RuntimeError(f"{self.name}: could not bind {self.config.host}:{self.config.port}")
        await self.set_serving(False)
        await self.server.start()
        if self.config.health_port >= 0:
            self.health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            self.health_port = self.health_server.add_insecure_port(f"{self.config.host}:{self.config.health_port}")
            if self.health_port == 0:
                raise RuntimeError(f"{self.name}: could not bind the health port {self.config.health_port}")
            await self.health_server.start()
        if self.config.metrics_port >= 0:
            self.metrics_port = self.metrics.start_http(self.config.host, self.config.metrics_port)
        log.info("server_started", address=self.address, serving=False, metrics_port=self.metrics_port,
                 health_port=self.health_port,
                 tls="mutual" if self.config.tls.client_ca_file else ("on" if creds is not None else "off"),
                 token_required=bool(self.config.auth.token_file))

    async def run(self, load: Callable[[], Awaitable[None]],
                  on_drain: Callable[[], Awaitable[None]] | None = None) -> None:
        """Start, run ``load`` (health NOT_SERVING meanwhile), serve until SIGTERM/SIGINT, drain, stop."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        await self.start()
        t0 = time.perf_counter()
        load_task = asyncio.create_task(load())
        stop_task = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait({load_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if load_task in done:
            load_task.result()  # raise a load failure: the process exits non-zero and is restarted
            await self.set_serving(True)
            log.info("serving", address=self.address, load_seconds=round(time.perf_counter() - t0, 3), pid=os.getpid())
            self._write_ready_file()
            await stop_task
        else:
            load_task.cancel()
        log.info("draining", grace_seconds=self.config.grace_seconds)
        await self.set_serving(False)
        if on_drain is not None:
            await on_drain()
        await self.server.stop(self.config.grace_seconds)
        if self.health_server is not None:
            await self.health_server.stop(0)
        self.metrics.stop_http()
        log.info("stopped")

    def _write_ready_file(self) -> None:
        if not self.config.ready_file:
            return
        path = Path(self.config.ready_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(f"{self.config.host}:{self.port}\n")
        tmp.replace(path)
