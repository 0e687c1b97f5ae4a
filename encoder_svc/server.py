"""TextEncoderService: proto <-> the family adapter's ``encode``."""

from __future__ import annotations

import asyncio

import grpc

from encoder_svc.config import EncoderServiceConfig
from services import codec
from services.errors import InvalidArgument
from services.families.base import resolve_device, resolve_dtype
from services.log import get_logger, setup_logging
from services.proto.chitu.v1 import encoder_pb2, encoder_pb2_grpc
from services.registry import load_adapter
from services.server import ServiceHost
from services.stage import WorkThread, check_model, check_prompt, stage_info

log = get_logger(__name__)

SERVICE_NAME = "chitu.v1.TextEncoderService"


class TextEncoderServicer(encoder_pb2_grpc.TextEncoderServiceServicer):
    def __init__(self, config: EncoderServiceConfig):
        self.config = config
        self.adapter = load_adapter(config.model.checkpoint)
        self.device = resolve_device(config.model.device)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        self.thread = WorkThread("encoder")
        self.model = None
        self.max_bytes = config.server.max_tensor_bytes

    async def load(self) -> None:
        self.model = await self.thread.run(self.adapter.load_encoder, self.dtype, self.device)
        if self.config.warmup:
            await self.thread.run(self.adapter.encode, self.model, "warm up", None)
        log.info("encoder_loaded", family=self.adapter.family, device=str(self.device), dtype=str(self.dtype))

    async def Encode(self, request: encoder_pb2.EncodeRequest, context: grpc.aio.ServicerContext) -> encoder_pb2.EncodeResponse:
        check_model(request.model, self.config.model)
        check_prompt(request.prompt)
        check_prompt(request.negative_prompt, "negative_prompt", allow_empty=True)
        negative = request.negative_prompt if request.encode_negative else None
        budget = self.adapter.limits().max_prompt_tokens
        if not 0 <= request.max_sequence_length <= budget:  # the tokenizer pads to it: an unchecked value can OOM
            raise InvalidArgument(f"max_sequence_length={request.max_sequence_length} must be in [0, {budget}] "
                                  f"(0: this model's budget, {budget} tokens)")
        result = await self.thread.run(self.adapter.encode, self.model, request.prompt, negative,
                                       request.max_sequence_length)
        return encoder_pb2.EncodeResponse(
            conditionings=codec.named_to_proto(result.conditionings, self.max_bytes),
            negative_conditionings=codec.named_to_proto(result.negative_conditionings, self.max_bytes),
            warnings=result.warnings, prompt_tokens=result.prompt_tokens,
        )

    async def GetEncoderInfo(self, request: encoder_pb2.GetEncoderInfoRequest,
                             context: grpc.aio.ServicerContext) -> encoder_pb2.GetEncoderInfoResponse:
        return encoder_pb2.GetEncoderInfoResponse(
            info=stage_info(self.config.model, self.adapter, "encoder", self.dtype, self.device))


async def serve(config: EncoderServiceConfig) -> None:
    setup_logging("encoder", config.server.log_level, config.server.log_file)
    servicer = TextEncoderServicer(config)
    host = ServiceHost("encoder", config.server, [SERVICE_NAME])
    encoder_pb2_grpc.add_TextEncoderServiceServicer_to_server(servicer, host.server)
    try:
        await host.run(servicer.load)
    finally:
        servicer.thread.shutdown()


def main(config: EncoderServiceConfig) -> None:
    asyncio.run(serve(config))
