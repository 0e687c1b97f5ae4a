"""FLUX.2-klein(-4B, step-distilled) through the four services (real processes on loopback ports) against
Flux2KleinPipeline in one process; guidance and negative prompts that the distilled model ignores (warnings, not
errors); bad input. Tolerances: see tests/image_family_helpers.py (images within 1/255, latents within 1e-5
relative; CPU fp32). The undistilled base variant's CFG path is checked in tests/unit/test_image_families.py."""

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

MODEL = "tiny-flux2-klein"
PROMPT = "a large red circle on the left, on a blue background"
SETTINGS = {"width": 64, "height": 48, "steps": 4, "guidance": 1.0, "seed": 99}


@pytest.fixture(scope="module")
def stack(tiny_flux2_klein: Path, tmp_path_factory: pytest.TempPathFactory):
    s = start_stack(MODEL, tiny_flux2_klein, tmp_path_factory.mktemp("flux2-klein-stack"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference(tiny_flux2_klein: Path):
    return pipeline_reference(tiny_flux2_klein, PROMPT, **SETTINGS)


def _options(**kw) -> GenerateOptions:
    s = SETTINGS
    return GenerateOptions(width=s["width"], height=s["height"], steps=s["steps"], seed=s["seed"], **kw)


def test_generate_equals_pipeline(stack, reference) -> None:
    assert reference.image.std() > 1.0, "the reference image is flat: the comparison would prove nothing"
    image, result = generate_image(stack, MODEL, PROMPT, _options())
    assert list(result.warnings) == []
    assert max_pixel_diff(image, reference.image) <= IMAGE_TOLERANCE

    s = SETTINGS
    latents = stage_latents(stack, MODEL, PROMPT, negative_prompt=None, width=s["width"], height=s["height"],
                            steps=s["steps"], guidance=s["guidance"], seed=s["seed"])
    assert latents.shape == reference.latents.shape  # packed tokens [1, (H/16)(W/16), 4C]
    assert rel_err(latents, reference.latents) <= LATENT_TOLERANCE


def test_ignored_guidance_and_negative_prompt_warn(stack, reference) -> None:
    """The distilled model ignores guidance and has no negative branch: same image, two warnings, no error."""
    image, result = generate_image(stack, MODEL, PROMPT, _options(guidance_scale=5.0, negative_prompt="blurry"))
    warnings = list(result.warnings)
    assert any("negative_prompt is ignored" in w for w in warnings), warnings
    assert any("guidance_scale is ignored" in w for w in warnings), warnings
    assert max_pixel_diff(image, reference.image) <= IMAGE_TOLERANCE


def test_list_models(stack) -> None:
    with ChituClient(stack.address) as c:
        (entry,) = c.list_models().models
    assert entry.name == MODEL and entry.family == "flux2_klein" and entry.serving
    assert entry.limits.size_multiple == 16 and entry.limits.default_steps == 4


BAD = [
    ({"width": 56}, grpc.StatusCode.INVALID_ARGUMENT, "width=56"),
    ({"height": 0}, grpc.StatusCode.INVALID_ARGUMENT, "height=0"),
    ({"frames": 17}, grpc.StatusCode.INVALID_ARGUMENT, "frames=17"),
    ({"prompt": "red circle " * 40}, grpc.StatusCode.INVALID_ARGUMENT, "tokens"),
]


@pytest.mark.parametrize(("fields", "code", "needle"), BAD, ids=[str(b[0])[:40] for b in BAD])
def test_bad_input(stack, fields: dict, code: grpc.StatusCode, needle: str) -> None:
    request = {"model": MODEL, "prompt": "a red circle", "width": 32, "height": 32, "steps": 2, **fields}
    expect_status(stack, request, code, needle)
    image, _ = generate_image(stack, MODEL, "a small green star", GenerateOptions(width=32, height=32, steps=2))
    assert image.shape == (32, 32, 3)  # still serving
