"""VaeService: latents (streamed in chunks) -> the adapter's ``decode`` -> encoded media."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import torch

from services import codec
from services.errors import InvalidArgument
from services.families.base import SamplingParams, resolve_device, resolve_dtype
from services.log import bind_request, get_logger, setup_logging
from services.media import encode_png
from services.proto.chitu.v1 import vae_pb2, vae_pb2_grpc
from services.registry import load_adapter
from services.server import ServiceHost
from services.stage import WorkThread, check_model, stage_info
from vae_svc.config import VaeServiceConfig

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

    async def load(self) -> None:
        self.model = await self.thread.run(self.adapter.load_vae, self.dtype, self.device)
        log.info("vae_loaded", family=self.adapter.family, device=str(self.device), dtype=str(self.dtype))

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

    def _decode(self, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        return self.adapter.decode(self.model, latents, params)

    async def Decode(self, request_iterator: AsyncIterator[vae_pb2.DecodeRequest],
                     context: grpc.aio.ServicerContext) -> vae_pb2.DecodeResponse:
        header, latents = await self._read(request_iterator)
        with bind_request(header.request_id or "-"):
            check_model(header.model, self.config.model)
            lim = self.adapter.limits()
            params = SamplingParams(width=header.width, height=header.height, steps=1, guidance_scale=0.0, seed=0,
                                    frames=max(header.frames, 1))
            for name, value in (("width", params.width), ("height", params.height)):
                if value <= 0 or value % lim.size_multiple:
                    raise InvalidArgument(f"{name}={value} must be a positive multiple of {lim.size_multiple}")
            formats = list(header.formats) or [vae_pb2.MEDIA_FORMAT_PNG]
            for f in formats:
                if f not in (vae_pb2.MEDIA_FORMAT_PNG, vae_pb2.MEDIA_FORMAT_RAW_RGB8):
                    raise InvalidArgument(f"formats: {vae_pb2.MediaFormat.Name(f)} is not supported for "
                                          f"{self.adapter.family}; use MEDIA_FORMAT_PNG or MEDIA_FORMAT_RAW_RGB8")
            t0 = time.perf_counter()
            frames = await self.thread.run(self._decode, latents, params)
            t1 = time.perf_counter()
            artifacts = await self.thread.run(self._encode, frames, formats)
            t2 = time.perf_counter()
            log.info("decoded", frames=int(frames.shape[0]), decode_seconds=round(t1 - t0, 4))
            return vae_pb2.DecodeResponse(artifacts=artifacts, decode_seconds=t1 - t0, encode_seconds=t2 - t1)

    def _encode(self, frames: torch.Tensor, formats: list[int]) -> list[vae_pb2.Artifact]:
        out = []
        n, h, w, _ = frames.shape
        for fmt in formats:
            for i in range(n):
                if fmt == vae_pb2.MEDIA_FORMAT_PNG:
                    data, mime, ext = encode_png(frames[i], self.config.png_compress_level), "image/png", "png"
                else:
                    data, mime, ext = frames[i].contiguous().numpy().tobytes(), "application/octet-stream", "rgb"
                out.append(vae_pb2.Artifact(name=f"image_{i}.{ext}", format=fmt, mime_type=mime, data=data,
                                            width=w, height=h, frames=1))
        return out

    async def GetVaeInfo(self, request: vae_pb2.GetVaeInfoRequest,
                         context: grpc.aio.ServicerContext) -> vae_pb2.GetVaeInfoResponse:
        return vae_pb2.GetVaeInfoResponse(info=stage_info(self.config.model, self.adapter, "vae", self.dtype, self.device))


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
