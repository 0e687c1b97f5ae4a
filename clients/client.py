"""Python client of the public GenerationService (synchronous, one channel per client)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from clients.cache import cache_policy
from services.config import ClientSecurityConfig
from services.proto.chitu.v1 import generation_pb2, generation_pb2_grpc, vae_pb2
from services.security import open_channel
from services.server import REQUEST_ID_KEY, channel_options

FORMATS = {"png": vae_pb2.MEDIA_FORMAT_PNG, "mp4": vae_pb2.MEDIA_FORMAT_MP4, "raw": vae_pb2.MEDIA_FORMAT_RAW_RGB8}


@dataclass
class GenerateOptions:
    """Optional settings of a generation; None/0 leaves the model's default."""

    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    formats: list[str] = field(default_factory=list)
    guidance_scale_2: float | None = None
    fps: float | None = None
    request_id: str = ""
    cache: str | dict[str, Any] | None = None
    """FlexCache policy: ``"teacache:threshold=0.3"`` or ``{"strategy": "teacache", "threshold": 0.3}`` (see
    ``clients.cache``); None means full compute."""


class ChituClient:
    """``with ChituClient("127.0.0.1:50051") as c: for ev in c.generate("a red circle", model="m"): ...``"""

    def __init__(self, address: str = "127.0.0.1:50051", max_message_mb: int = 256,
                 security: ClientSecurityConfig | None = None):
        """``security``: TLS against its ``ca_file``, a client certificate for mutual TLS, a bearer token (None or
        no ``ca_file``: plaintext)."""
        if security is not None:
            security.validate()
        self.address = address
        self.channel = open_channel(address, security, channel_options(max_message_mb))
        self.stub = generation_pb2_grpc.GenerationServiceStub(self.channel)

    def __enter__(self) -> ChituClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def list_models(self, timeout: float | None = 10.0) -> generation_pb2.ListModelsResponse:
        return self.stub.ListModels(generation_pb2.ListModelsRequest(), timeout=timeout)

    def request(self, prompt: str, model: str, options: GenerateOptions | None = None) -> generation_pb2.GenerateRequest:
        o = options or GenerateOptions()
        req = generation_pb2.GenerateRequest(
            request_id=o.request_id, model=model, prompt=prompt, negative_prompt=o.negative_prompt,
            output_formats=[FORMATS[f] for f in o.formats])
        for name in ("width", "height", "frames", "steps", "guidance_scale", "seed", "guidance_scale_2", "fps"):
            value = getattr(o, name)
            if value is not None:
                setattr(req, name, value)
        if o.cache:
            req.cache.CopyFrom(cache_policy(o.cache))
        return req

    def generate(self, prompt: str, model: str, options: GenerateOptions | None = None,
                 timeout: float | None = None) -> Iterator[generation_pb2.GenerateResponse]:
        """Stream the events of one generation; the last one carries ``result``. Errors raise grpc.RpcError."""
        req = self.request(prompt, model, options)
        metadata = [(REQUEST_ID_KEY, req.request_id)] if req.request_id else None
        yield from self.stub.Generate(req, timeout=timeout, metadata=metadata)

    def generate_result(self, prompt: str, model: str, options: GenerateOptions | None = None,
                        timeout: float | None = None) -> generation_pb2.GenerationResult:
        """Run one generation and return its result."""
        for event in self.generate(prompt, model, options, timeout):
            if event.HasField("result"):
                return event.result
        raise RuntimeError("the stream ended without a result")
