"""DenoiserService: proto <-> domain types; everything else happens in the engine."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from denoiser_svc.cache import CachePolicy, policy_from_proto, validate_for_model
from denoiser_svc.cache.policy import CACHE_STRATEGIES_KEY, usable_strategies
from denoiser_svc.config import DenoiserServiceConfig
from denoiser_svc.engine import DenoiserEngine
from denoiser_svc.executor import Executor, make_executor, run_group_process
from denoiser_svc.types import DenoiseJob, LatentsEvent, StepEvent
from services import codec
from services.errors import InvalidArgument
from services.families.base import SamplingParams
from services.log import bind_request, get_logger, setup_logging
from services.proto.chitu.v1 import denoiser_pb2, denoiser_pb2_grpc
from services.registry import load_adapter
from services.server import ServiceHost
from services.stage import check_model, stage_info

log = get_logger(__name__)

SERVICE_NAME = "chitu.v1.DenoiserService"


class DenoiserServicer(denoiser_pb2_grpc.DenoiserServiceServicer):
    def __init__(self, config: DenoiserServiceConfig, executor: Executor):
        self.config = config
        self.adapter = load_adapter(config.model.checkpoint)
        self.executor = executor
        self.engine = DenoiserEngine(config.engine, executor)
        self.max_bytes = config.server.max_tensor_bytes
        self.step_seconds = None
        """The ``chitu_denoiser_step_seconds`` histogram, once ``register_metrics`` ran."""

    def register_metrics(self, metrics) -> None:
        """The denoiser's own Prometheus series on the service's registry (``services.metrics``)."""
        self.step_seconds = metrics.histogram("chitu_denoiser_step_seconds",
                                              "Time of one denoising step (device time on CUDA), rank 0")
        metrics.gauge("chitu_denoiser_steps_compiling_after_warmup",
                      "Steps during which the compiled blocks traced a new graph after the warm-up (a request size "
                      "not in runtime.warmup_sizes pays its compile on its path)",
                      lambda: self._watched("steps_compiling"))
        metrics.gauge("chitu_denoiser_steps_recording_after_warmup",
                      "Steps during which CUDA-graph trees recorded graphs after the warm-up",
                      lambda: self._watched("steps_recording"))

    def _watched(self, count: str) -> float:
        """A count of rank 0's ``CompileWatch`` (0 before the warm-up, or when nothing is compiled)."""
        watch = getattr(getattr(self.executor, "worker", None), "compile_watch", None)
        return float(getattr(watch, count)) if watch is not None else 0.0

    async def load(self) -> None:
        await self.executor.start()
        await self.engine.start()

    def to_job(self, request: denoiser_pb2.DenoiseRequest) -> DenoiseJob:
        check_model(request.model, self.config.model)
        guidance_2 = request.guidance_scale_2 if request.HasField("guidance_scale_2") else None
        params = SamplingParams(width=request.width, height=request.height, steps=request.steps,
                                guidance_scale=request.guidance_scale, seed=request.seed, frames=max(request.frames, 1),
                                guidance_scale_2=guidance_2)
        self.adapter.validate_params(params)
        # the steps this group's transformer runs: all of them, or one expert's share (Wan2.2); end_step 0 = its end
        lo, hi = self.adapter.expert_range(self.config.component, params)
        end = request.end_step or hi
        empty_share = lo == hi == request.start_step == end  # the other expert runs every step: hand back the noise
        if not (lo <= request.start_step < end <= hi or empty_share):
            share = "" if (lo, hi) == (0, params.steps) else (
                f"; this group's transformer ({self.config.component}) runs steps [{lo}, {hi}) of the schedule")
            raise InvalidArgument(f"start_step={request.start_step}, end_step={request.end_step} must satisfy "
                                  f"{lo} <= start_step < end_step <= {hi} (steps={params.steps}{share})")
        conds = codec.named_from_proto(request.conditionings, self.max_bytes, "conditionings")
        if not conds:
            raise InvalidArgument("conditionings must not be empty (encode the prompt first)")
        negs = codec.named_from_proto(request.negative_conditionings, self.max_bytes, "negative_conditionings")
        initial = None
        if request.HasField("initial_latents"):
            initial = codec.from_proto(request.initial_latents, self.max_bytes, "initial_latents")
        scheduler_state = codec.named_from_proto(request.scheduler_state, self.max_bytes, "scheduler_state")
        return DenoiseJob(request_id=request.request_id, params=params, conditionings=conds,
                          negative_conditionings=negs, initial_latents=initial, start_step=request.start_step,
                          end_step=end, scheduler_state=scheduler_state,
                          return_scheduler_state=request.return_scheduler_state, cache=self.cache_policy(request))

    def cache_policy(self, request: denoiser_pb2.DenoiseRequest) -> CachePolicy | None:
        """The request's FlexCache policy, validated against this group's transformer (None: full compute)."""
        if not request.HasField("cache"):
            return None
        policy = policy_from_proto(request.cache)
        validate_for_model(policy, self.adapter.cache_spec(self.config.component), self.adapter.family)
        return policy

    async def Denoise(self, request: denoiser_pb2.DenoiseRequest,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[denoiser_pb2.DenoiseResponse]:
        with bind_request(request.request_id or "-"):
            job = self.to_job(request)
            chunk_bytes = request.latent_chunk_bytes or self.config.engine.latent_chunk_bytes
            async for event in self.engine.submit(job):
                if isinstance(event, StepEvent):
                    if self.step_seconds is not None:
                        self.step_seconds.observe(event.seconds)
                    yield denoiser_pb2.DenoiseResponse(progress=denoiser_pb2.DenoiseProgress(
                        step=event.step, total_steps=event.total_steps, step_seconds=event.seconds))
                elif isinstance(event, LatentsEvent):
                    for chunk in codec.iter_chunks("latents", event.latents, chunk_bytes):
                        yield denoiser_pb2.DenoiseResponse(latents_chunk=chunk)
                    yield denoiser_pb2.DenoiseResponse(summary=denoiser_pb2.DenoiseSummary(
                        step_seconds=event.step_seconds, total_seconds=event.total_seconds,
                        queue_seconds=event.queue_seconds, end_step=event.end_step,
                        scheduler_state=codec.named_to_proto(event.scheduler_state, self.max_bytes),
                        metadata=event.metadata))
            log.info("denoise_done", steps=job.end_step - job.start_step)

    async def GetDenoiserInfo(self, request: denoiser_pb2.GetDenoiserInfoRequest,
                              context: grpc.aio.ServicerContext) -> denoiser_pb2.GetDenoiserInfoResponse:
        metadata = {**self.executor.describe(), **{k: str(v) for k, v in self.engine.counts().items()},
                    "component": self.config.component,
                    CACHE_STRATEGIES_KEY: ",".join(usable_strategies(self.adapter.cache_spec(self.config.component)))}
        info = stage_info(self.config.model, self.adapter, "denoiser", self.executor_dtype, self.executor_device,
                          components=(self.config.component, "scheduler"), metadata=metadata)
        return denoiser_pb2.GetDenoiserInfoResponse(info=info)

    @property
    def executor_device(self):
        return self.executor.describe().get("device", "")

    @property
    def executor_dtype(self):
        return self.executor.describe().get("dtype", "")


async def serve(config: DenoiserServiceConfig, executor: Executor | None = None) -> None:
    setup_logging("denoiser", config.server.log_level, config.server.log_file)
    executor = executor or make_executor(config)
    servicer = DenoiserServicer(config, executor)
    host = ServiceHost("denoiser", config.server, [SERVICE_NAME])
    servicer.register_metrics(host.metrics)
    denoiser_pb2_grpc.add_DenoiserServiceServicer_to_server(servicer, host.server)
    try:
        await host.run(servicer.load, on_drain=executor.on_drain)
    finally:
        await servicer.engine.stop()
        await executor.shutdown()


def main(config: DenoiserServiceConfig) -> None:
    # one process, or one rank of a group (rank 0 serves; other torchrun ranks run the worker loop)
    run_group_process(config, serve)
