"""The four services as real processes on loopback ports, against FluxPipeline in one process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from clients.client import ChituClient, GenerateOptions
from services import codec
from services.media import decode_png
from services.proto.chitu.v1 import (
    denoiser_pb2,
    denoiser_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    tensor_pb2,
)
from tests.reference import flux_reference, rel_err

pytestmark = pytest.mark.e2e

PROMPT = "a large red circle on the left, on a blue background"
SETTINGS = {"width": 64, "height": 48, "steps": 6, "guidance": 3.5, "seed": 1234}


def _good_request_succeeds(stack) -> None:
    """The stack keeps serving: a valid request still completes."""
    with ChituClient(stack.address) as c:
        result = c.generate_result("a small green star", "tiny-flux", GenerateOptions(width=32, height=32, steps=2,
                                                                                        seed=1), timeout=60)
    assert result.artifacts and result.artifacts[0].data[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_generate_equals_diffusers_pipeline(flux_stack, tiny_flux: Path, tmp_path: Path) -> None:
    """`chitu generate` through four processes == FluxPipeline in one process (CPU fp32: max pixel diff <= 1/255)."""
    s = SETTINGS
    cmd = [sys.executable, "-m", "clients.cli", "generate", PROMPT, "--model", "tiny-flux", "--server",
           flux_stack.address, "--width", str(s["width"]), "--height", str(s["height"]), "--steps", str(s["steps"]),
           "--guidance", str(s["guidance"]), "--seed", str(s["seed"]), "--output", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    png_path = Path(proc.stdout.strip().splitlines()[-1])
    assert png_path.is_file() and png_path.with_suffix(".json").is_file()
    ours = decode_png(png_path.read_bytes())
    ref = flux_reference(tiny_flux, PROMPT, width=s["width"], height=s["height"], steps=s["steps"],
                         guidance=s["guidance"], seed=s["seed"])
    assert ours.shape == ref.shape == (s["height"], s["width"], 3)
    assert ref.std() > 1.0, "the reference image is flat: the comparison would prove nothing"
    diff = np.abs(ours.astype(int) - ref.astype(int)).max()
    assert diff <= 1, f"max pixel difference {diff}/255"


def test_stage_latents_equal_pipeline_latents(flux_stack, tiny_flux: Path) -> None:
    """Encoder + denoiser services (real processes) give the pipeline's latents to <= 1e-5 relative."""
    s = SETTINGS
    enc_addr = flux_stack.service("encoder").address
    den_addr = flux_stack.service("denoiser").address
    with grpc.insecure_channel(enc_addr) as ch:
        enc = encoder_pb2_grpc.TextEncoderServiceStub(ch).Encode(
            encoder_pb2.EncodeRequest(request_id="lat", model="tiny-flux", prompt=PROMPT), timeout=30)
    req = denoiser_pb2.DenoiseRequest(request_id="lat", model="tiny-flux", conditionings=enc.conditionings,
                                      width=s["width"], height=s["height"], steps=s["steps"],
                                      guidance_scale=s["guidance"], seed=s["seed"], latent_chunk_bytes=1024)
    assembler = codec.ChunkAssembler()
    steps_seen = []
    with grpc.insecure_channel(den_addr) as ch:
        for resp in denoiser_pb2_grpc.DenoiserServiceStub(ch).Denoise(req, timeout=60):
            kind = resp.WhichOneof("event")
            if kind == "progress":
                steps_seen.append(resp.progress.step)
            elif kind == "latents_chunk":
                assembler.add(resp.latents_chunk)
    assert steps_seen == list(range(1, s["steps"] + 1))
    ours = assembler.tensor()
    ref = flux_reference(tiny_flux, PROMPT, width=s["width"], height=s["height"], steps=s["steps"],
                         guidance=s["guidance"], seed=s["seed"], output_type="latent")
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) <= 1e-5


def test_events_and_timings(flux_stack) -> None:
    with ChituClient(flux_stack.address) as c:
        events = list(c.generate(PROMPT, "tiny-flux", GenerateOptions(width=32, height=32, steps=3, seed=5),
                                 timeout=60))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "queued" and kinds[-1] == "result"
    assert kinds.count("step") == 3 and kinds.count("stage_started") == 3 and kinds.count("stage_finished") == 3
    result = events[-1].result
    assert result.seed == 5 and (result.width, result.height, result.steps) == (32, 32, 3)
    assert len(result.timings.step_seconds) == 3 and len(result.timings.stages) == 3
    assert all(t.seconds > 0 for t in result.timings.stages)
    assert len({e.request_id for e in events}) == 1


def test_list_models(flux_stack) -> None:
    with ChituClient(flux_stack.address) as c:
        models = c.list_models().models
    assert [m.name for m in models] == ["tiny-flux"]
    m = models[0]
    assert m.family == "flux" and m.serving and m.limits.size_multiple == 16
    assert sorted(e.stage for e in m.endpoints) == [1, 2, 3]
    assert all(e.serving and e.info.model == "tiny-flux" for e in m.endpoints)


# -- bad input ------------------------------------------------------------------------------------------------------

