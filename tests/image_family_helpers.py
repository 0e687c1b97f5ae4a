"""Shared pieces of the image-family end-to-end tests (FLUX.2-klein, Qwen-Image, Z-Image): the single-process
diffusers reference, a local stack per checkpoint, and the stage-level latents path.

Tolerances (CPU, float32), the same as the Flux tests: images within 1/255 per channel (the PNG's uint8 rounding is
the only allowed difference), final latents within 1e-5 relative (services and pipeline run the same kernels in the
same order, so they agree bitwise in practice, except Z-Image with CFG, where the pipeline batches both branches
and we run them one by one: ~3e-7 relative).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch

from clients.client import ChituClient, GenerateOptions
from services import codec
from services.media import decode_png
from services.proto.chitu.v1 import denoiser_pb2, denoiser_pb2_grpc, encoder_pb2, encoder_pb2_grpc
from services.registry import load_adapter
from tests.reference import pipeline_text_tokens

IMAGE_TOLERANCE = 1
"""Max per-channel pixel difference, in 1/255."""
LATENT_TOLERANCE = 1e-5
"""Max relative L2 error of the final latents."""


@dataclass
class Reference:
    """One pipeline run: the final latents as the denoiser stage returns them, and the uint8 image."""

    latents: torch.Tensor
    image: np.ndarray


def pipeline_reference(checkpoint: Path, prompt: str, *, width: int, height: int, steps: int, guidance: float,
                       seed: int, negative_prompt: str = "") -> Reference:
    """The family's diffusers pipeline in one process (CPU fp32). The latents come from the last step's callback,
    i.e. the scheduler's output before the pipeline's own unpacking for the VAE."""
    import diffusers

    adapter = load_adapter(checkpoint)
    cls = getattr(diffusers, adapter.model_index["_class_name"])
    pipe = cls.from_pretrained(checkpoint, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"prompt": prompt, "width": width, "height": height, "num_inference_steps": steps,
              "generator": torch.Generator("cpu").manual_seed(seed), "output_type": "np",
              "max_sequence_length": pipeline_text_tokens(checkpoint)}
    if adapter.family == "qwen_image":  # guidance_scale is the pipeline's true_cfg_scale; "" means no negative
        kwargs.update(true_cfg_scale=guidance, negative_prompt=negative_prompt or None)
    elif adapter.family == "z_image":
        kwargs.update(guidance_scale=guidance, negative_prompt=negative_prompt or None)
    else:  # FLUX.2-klein takes no negative prompt
        kwargs.update(guidance_scale=guidance)
    last: dict[str, torch.Tensor] = {}

    def keep_latents(_pipe, _i, _t, tensors):
        last["latents"] = tensors["latents"].detach().clone()
        return {}

    images = pipe(**kwargs, callback_on_step_end=keep_latents).images
    image = (images[0] * 255).round().astype("uint8")  # numpy_to_pil's rounding
    return Reference(latents=last["latents"], image=image)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def start_stack(model: str, checkpoint: Path, workdir: Path):
    """The four services on loopback ports for one checkpoint (CPU, float32)."""
    from clients.stack import LocalStack, StackConfig

    stack = LocalStack(StackConfig(checkpoints={model: str(checkpoint)}, listen="127.0.0.1:0", device="cpu",
                                   dtype="float32"), workdir=workdir)
    stack.start()
    return stack


def generate_image(stack, model: str, prompt: str, options: GenerateOptions):
    """One generation through the orchestrator: (uint8 image, result)."""
    with ChituClient(stack.address) as c:
        result = c.generate_result(prompt, model, options, timeout=120)
    assert result.artifacts and result.artifacts[0].mime_type == "image/png"
    return decode_png(result.artifacts[0].data), result


def stage_latents(stack, model: str, prompt: str, *, negative_prompt: str | None, width: int, height: int,
                  steps: int, guidance: float, seed: int) -> torch.Tensor:
    """Encoder and denoiser services called directly (real processes): the final latents as the VAE receives them.
    ``negative_prompt`` not None asks the encoder for the negative branch (as the orchestrator does when CFG runs)."""
    with grpc.insecure_channel(stack.service("encoder").address) as ch:
        enc = encoder_pb2_grpc.TextEncoderServiceStub(ch).Encode(encoder_pb2.EncodeRequest(
            request_id="latents", model=model, prompt=prompt, negative_prompt=negative_prompt or "",
            encode_negative=negative_prompt is not None), timeout=60)
    req = denoiser_pb2.DenoiseRequest(request_id="latents", model=model, conditionings=enc.conditionings,
                                      negative_conditionings=enc.negative_conditionings, width=width, height=height,
                                      steps=steps, guidance_scale=guidance, seed=seed, latent_chunk_bytes=512)
    assembler = codec.ChunkAssembler()
    steps_seen = []
    with grpc.insecure_channel(stack.service("denoiser").address) as ch:
        for resp in denoiser_pb2_grpc.DenoiserServiceStub(ch).Denoise(req, timeout=120):
            kind = resp.WhichOneof("event")
            if kind == "progress":
                steps_seen.append(resp.progress.step)
            elif kind == "latents_chunk":
                assembler.add(resp.latents_chunk)
    assert steps_seen == list(range(1, steps + 1))
    return assembler.tensor()


def max_pixel_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def expect_status(stack, request: dict, code: grpc.StatusCode, needle: str) -> None:
    """A bad request gets ``code`` with ``needle`` in its message, and the stack keeps serving."""
    from services.proto.chitu.v1 import generation_pb2, generation_pb2_grpc

    with grpc.insecure_channel(stack.address) as ch:
        stub = generation_pb2_grpc.GenerationServiceStub(ch)
        try:
            list(stub.Generate(generation_pb2.GenerateRequest(**request), timeout=60))
        except grpc.RpcError as exc:
            assert exc.code() == code, exc.details()
            assert needle in exc.details(), exc.details()
        else:
            raise AssertionError(f"{request} succeeded; expected {code.name} mentioning {needle!r}")
