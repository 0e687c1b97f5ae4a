"""VaeService: latents (streamed in chunks) -> the adapter's ``decode`` -> encoded media."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import torch

from services import codec
from services.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.families.base import SamplingParams, resolve_device, resolve_dtype
from services.log import bind_request, get_logger, setup_logging
from services.media import encode_png
from services.proto.chitu.v1 import vae_pb2, vae_pb2_grpc
from services.registry import load_adapter
from services.server import ServiceHost
from services.stage import UNAVAILABLE_FORMAT_PREFIX, WorkThread, check_model, media_formats, stage_info
from vae_svc.config import VaeServiceConfig
from vae_svc.tiling import can_tile, limit_process_memory, spatial_factor, tile_sizes, tiling
from vae_svc.video import MISSING_PYAV, encode_mp4, mp4_available

log = get_logger(__name__)

SERVICE_NAME = "chitu.v1.VaeService"


class VaeServicer(vae_pb2_grpc.VaeServiceServicer):
    def __init__(self, config: VaeServiceConfig):
        self.config = config
        self.adapter = load_adapter(config.model.checkpoint)
        self.device = resolve_device(config.model.device)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        self.thread = WorkThread("vae")
        self.model = None
        self.max_bytes = config.server.max_tensor_bytes
        self.warmup_seconds: float | None = None
        """How long the start-up decode took (None: ``warmup`` off, or not loaded yet)."""
        self.tile_for_size: dict[tuple[int, int, int], int | None] = {}
        """Output size (width, height, frames) -> the tile size that fitted the budget (None: untiled)."""
        self.unavailable: dict[int, str] = {}
        """Formats of this family that this process cannot produce, with the fix (MP4 without PyAV)."""
        if self.adapter.limits().supports_video and not mp4_available():
            self.unavailable[vae_pb2.MEDIA_FORMAT_MP4] = MISSING_PYAV
            log.warning("mp4_unavailable", reason=MISSING_PYAV)

    @property
    def vae(self) -> torch.nn.Module:
        return getattr(self.model, "vae", self.model)

    async def load(self) -> None:
        self.model = await self.thread.run(self.adapter.load_vae, self.dtype, self.device)
        fraction = limit_process_memory(self.device, self.config.memory_budget_mb)
        if self.config.memory_budget_mb and fraction is None:
            log.warning("memory_budget_ignored", reason="memory_budget_mb is enforced on CUDA only")
        if self.config.slicing and hasattr(self.vae, "use_slicing"):
            self.vae.enable_slicing()
        if self.config.warmup:
            self.warmup_seconds = await self.thread.run(self._warm_up)
        log.info("vae_loaded", family=self.adapter.family, device=str(self.device), dtype=str(self.dtype),
                 memory_fraction=fraction, tiling=self.config.tiling.mode, can_tile=can_tile(self.vae),
                 warmup_seconds=self.warmup_seconds)

    def _warm_up(self) -> float:
        """One decode of random latents at the model's default size (and frames), within the memory budget as a
        request's; returns its seconds."""
        lim = self.adapter.limits()
        params = SamplingParams(width=lim.default_width, height=lim.default_height, steps=1, guidance_scale=0.0,
                                seed=0, frames=lim.default_frames)
        latents = torch.randn(self.adapter.latent_shape(params), generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        self._decode(latents, params)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    async def _read(self, requests: AsyncIterator[vae_pb2.DecodeRequest]) -> tuple[vae_pb2.DecodeHeader, torch.Tensor]:
        header = None
        assembler = codec.ChunkAssembler(self.max_bytes, "latents")
        async for msg in requests:
            part = msg.WhichOneof("part")
            if part == "header":
                if header is not None:
                    raise InvalidArgument("Decode stream: header sent twice")
                header = msg.header
            elif part == "latents_chunk":
                if header is None:
                    raise InvalidArgument("Decode stream: the header must come before latents chunks")
                assembler.add(msg.latents_chunk)
            else:
                raise InvalidArgument("Decode stream: empty message")
        if header is None:
            raise InvalidArgument("Decode stream: no header")
        if not assembler.started:
            raise InvalidArgument("Decode stream: no latents")
        return header, assembler.tensor()

    # -- decode ------------------------------------------------------------------------------------------------------
    def _decode_once(self, latents: torch.Tensor, params: SamplingParams, tile: int | None) -> torch.Tensor:
        with tiling(self.vae, tile, self.config.tiling.overlap):
            return self.adapter.decode(self.model, latents, params)

    def _decode(self, latents: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, bool]:
        """Decode within the memory budget: untiled when it fits, else in tiles (see ``TilingConfig``)."""
        cfg = self.config.tiling
        tiles = can_tile(self.vae)
        if cfg.mode == "never" or not tiles:
            return self._decode_once(latents, params, None), False
        sizes = tile_sizes(cfg.tile_size, cfg.min_tile_size, spatial_factor(self.vae))
        if cfg.mode == "always":
            return self._decode_once(latents, params, sizes[0]), True
        key = (params.width, params.height, params.frames)
        attempts: list[int | None] = [None, *sizes]
        if key in self.tile_for_size:  # start from what fitted last time for this size
            attempts = attempts[attempts.index(self.tile_for_size[key]):]
        for tile in attempts:
            try:
                frames = self._decode_once(latents, params, tile)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                log.warning("decode_out_of_memory", tile=tile, budget_mb=self.config.memory_budget_mb)
                continue
            self.tile_for_size[key] = tile
            return frames, tile is not None
        raise ResourceExhausted(f"decoding {params.width}x{params.height}x{params.frames} does not fit the VAE "
                                f"service's memory even in {attempts[-1]}px tiles; raise memory_budget_mb "
                                f"({self.config.memory_budget_mb} MiB) or lower tiling.min_tile_size")

    def _check(self, header: vae_pb2.DecodeHeader) -> tuple[SamplingParams, list[int], float]:
        check_model(header.model, self.config.model)
        lim = self.adapter.limits()
        if header.frames < 0:
            raise InvalidArgument(f"frames={header.frames} must be >= 0 (0: one image, or the model's frames rule)")
        params = SamplingParams(width=header.width, height=header.height, steps=1, guidance_scale=0.0, seed=0,
                                frames=max(header.frames, 1))
        for name, value in (("width", params.width), ("height", params.height)):
            if value <= 0 or value % lim.size_multiple or value > lim.max_size:
                raise InvalidArgument(f"{name}={value} must be a positive multiple of {lim.size_multiple}, at most "
                                      f"{lim.max_size}")
        if lim.supports_video:
            if (params.frames - 1) % lim.frame_multiple or params.frames > lim.max_frames:
                raise InvalidArgument(f"frames={params.frames} must be k*{lim.frame_multiple}+1 and at most "
                                      f"{lim.max_frames}")
            allowed = (vae_pb2.MEDIA_FORMAT_MP4, vae_pb2.MEDIA_FORMAT_PNG, vae_pb2.MEDIA_FORMAT_RAW_RGB8)
        else:
            if params.frames != 1:
                raise InvalidArgument(f"frames={params.frames}: {self.adapter.family} decodes images; use 0 or 1")
            allowed = (vae_pb2.MEDIA_FORMAT_PNG, vae_pb2.MEDIA_FORMAT_RAW_RGB8)
        formats = media_formats(list(header.formats), lim.supports_video, "formats")
        for f in formats:
            if f not in allowed:
                raise InvalidArgument(f"formats: {vae_pb2.MediaFormat.Name(f)} is not supported for "
                                      f"{self.adapter.family}; use one of "
                                      f"{[vae_pb2.MediaFormat.Name(a) for a in allowed]}")
            if f in self.unavailable:
                usable = [vae_pb2.MediaFormat.Name(a) for a in allowed if a not in self.unavailable]
                raise FailedPrecondition(f"formats: {vae_pb2.MediaFormat.Name(f)}"
                                         f"{' (the default for video)' if not header.formats else ''}: "
                                         f"{self.unavailable[f]}; or ask for one of {usable}")
        fps = 0.0
        if lim.supports_video:
            fps = header.fps or lim.default_fps or 16.0
            if not 0 < fps <= 240:
                raise InvalidArgument(f"fps={fps} must be in (0, 240]")
        return params, formats, fps

    async def Decode(self, request_iterator: AsyncIterator[vae_pb2.DecodeRequest],
                     context: grpc.aio.ServicerContext) -> vae_pb2.DecodeResponse:
        header, latents = await self._read(request_iterator)
        with bind_request(header.request_id or "-"):
            params, formats, fps = self._check(header)
            t0 = time.perf_counter()
            frames, tiled = await self.thread.run(self._decode, latents, params)
            t1 = time.perf_counter()
            video = self.adapter.limits().supports_video
            artifacts = await self.thread.run(self._encode, frames, formats, fps if video else 0.0)
            t2 = time.perf_counter()
            log.info("decoded", frames=int(frames.shape[0]), decode_seconds=round(t1 - t0, 4), tiled=tiled)
            return vae_pb2.DecodeResponse(artifacts=artifacts, decode_seconds=t1 - t0, encode_seconds=t2 - t1,
                                          tiled=tiled)

    def _encode(self, frames: torch.Tensor, formats: list[int], fps: float) -> list[vae_pb2.Artifact]:
        """Images: one artifact per frame and format. Video (fps > 0): one MP4, one raw buffer of all frames, and
        one PNG per frame (``frame_index``)."""
        out = []
        n, h, w, _ = frames.shape
        for fmt in formats:
            if fmt == vae_pb2.MEDIA_FORMAT_MP4:
                data = encode_mp4(frames, fps, self.config.mp4_crf, self.config.mp4_pixel_format)
                out.append(vae_pb2.Artifact(name="video.mp4", format=fmt, mime_type="video/mp4", data=data,
                                            width=w, height=h, frames=n, fps=fps))
            elif fmt == vae_pb2.MEDIA_FORMAT_RAW_RGB8 and fps:
                out.append(vae_pb2.Artifact(name="video.rgb", format=fmt, mime_type="application/octet-stream",
                                            data=frames.contiguous().numpy().tobytes(), width=w, height=h, frames=n,
                                            fps=fps))
            else:
                for i in range(n):
                    if fmt == vae_pb2.MEDIA_FORMAT_PNG:
                        data, mime, ext = encode_png(frames[i], self.config.png_compress_level), "image/png", "png"
                    else:
                        data, mime, ext = frames[i].contiguous().numpy().tobytes(), "application/octet-stream", "rgb"
                    name = f"frame_{i:04d}.{ext}" if fps else f"image_{i}.{ext}"
                    out.append(vae_pb2.Artifact(name=name, format=fmt, mime_type=mime, data=data, width=w, height=h,
                                                frames=1, fps=fps, frame_index=i))
        return out

    async def GetVaeInfo(self, request: vae_pb2.GetVaeInfoRequest,
                         context: grpc.aio.ServicerContext) -> vae_pb2.GetVaeInfoResponse:
        metadata = {"tiling": self.config.tiling.mode, "memory_budget_mb": str(self.config.memory_budget_mb)}
        if self.warmup_seconds is not None:
            metadata["warmup_seconds"] = f"{self.warmup_seconds:.2f}"
        metadata.update({f"{UNAVAILABLE_FORMAT_PREFIX}{vae_pb2.MediaFormat.Name(f)}": why
                         for f, why in self.unavailable.items()})
        return vae_pb2.GetVaeInfoResponse(info=stage_info(self.config.model, self.adapter, "vae", self.dtype,
                                                          self.device, metadata=metadata))


async def serve(config: VaeServiceConfig) -> None:
    setup_logging("vae", config.server.log_level, config.server.log_file)
    servicer = VaeServicer(config)
    host = ServiceHost("vae", config.server, [SERVICE_NAME])
    vae_pb2_grpc.add_VaeServiceServicer_to_server(servicer, host.server)
    try:
        await host.run(servicer.load)
    finally:
        servicer.thread.shutdown()


def main(config: VaeServiceConfig) -> None:
    asyncio.run(serve(config))