BAD = [
    ({"model": "nope"}, grpc.StatusCode.NOT_FOUND, "tiny-flux"),
    ({"width": 40}, grpc.StatusCode.INVALID_ARGUMENT, "width=40"),
    ({"height": 8}, grpc.StatusCode.INVALID_ARGUMENT, "height=8"),
    ({"steps": 0}, grpc.StatusCode.INVALID_ARGUMENT, "steps=0"),
    ({"steps": -3}, grpc.StatusCode.INVALID_ARGUMENT, "steps=-3"),
    ({"steps": 1001}, grpc.StatusCode.INVALID_ARGUMENT, "steps=1001"),
    ({"guidance_scale": -0.5}, grpc.StatusCode.INVALID_ARGUMENT, "guidance_scale"),
    ({"prompt": "   "}, grpc.StatusCode.INVALID_ARGUMENT, "prompt must not be empty"),
    ({"prompt": "red " * 3000}, grpc.StatusCode.INVALID_ARGUMENT, "characters"),
    ({"prompt": "red circle " * 40}, grpc.StatusCode.INVALID_ARGUMENT, "tokens"),
    ({"frames": 9}, grpc.StatusCode.INVALID_ARGUMENT, "frames=9"),
    ({"guidance_scale": float("inf")}, grpc.StatusCode.INVALID_ARGUMENT, "guidance_scale=inf must be a finite"),
    ({"output_formats": [99]}, grpc.StatusCode.INVALID_ARGUMENT, "output_formats: unknown value(s) [99]"),
]


@pytest.mark.parametrize(("fields", "code", "needle"), BAD, ids=[str(b[0])[:40] for b in BAD])
def test_bad_input_gets_actionable_status(flux_stack, fields: dict, code: grpc.StatusCode, needle: str) -> None:
    req = {"model": "tiny-flux", "prompt": "a red circle", "width": 32, "height": 32, "steps": 2, **fields}
    with grpc.insecure_channel(flux_stack.address) as ch:
        stub = generation_pb2_grpc.GenerationServiceStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(generation_pb2.GenerateRequest(**req), timeout=60))
    assert info.value.code() == code, info.value.details()
    assert needle in info.value.details()
    _good_request_succeeds(flux_stack)


@pytest.mark.parametrize("length", [-1, 65, 2**31 - 1])
def test_encoder_max_sequence_length_outside_the_budget_is_invalid_argument(flux_stack, length: int) -> None:
    """The tokenizer pads to max_sequence_length: unchecked, 2**31 - 1 aborted the encoder process (the tokenizer's
    allocation) and 100000 ran it out of memory. The tiny checkpoint's budget is 64 tokens."""
    with grpc.insecure_channel(flux_stack.service("encoder").address) as ch, pytest.raises(grpc.RpcError) as info:
        encoder_pb2_grpc.TextEncoderServiceStub(ch).Encode(
            encoder_pb2.EncodeRequest(model="tiny-flux", prompt="a red circle", max_sequence_length=length), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert f"max_sequence_length={length} must be in [0, 64]" in info.value.details()
    _good_request_succeeds(flux_stack)


def test_tensor_over_cap_is_resource_exhausted(flux_stack) -> None:
    """A tensor whose declared size is over the stage's cap is refused before its bytes are used."""
    huge = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1, 2**31], data=b"")
    enc_addr = flux_stack.service("encoder").address
    with grpc.insecure_channel(enc_addr) as ch:
        enc = encoder_pb2_grpc.TextEncoderServiceStub(ch).Encode(
            encoder_pb2.EncodeRequest(model="tiny-flux", prompt="a red circle"), timeout=30)
    req = denoiser_pb2.DenoiseRequest(model="tiny-flux", conditionings=enc.conditionings, width=32, height=32,
                                      steps=2, guidance_scale=1.0, seed=0, initial_latents=huge)
    with grpc.insecure_channel(flux_stack.service("denoiser").address) as ch, pytest.raises(grpc.RpcError) as info:
        list(denoiser_pb2_grpc.DenoiserServiceStub(ch).Denoise(req, timeout=30))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "initial_latents" in info.value.details() and "cap" in info.value.details()
    _good_request_succeeds(flux_stack)


def test_malformed_conditioning_is_invalid_argument(flux_stack) -> None:
    bad = tensor_pb2.NamedTensor(name="prompt_embeds", tensor=tensor_pb2.Tensor(
        dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1, 4, 32], data=b"\0" * 12))
    req = denoiser_pb2.DenoiseRequest(model="tiny-flux", conditionings=[bad], width=32, height=32, steps=2,
                                      guidance_scale=1.0, seed=0)
    with grpc.insecure_channel(flux_stack.service("denoiser").address) as ch, pytest.raises(grpc.RpcError) as info:
        list(denoiser_pb2_grpc.DenoiserServiceStub(ch).Denoise(req, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt_embeds" in info.value.details()



@pytest.mark.parametrize(("conds", "needle"), [
    ({"prompt_embeds": (1, 4, 7), "pooled_prompt_embeds": (1, 32)},
     "conditionings['prompt_embeds'] has shape [1, 4, 7]; expected [1, L, 32]"),
    ({"prompt_embeds": (1, 4, 32), "pooled_prompt_embeds": (1, 5)},
     "conditionings['pooled_prompt_embeds'] has shape [1, 5]; expected [1, 32]"),
    ({"prompt_embeds": (1, 4, 32)}, "conditionings lacks 'pooled_prompt_embeds'"),
], ids=["text-width", "pooled-width", "no-pooled"])
def test_conditionings_of_the_wrong_shape_are_invalid_argument(flux_stack, conds: dict, needle: str) -> None:
    """Well-formed tensors whose shapes do not fit the checkpoint (the widths come from the transformer's config):
    INVALID_ARGUMENT naming the field and the expected shape, not an INTERNAL matmul error from inside the model."""
    named = {name: torch.zeros(shape) for name, shape in conds.items()}
    req = denoiser_pb2.DenoiseRequest(model="tiny-flux", conditionings=codec.named_to_proto(named, 1 << 20), width=32,
                                      height=32, steps=2, guidance_scale=1.0, seed=0)
    with grpc.insecure_channel(flux_stack.service("denoiser").address) as ch, pytest.raises(grpc.RpcError) as info:
        list(denoiser_pb2_grpc.DenoiserServiceStub(ch).Denoise(req, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert needle in info.value.details()
