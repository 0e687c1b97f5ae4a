"""True CFG of a Flux checkpoint without guidance embeddings, through the four services, against FluxPipeline's
``true_cfg_scale`` in one process (tiny checkpoint built with ``services.tiny.flux.make_tiny_flux(true_cfg=True)``).

Tolerance: max pixel difference <= 1/255 on CPU fp32, where stack and pipeline run the same kernels in the same order
(in practice identical). CFG is checked to change the image, so that a stack that never ran the unconditional
branch could not pass against a pipeline that did not either.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from clients.client import ChituClient, GenerateOptions
from services.media import decode_png
from services.proto.chitu.v1 import common_pb2, denoiser_pb2, denoiser_pb2_grpc, encoder_pb2, encoder_pb2_grpc
from tests.reference import pipeline_text_tokens

pytestmark = pytest.mark.e2e

MODEL = "tiny-flux-cfg"
PROMPT = "a large red circle on the left, on a blue background"


@pytest.fixture(scope="module")
def tiny_flux_cfg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from services.tiny.flux import make_tiny_flux

    path = make_tiny_flux(tmp_path_factory.mktemp("ckpt") / MODEL, seed=0, true_cfg=True)
    (path / "chitu.json").write_text(json.dumps({"width": 64, "height": 48, "steps": 5, "guidance_scale": 3.0}))
    return path


@pytest.fixture(scope="module")
def cfg_stack(tiny_flux_cfg: Path, tmp_path_factory: pytest.TempPathFactory):
    from clients.stack import LocalStack, StackConfig

    cfg = StackConfig(checkpoints={MODEL: str(tiny_flux_cfg)}, listen="127.0.0.1:0", device="cpu", dtype="float32")
    stack = LocalStack(cfg, workdir=tmp_path_factory.mktemp("stack"))
    stack.start()
    yield stack
    stack.stop()


def pipeline_image(checkpoint: Path, prompt: str, negative: str, scale: float, steps: int, width: int, height: int,
                   seed: int) -> np.ndarray:
    """FluxPipeline in one process with true CFG (``true_cfg_scale`` and ``negative_prompt``)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(checkpoint, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt, negative_prompt=negative, true_cfg_scale=scale, width=width, height=height,
               num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed),
               max_sequence_length=pipeline_text_tokens(checkpoint))
    return np.asarray(out.images[0].convert("RGB"))


def stack_image(stack, model: str, prompt: str, **options) -> tuple[np.ndarray, list[str]]:
    with ChituClient(stack.address) as c:
        result = c.generate_result(prompt, model, GenerateOptions(**options), timeout=120)
    return decode_png(result.artifacts[0].data), list(result.warnings)


CASES = [("", 3.0), ("a small blue square", 2.5), ("", 1.0)]


@pytest.mark.parametrize(("negative", "scale"), CASES, ids=["default-negative", "negative-prompt", "no-cfg"])
def test_true_cfg_equals_flux_pipeline(cfg_stack, tiny_flux_cfg: Path, negative: str, scale: float) -> None:
    ours, warnings = stack_image(cfg_stack, MODEL, PROMPT, negative_prompt=negative, guidance_scale=scale, seed=77)
    ref = pipeline_image(tiny_flux_cfg, PROMPT, negative, scale, steps=5, width=64, height=48, seed=77)
    assert ours.shape == ref.shape == (48, 64, 3)
    assert ref.std() > 1.0, "the reference image is flat: the comparison would prove nothing"
    diff = np.abs(ours.astype(int) - ref.astype(int)).max()
    assert diff <= 1, f"max pixel difference {diff}/255"
    if scale > 1:
        no_cfg = pipeline_image(tiny_flux_cfg, PROMPT, negative, 1.0, steps=5, width=64, height=48, seed=77)
        assert np.abs(no_cfg.astype(int) - ref.astype(int)).max() > 8, "CFG must change the image"
        assert not warnings
    elif negative:
        assert any("negative_prompt is ignored" in w for w in warnings)


def test_cfg_model_reports_its_guidance(cfg_stack) -> None:
    with ChituClient(cfg_stack.address) as c:
        (model,) = c.list_models().models
    assert model.limits.guidance_kind == common_pb2.GUIDANCE_KIND_CFG
    assert model.limits.default_guidance_scale == pytest.approx(3.0)


def test_denoiser_refuses_cfg_without_negative_conditionings(cfg_stack) -> None:
    with grpc.insecure_channel(cfg_stack.service("encoder", MODEL).address) as ch:
        enc = encoder_pb2_grpc.TextEncoderServiceStub(ch).Encode(
            encoder_pb2.EncodeRequest(model=MODEL, prompt=PROMPT, negative_prompt="", encode_negative=True),
            timeout=30)
    assert [t.name for t in enc.negative_conditionings] == ["prompt_embeds", "pooled_prompt_embeds"]
    req = denoiser_pb2.DenoiseRequest(model=MODEL, conditionings=enc.conditionings, width=64, height=48, steps=2,
                                      guidance_scale=3.0, seed=0)
    with grpc.insecure_channel(cfg_stack.service("denoiser", MODEL).address) as ch, \
            pytest.raises(grpc.RpcError) as info:
        list(denoiser_pb2_grpc.DenoiserServiceStub(ch).Denoise(req, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "negative_conditionings" in info.value.details()
