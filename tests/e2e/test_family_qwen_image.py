"""Qwen-Image through the four services (real processes on loopback ports) against QwenImagePipeline in one
process: true CFG with a negative prompt (both branches, norm-rescaled mix), the no-negative-prompt rule, bad input.
Tolerances: see tests/image_family_helpers.py (images within 1/255, latents within 1e-5 relative; CPU fp32)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from clients.client import ChituClient, GenerateOptions
from tests.image_family_helpers import (
    IMAGE_TOLERANCE,
    LATENT_TOLERANCE,
    expect_status,
    generate_image,
    max_pixel_diff,
    pipeline_reference,
    rel_err,
    stage_latents,
    start_stack,
)

pytestmark = pytest.mark.e2e

MODEL = "tiny-qwen-image"
PROMPT = "a large red circle on the left, on a blue background"
NEGATIVE = "blurry dark picture"
SETTINGS = {"width": 64, "height": 48, "steps": 5, "guidance": 4.0, "seed": 321}


@pytest.fixture(scope="module")
def stack(tiny_qwen_image: Path, tmp_path_factory: pytest.TempPathFactory):
    s = start_stack(MODEL, tiny_qwen_image, tmp_path_factory.mktemp("qwen-image-stack"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def references(tiny_qwen_image: Path):
    """QwenImagePipeline with true CFG (negative prompt, true_cfg_scale 4) and without a negative prompt."""
    return {neg: pipeline_reference(tiny_qwen_image, PROMPT, negative_prompt=neg, **SETTINGS) for neg in (NEGATIVE, "")}


def _options(**kw) -> GenerateOptions:
    s = SETTINGS
    return GenerateOptions(width=s["width"], height=s["height"], steps=s["steps"], guidance_scale=s["guidance"],
                           seed=s["seed"], **kw)


def test_true_cfg_equals_pipeline(stack, references) -> None:
    """Negative prompt + guidance 4: both branches and the norm-rescaled mix, image and latents as the pipeline."""
    cfg_ref, plain_ref = references[NEGATIVE], references[""]
    assert cfg_ref.image.std() > 1.0, "the reference image is flat: the comparison would prove nothing"
    # CFG must matter in this configuration, or the equality below would not show that both branches ran
    assert rel_err(cfg_ref.latents, plain_ref.latents) > 1e-3

    image, result = generate_image(stack, MODEL, PROMPT, _options(negative_prompt=NEGATIVE))
    assert list(result.warnings) == []
    assert max_pixel_diff(image, cfg_ref.image) <= IMAGE_TOLERANCE

    s = SETTINGS
    latents = stage_latents(stack, MODEL, PROMPT, negative_prompt=NEGATIVE, width=s["width"], height=s["height"],
                            steps=s["steps"], guidance=s["guidance"], seed=s["seed"])
    assert latents.shape == cfg_ref.latents.shape
    assert rel_err(latents, cfg_ref.latents) <= LATENT_TOLERANCE


def test_without_negative_prompt_no_cfg_and_a_warning(stack, references) -> None:
    """QwenImagePipeline runs true CFG only with a negative prompt: guidance 4 alone is the single-branch result."""
    image, result = generate_image(stack, MODEL, PROMPT, _options())
    assert any("no effect without a negative_prompt" in w for w in result.warnings), list(result.warnings)
    assert max_pixel_diff(image, references[""].image) <= IMAGE_TOLERANCE


def test_negative_prompt_with_guidance_one_is_ignored_with_a_warning(stack) -> None:
    with ChituClient(stack.address) as c:
        result = c.generate_result(PROMPT, MODEL, GenerateOptions(negative_prompt=NEGATIVE, guidance_scale=1.0,
                                                                  width=32, height=32, steps=2, seed=1), timeout=60)
    assert any("negative_prompt is ignored" in w and "guidance_scale > 1" in w for w in result.warnings)


def test_list_models_reports_the_family_and_its_cfg_rule(stack) -> None:
    with ChituClient(stack.address) as c:
        (entry,) = c.list_models().models
    assert entry.name == MODEL and entry.family == "qwen_image" and entry.serving
    assert entry.limits.size_multiple == 16 and entry.limits.cfg_needs_negative_prompt
    assert entry.limits.cfg_guidance_threshold == 1.0


BAD = [
    ({"width": 40}, grpc.StatusCode.INVALID_ARGUMENT, "width=40"),
    ({"height": 1000}, grpc.StatusCode.INVALID_ARGUMENT, "height=1000"),
    ({"frames": 9}, grpc.StatusCode.INVALID_ARGUMENT, "frames=9"),
    ({"prompt": "red circle " * 80}, grpc.StatusCode.INVALID_ARGUMENT, "tokens"),
    ({"negative_prompt": "blue square " * 80, "guidance_scale": 4.0}, grpc.StatusCode.INVALID_ARGUMENT,
     "negative_prompt is"),
]


@pytest.mark.parametrize(("fields", "code", "needle"), BAD, ids=[str(b[0])[:40] for b in BAD])
def test_bad_input(stack, fields: dict, code: grpc.StatusCode, needle: str) -> None:
    request = {"model": MODEL, "prompt": "a red circle", "width": 32, "height": 32, "steps": 2, **fields}
    expect_status(stack, request, code, needle)
    image, _ = generate_image(stack, MODEL, "a small green star", GenerateOptions(width=32, height=32, steps=2))
    assert image.shape == (32, 32, 3)  # still serving
