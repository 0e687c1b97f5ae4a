"""Z-Image through the four services (real processes on loopback ports) against ZImagePipeline in one process:
Z-Image-Turbo's default (guidance 0, no CFG) and CFG (guidance > 0 with a negative prompt: the pipeline's
``pos + g * (pos - neg)``), a negative prompt that guidance 0 ignores, bad input.

Tolerances: see tests/image_family_helpers.py. Without CFG the services and the pipeline agree bitwise; with CFG
the pipeline runs both branches as one padded batch of two and the services run them one at a time (the same math,
another float32 summation order): latents agree to ~3e-7 relative, within the 1e-5 bound; images within 1/255."""

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

MODEL = "tiny-z-image"
PROMPT = "a large red circle on the left, on a blue background"
NEGATIVE = "blurry dark picture"
SETTINGS = {"width": 64, "height": 48, "steps": 4, "seed": 5}


@pytest.fixture(scope="module")
def stack(tiny_z_image: Path, tmp_path_factory: pytest.TempPathFactory):
    s = start_stack(MODEL, tiny_z_image, tmp_path_factory.mktemp("z-image-stack"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def references(tiny_z_image: Path):
    """ZImagePipeline at guidance 0 (Turbo, one branch) and at guidance 2.5 with a negative prompt (CFG)."""
    return {0.0: pipeline_reference(tiny_z_image, PROMPT, guidance=0.0, **SETTINGS),
            2.5: pipeline_reference(tiny_z_image, PROMPT, guidance=2.5, negative_prompt=NEGATIVE, **SETTINGS)}


def _options(**kw) -> GenerateOptions:
    s = SETTINGS
    return GenerateOptions(width=s["width"], height=s["height"], steps=s["steps"], seed=s["seed"], **kw)


@pytest.mark.parametrize("guidance", [0.0, 2.5])
def test_generate_equals_pipeline(stack, references, guidance: float) -> None:
    ref = references[guidance]
    assert ref.image.std() > 1.0, "the reference image is flat: the comparison would prove nothing"
    negative = NEGATIVE if guidance > 0 else None
    if guidance > 0:  # CFG must matter here, or equality would not show that both branches ran
        assert rel_err(ref.latents, references[0.0].latents) > 1e-3
    image, result = generate_image(stack, MODEL, PROMPT, _options(guidance_scale=guidance,
                                                                  negative_prompt=negative or ""))
    assert list(result.warnings) == []
    assert max_pixel_diff(image, ref.image) <= IMAGE_TOLERANCE

    s = SETTINGS
    latents = stage_latents(stack, MODEL, PROMPT, negative_prompt=negative, width=s["width"], height=s["height"],
                            steps=s["steps"], guidance=guidance, seed=s["seed"])
    assert latents.shape == ref.latents.shape  # [1, C, H/8, W/8] float32
    err = rel_err(latents, ref.latents)
    assert err <= LATENT_TOLERANCE
    if guidance == 0:
        assert err == 0.0  # same kernels, same order: bitwise


def test_negative_prompt_at_guidance_zero_is_ignored_with_a_warning(stack, references) -> None:
    image, result = generate_image(stack, MODEL, PROMPT, _options(guidance_scale=0.0, negative_prompt=NEGATIVE))
    assert any("negative_prompt is ignored" in w and "guidance_scale > 0" in w for w in result.warnings)
    assert max_pixel_diff(image, references[0.0].image) <= IMAGE_TOLERANCE


def test_list_models(stack) -> None:
    with ChituClient(stack.address) as c:
        (entry,) = c.list_models().models
    assert entry.name == MODEL and entry.family == "z_image" and entry.serving
    assert entry.limits.size_multiple == 16 and entry.limits.cfg_guidance_threshold == 0.0
    assert not entry.limits.cfg_needs_negative_prompt


BAD = [
    ({"width": 72}, grpc.StatusCode.INVALID_ARGUMENT, "width=72"),
    ({"width": 4096}, grpc.StatusCode.INVALID_ARGUMENT, "width=4096"),
    ({"frames": 5}, grpc.StatusCode.INVALID_ARGUMENT, "frames=5"),
    ({"prompt": "red circle " * 40}, grpc.StatusCode.INVALID_ARGUMENT, "tokens"),
    ({"guidance_scale": -1.0}, grpc.StatusCode.INVALID_ARGUMENT, "guidance_scale"),
]


@pytest.mark.parametrize(("fields", "code", "needle"), BAD, ids=[str(b[0])[:40] for b in BAD])
def test_bad_input(stack, fields: dict, code: grpc.StatusCode, needle: str) -> None:
    request = {"model": MODEL, "prompt": "a red circle", "width": 32, "height": 32, "steps": 2, **fields}
    expect_status(stack, request, code, needle)
    image, _ = generate_image(stack, MODEL, "a small green star", GenerateOptions(width=32, height=32, steps=2))
    assert image.shape == (32, 32, 3)  # still serving
