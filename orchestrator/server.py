"""GenerationService: validates a request, runs encode -> denoise -> decode on the model's stage replicas and
streams events to the client. Health is SERVING only while every stage it routes to is SERVING."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from orchestrator.config import OrchestratorConfig, RouteConfig
from orchestrator.stages import STAGE_ENUM, EndpointRegistry, StageEndpoint, StagePool
from services import codec
from services.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from services.families.base import Limits
from services.log import get_logger, setup_logging
from services.proto.chitu.v1 import (
    cache_pb2,
    common_pb2,
    denoiser_pb2,
    encoder_pb2,
    generation_pb2,
    generation_pb2_grpc,
    tensor_pb2,
    vae_pb2,
)
from services.server import REQUEST_ID_KEY, ServiceHost, new_request_id
from services.stage import MAX_PROMPT_CHARS, UNAVAILABLE_FORMAT_PREFIX, limits_from_proto, media_formats

log = get_logger(__name__)

SERVICE_NAME = "chitu.v1.GenerationService"
T = TypeVar("T")


@dataclass
class Route:
    """One model's stage pools and its admission control."""

    config: RouteConfig
    encoder: StagePool
    denoiser: StagePool
    vae: StagePool
    denoiser_2: StagePool | None = None
    """The second expert's denoiser groups (Wan2.2's low-noise transformer_2), when the model has one."""
    slots: asyncio.Semaphore = field(init=False)
    waiting: int = 0

    def __post_init__(self) -> None:
        self.slots = asyncio.Semaphore(self.config.max_inflight)

    @property
    def pools(self) -> tuple[StagePool, ...]:
        pools = (self.encoder, self.denoiser, self.vae)
        return pools if self.denoiser_2 is None else (*pools, self.denoiser_2)

    def serving(self) -> bool:
        return all(p.serving() for p in self.pools)

    def limits(self) -> Limits:
        info = self.denoiser.info()
        if info is None:
            down = ", ".join(f"{ep.address} ({ep.last_error})" for ep in self.denoiser.endpoints)
            raise Unavailable(f"denoiser stage of {self.config.model!r} has not come up yet: {down}")
        lim = limits_from_proto(info.limits)
        enc = self.encoder.info()
        if enc is not None and enc.limits.max_prompt_tokens:
            lim = Limits(**{**lim.__dict__, "max_prompt_tokens": enc.limits.max_prompt_tokens})
        return lim

    def check_cache_policy(self, msg: cache_pb2.CachePolicy) -> None:
        """Range checks and the model's usable strategies, before any stage works on the request (the denoiser
        still checks the policy against its transformer's exact structure)."""
        from denoiser_svc.cache.policy import CACHE_STRATEGIES_KEY, policy_from_proto

        policy = policy_from_proto(msg)
        info = self.denoiser.info()
        if info is None or CACHE_STRATEGIES_KEY not in info.metadata:
            return  # an older denoiser: it validates the policy itself
        allowed = [s for s in info.metadata[CACHE_STRATEGIES_KEY].split(",") if s]
        name = policy.strategy.value
        if name not in allowed:
            raise InvalidArgument(f"cache.{name}: model {self.config.model!r} ({info.family}) cannot use {name}; "
                                  f"allowed for this model: {allowed}")

    def check_formats(self, formats: list[int], limits: Limits) -> None:
        """Output formats the VAE stage cannot produce (MP4 where PyAV is missing) fail before any stage works on
        the request, with the fix; a model's unsupported formats are left to the VAE's own check."""
        wanted = media_formats(formats, limits.supports_video, "output_formats")
        info = self.vae.info()
        if info is None:
            return
        for f in wanted:
            why = info.metadata.get(f"{UNAVAILABLE_FORMAT_PREFIX}{vae_pb2.MediaFormat.Name(f)}")
            if why:
                raise FailedPrecondition(f"output_formats: {vae_pb2.MediaFormat.Name(f)}"
                                         f"{'' if formats else ' (the default for video)'}: {why} (vae stage of "
                                         f"{self.config.model!r}); ask for MEDIA_FORMAT_PNG or MEDIA_FORMAT_RAW_RGB8")

    def family(self) -> str:
        for pool in (self.denoiser, self.encoder, self.vae):
            info = pool.info()
            if info is not None:
                return info.family
        return ""


@dataclass
class Settings:
    """A request's settings after defaults and validation."""

    width: int
    height: int
    frames: int
    steps: int
    guidance_scale: float
    seed: int
    warnings: list[str]
    guidance_scale_2: float | None = None
    """The second expert's guidance (two-expert models); None means guidance_scale."""
    fps: float = 0.0
    """Frame rate of encoded video (0 for images)."""


def resolve_settings(request: generation_pb2.GenerateRequest, lim: Limits) -> Settings:
    """Fill defaults and validate every field before any stage works on the request."""
    prompt = request.prompt
    if not prompt.strip():
        raise InvalidArgument("prompt must not be empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidArgument(f"prompt is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
    if len(request.negative_prompt) > MAX_PROMPT_CHARS:
        raise InvalidArgument(f"negative_prompt is {len(request.negative_prompt)} characters; the limit is "
                              f"{MAX_PROMPT_CHARS}")
    width = request.width if request.HasField("width") else lim.default_width
    height = request.height if request.HasField("height") else lim.default_height
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % lim.size_multiple:
            raise InvalidArgument(f"{name}={value} must be a positive multiple of {lim.size_multiple}")
        if not lim.min_size <= value <= lim.max_size:
            raise InvalidArgument(f"{name}={value} must be in [{lim.min_size}, {lim.max_size}]")
    if lim.supports_video:
        frames = request.frames if request.HasField("frames") else lim.default_frames
        if frames < 1 or (frames - 1) % lim.frame_multiple or frames > lim.max_frames:
            raise InvalidArgument(f"frames={frames} must be k*{lim.frame_multiple}+1 and at most {lim.max_frames}")
    else:
        frames = request.frames if request.HasField("frames") else 1
        if frames != 1:
            raise InvalidArgument(f"frames={frames}: this model generates images; leave frames unset or 1")
    steps = request.steps if request.HasField("steps") else lim.default_steps
    if not 1 <= steps <= 1000:
        raise InvalidArgument(f"steps={steps} must be in [1, 1000] (unset means the default, {lim.default_steps})")
    guidance = request.guidance_scale if request.HasField("guidance_scale") else lim.default_guidance_scale
    if not 0 <= guidance < math.inf:  # also rejects NaN
        raise InvalidArgument(f"guidance_scale={guidance} must be a finite number >= 0")
    seed = request.seed if request.HasField("seed") else random.randrange(2**63)
    if seed < 0:
        raise InvalidArgument(f"seed={seed} must be >= 0")
    warnings = []
    if request.negative_prompt and lim.guidance_kind != "cfg":
        warnings.append(f"negative_prompt is ignored: this model uses {lim.guidance_kind} guidance, not true CFG")
    elif lim.guidance_kind == "cfg" and guidance <= lim.cfg_threshold and request.negative_prompt:
        warnings.append(f"negative_prompt is ignored: classifier-free guidance runs only with guidance_scale > "
                        f"{lim.cfg_threshold:g}")
    elif (lim.guidance_kind == "cfg" and lim.cfg_needs_negative_prompt and not request.negative_prompt
          and guidance > lim.cfg_threshold):
        warnings.append(f"guidance_scale={guidance:g} has no effect without a negative_prompt: this model runs "
                        f"classifier-free guidance only when one is given")
    if lim.guidance_kind == "none" and request.HasField("guidance_scale"):
        warnings.append("guidance_scale is ignored by this model")
    guidance_2 = None
    if request.HasField("guidance_scale_2"):
        guidance_2 = request.guidance_scale_2
        if lim.experts < 2:
            raise InvalidArgument("guidance_scale_2 applies only to two-expert models (Wan2.2-A14B); leave it unset")
        if not 0 <= guidance_2 < math.inf:
            raise InvalidArgument(f"guidance_scale_2={guidance_2} must be a finite number >= 0")
    fps = 0.0
    if lim.supports_video:
        fps = request.fps if request.HasField("fps") else (lim.default_fps or 16.0)
        if not 0 < fps <= 240:
            raise InvalidArgument(f"fps={fps} must be in (0, 240]")
    elif request.HasField("fps"):
        raise InvalidArgument(f"fps={request.fps}: this model generates images; leave fps unset")
    return Settings(width, height, frames, steps, float(guidance), seed, warnings, guidance_scale_2=guidance_2,
                    fps=float(fps))


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, config: OrchestratorConfig, host: ServiceHost):
        self.config = config
        self.host = host
        self.endpoints = EndpointRegistry(config.server.max_message_mb, config.health_interval_seconds,
                                          config.stage_client)
        self.routes: dict[str, Route] = {}
        for rc in config.routes:
            pools = [StagePool([self.endpoints.get(stage, a) for a in getattr(rc, stage)])
                     for stage in ("encoder", "denoiser", "vae")]
            second = StagePool([self.endpoints.get("denoiser", a) for a in rc.denoiser_2]) if rc.denoiser_2 else None
            self.routes[rc.model] = Route(rc, *pools, denoiser_2=second)
        self._health_task: asyncio.Task | None = None
        self._started = False

    # -- lifecycle -------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Begin monitoring the stages; the orchestrator is SERVING while every routed stage is."""
        await self.endpoints.start()
        self._health_task = asyncio.create_task(self._follow_health(), name="orchestrator-health")

    def mark_started(self) -> None:
        self._started = True

    def all_serving(self) -> bool:
        return all(ep.serving for ep in self.endpoints.all())

    async def _follow_health(self) -> None:
        """Mirror the stages' health: SERVING only while every routed stage is (after start-up finished)."""
        while True:
            await asyncio.sleep(self.config.health_interval_seconds / 2)
            if not self._started:
                continue
            serving = self.all_serving()
            if serving != self.host.serving:
                await self.host.set_serving(serving)
                log.info("orchestrator_health", serving=serving)

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        await self.endpoints.close()

    # -- RPCs ------------------------------------------------------------------------------------------------------
    def route(self, model: str) -> Route:
        if model not in self.routes:
            raise NotFound(f"model {model!r} is not served; served models: {sorted(self.routes)}")
        return self.routes[model]

    async def ListModels(self, request: generation_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> generation_pb2.ListModelsResponse:
        await self.endpoints.check_all()  # fresh health and info (memory, queue counters)
        models = []
        for name in sorted(self.routes):
            route = self.routes[name]
            entry = generation_pb2.ModelEntry(name=name, family=route.family(), serving=route.serving())
            with contextlib.suppress(ServiceError):
                entry.limits.CopyFrom(_limits_proto(route.limits()))
            for pool in route.pools:
                for ep in pool.endpoints:
                    se = generation_pb2.StageEndpoint(stage=STAGE_ENUM[ep.stage], address=ep.address,
                                                      serving=ep.serving)
                    if ep.info is not None:
                        se.info.CopyFrom(ep.info)
                    entry.endpoints.append(se)
            models.append(entry)
        return generation_pb2.ListModelsResponse(models=models)

    async def Generate(self, request: generation_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[generation_pb2.GenerateResponse]:
        request_id = request.request_id or dict(context.invocation_metadata() or ()).get(REQUEST_ID_KEY) or new_request_id()
        import structlog

        structlog.contextvars.bind_contextvars(request_id=request_id, model=request.model)
        t0 = time.perf_counter()

        def event(**kwargs: object) -> generation_pb2.GenerateResponse:
            return generation_pb2.GenerateResponse(request_id=request_id, elapsed_seconds=time.perf_counter() - t0,
                                                   **kwargs)

        route = self.route(request.model)
        limits = route.limits()
        settings = resolve_settings(request, limits)
        route.check_formats(list(request.output_formats), limits)
        if request.HasField("cache"):
            route.check_cache_policy(request.cache)
        remaining = context.time_remaining()
        deadline = time.monotonic() + (remaining if remaining is not None else self.config.default_deadline_seconds)

        def timeout() -> float:
            return max(deadline - time.monotonic(), 0.001)

        if route.waiting >= self.config.max_queued_per_model:
            raise ResourceExhausted(f"model {request.model!r} has {route.waiting} requests queued; retry later")
        yield event(queued=generation_pb2.Queued(position=route.waiting))
        route.waiting += 1
        try:
            await route.slots.acquire()
        finally:
            route.waiting -= 1
        try:
            queue_seconds = time.perf_counter() - t0
            log.info("generation_started", width=settings.width, height=settings.height, steps=settings.steps,
                     seed=settings.seed)
            metadata = [(REQUEST_ID_KEY, request_id)]
            timings: list[common_pb2.StageTiming] = []
            stage_md: dict[str, str] = {}

            # -- encode --------------------------------------------------------------------------------------------
            lim = route.limits()
            enc_req = encoder_pb2.EncodeRequest(
                request_id=request_id, model=request.model, prompt=request.prompt,
                negative_prompt=request.negative_prompt,
                encode_negative=lim.cfg_active(settings.guidance_scale, request.negative_prompt))
            ts = time.perf_counter()
            ep, enc = None, None
            async for ep, res in self._call_idempotent(route.encoder, lambda e: e.stub.Encode(
                    enc_req, timeout=timeout(), metadata=metadata)):
                if res is None:
                    yield event(stage_started=generation_pb2.StageStarted(stage=common_pb2.STAGE_ENCODE,
                                                                          endpoint=ep.address))
                enc = res
            assert ep is not None and enc is not None
            timings.append(self._finish_stage(timings, "encoder", ep, ts))
            yield event(stage_finished=generation_pb2.StageFinished(stage=common_pb2.STAGE_ENCODE,
                                                                    seconds=timings[-1].seconds))
            warnings = [*settings.warnings, *enc.warnings]

            # -- denoise -------------------------------------------------------------------------------------------
            den_req = denoiser_pb2.DenoiseRequest(
                request_id=request_id, model=request.model, conditionings=enc.conditionings,
                negative_conditionings=enc.negative_conditionings, width=settings.width, height=settings.height,
                frames=settings.frames, steps=settings.steps, guidance_scale=settings.guidance_scale,
                seed=settings.seed)
            if settings.guidance_scale_2 is not None:
                den_req.guidance_scale_2 = settings.guidance_scale_2
            den_req.return_scheduler_state = route.denoiser_2 is not None
            if request.HasField("cache"):  # FlexCache: validated by the denoiser against its model
                den_req.cache.CopyFrom(request.cache)
            chunks: list[tensor_pb2.TensorChunk] = []
            step_seconds: list[float] = []
            # One denoiser group runs the schedule, or two experts run it in turn (Wan2.2): the first group runs
            # its share and reports where it stopped (summary.end_step); the orchestrator hands the latents and
            # the scheduler's history to the second expert's group, which runs the rest.
            pool: StagePool | None = route.denoiser
            while pool is not None:
                ts = time.perf_counter()
                den_ep = await self._pick(pool)
                yield event(stage_started=generation_pb2.StageStarted(stage=common_pb2.STAGE_DENOISE,
                                                                      endpoint=den_ep.address))
                chunks, summary = [], None
                call = den_ep.stub.Denoise(den_req, timeout=timeout(), metadata=metadata)
                try:
                    with den_ep.errors():
                        async for resp in call:
                            kind = resp.WhichOneof("event")
                            if kind == "progress":
                                p = resp.progress
                                step_seconds.append(p.step_seconds)
                                yield event(step=generation_pb2.StepProgress(step=p.step, total_steps=p.total_steps,
                                                                             step_seconds=p.step_seconds))
                            elif kind == "latents_chunk":
                                chunks.append(resp.latents_chunk)
                            elif kind == "summary":
                                summary = resp.summary
                                stage_md.update(resp.summary.metadata)
                finally:
                    call.cancel()
                if not chunks or summary is None:
                    raise Unavailable(f"denoiser stage at {den_ep.address} ended the stream without latents or "
                                      "summary")
                timings.append(self._finish_stage(timings, "denoiser", den_ep, ts))
                yield event(stage_finished=generation_pb2.StageFinished(stage=common_pb2.STAGE_DENOISE,
                                                                        seconds=timings[-1].seconds))
                end = summary.end_step  # 0 when the first expert's share is empty (the second runs every step)
                pool = None
                if end < settings.steps:
                    if route.denoiser_2 is None or den_req.start_step > 0:
                        raise FailedPrecondition(
                            f"model {request.model!r}: the denoiser at {den_ep.address} ran steps [0, {end}) of "
                            f"{settings.steps}; the rest needs the second expert's denoiser group (route denoiser_2)")
                    den_req = self._hand_over(den_req, chunks, summary, end)
                    pool = route.denoiser_2

            # -- decode --------------------------------------------------------------------------------------------
            header = vae_pb2.DecodeHeader(request_id=request_id, model=request.model, width=settings.width,
                                          height=settings.height, frames=settings.frames,
                                          formats=list(request.output_formats), fps=settings.fps)

            def decode_messages() -> AsyncIterator[vae_pb2.DecodeRequest]:
                async def gen() -> AsyncIterator[vae_pb2.DecodeRequest]:
                    yield vae_pb2.DecodeRequest(header=header)
                    for c in chunks:
                        yield vae_pb2.DecodeRequest(latents_chunk=c)
                return gen()

            ts = time.perf_counter()
            ep, dec = None, None
            async for ep, res in self._call_idempotent(route.vae, lambda e: e.stub.Decode(
                    decode_messages(), timeout=timeout(), metadata=metadata)):
                if res is None:
                    yield event(stage_started=generation_pb2.StageStarted(stage=common_pb2.STAGE_DECODE,
                                                                          endpoint=ep.address))
                dec = res
            assert ep is not None and dec is not None
            timings.append(self._finish_stage(timings, "vae", ep, ts))
            yield event(stage_finished=generation_pb2.StageFinished(stage=common_pb2.STAGE_DECODE,
                                                                    seconds=timings[-1].seconds))
            total = time.perf_counter() - t0
            result = generation_pb2.GenerationResult(
                artifacts=dec.artifacts, seed=settings.seed, warnings=warnings, width=settings.width,
                height=settings.height, frames=settings.frames, steps=settings.steps,
                guidance_scale=settings.guidance_scale, metadata=stage_md, fps=settings.fps,
                timings=generation_pb2.Timings(stages=timings, step_seconds=step_seconds, total_seconds=total,
                                               queue_seconds=queue_seconds))
            if route.denoiser_2 is not None:
                result.guidance_scale_2 = (settings.guidance_scale if settings.guidance_scale_2 is None
                                           else settings.guidance_scale_2)
            log.info("generation_done", total_seconds=round(total, 4))
            yield event(result=result)
        finally:
            route.slots.release()

    # -- helpers ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _finish_stage(timings: list, stage: str, ep: StageEndpoint, started: float) -> common_pb2.StageTiming:
        return common_pb2.StageTiming(stage=STAGE_ENUM[stage], seconds=time.perf_counter() - started,
                                      endpoint=ep.address)

    def _hand_over(self, first: denoiser_pb2.DenoiseRequest, chunks: list[tensor_pb2.TensorChunk],
                   summary: denoiser_pb2.DenoiseSummary, start_step: int) -> denoiser_pb2.DenoiseRequest:
        """The second expert's request: the first group's latents (reassembled into one tensor) and scheduler
        state, continuing at ``start_step`` to the end of the schedule."""
        assembler = codec.ChunkAssembler(self.config.server.max_tensor_bytes, "latents")
        for chunk in chunks:
            assembler.add(chunk)
        second = denoiser_pb2.DenoiseRequest()
        second.CopyFrom(first)
        second.start_step, second.end_step, second.return_scheduler_state = start_step, 0, False
        second.initial_latents.CopyFrom(codec.to_proto(assembler.tensor(), self.config.server.max_tensor_bytes,
                                                       "initial_latents"))
        del second.scheduler_state[:]
        second.scheduler_state.extend(summary.scheduler_state)
        return second

    @staticmethod
    async def _pick(pool: StagePool) -> StageEndpoint:
        return pool.candidates()[0]

    @staticmethod
    async def _call_idempotent(pool: StagePool, call: Callable[[StageEndpoint], Awaitable[T]]
                               ) -> AsyncIterator[tuple[StageEndpoint, T | None]]:
        """Call an idempotent stage; on UNAVAILABLE retry on the next replica. Yields (endpoint, None) when a
        replica is tried and finally (endpoint, result)."""
        last: ServiceError | None = None
        for ep in pool.candidates():
            yield ep, None
            try:
                with ep.errors():
                    result = await call(ep)
            except Unavailable as exc:
                last = exc
                log.warning("stage_retry", stage=ep.stage, address=ep.address, error=exc.message)
                continue
            yield ep, result
            return
        assert last is not None
        raise last


def _limits_proto(lim: Limits) -> common_pb2.ModelLimits:
    from services.stage import limits_to_proto

    return limits_to_proto(lim)


async def serve(config: OrchestratorConfig) -> None:
    setup_logging("orchestrator", config.server.log_level, config.server.log_file)
    host = ServiceHost("orchestrator", config.server, [SERVICE_NAME])
    servicer = GenerationServicer(config, host)
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(servicer, host.server)

    async def load() -> None:
        await servicer.start()
        # the host flips to SERVING when load() returns: wait until every stage is up
        while not servicer.all_serving():
            await asyncio.sleep(config.health_interval_seconds / 2)
        servicer.mark_started()

    try:
        await host.run(load)
    finally:
        await servicer.close()


def main(config: OrchestratorConfig) -> None:
    asyncio.run(serve(config))
