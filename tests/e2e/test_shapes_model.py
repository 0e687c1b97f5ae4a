"""The demo model chitu-shapes-flux through the four services: it loads with FluxPipeline and through the stack,
images match (max pixel difference <= 1/255 on CPU fp32, as for every family), and fixed prompts are read back
right by the adherence classifier.

Before the trained checkpoint exists in services/checkpoints, a random-weight model of the same architecture stands
in for the loading and equality tests, and the adherence test judges images rendered from the prompts (a random
model draws noise); with the trained checkpoint it judges what the stack generates.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from services.proto.chitu.v1 import common_pb2
from services.shapes import model as M
from services.shapes.evaluate import classify, load_classifier, targets_of
from services.shapes.render import render, to_uint8
from services.shapes.scenes import Scenes, parse_caption
from tests.e2e.test_flux_true_cfg import pipeline_image, stack_image

pytestmark = pytest.mark.e2e

MODEL = M.CHECKPOINT_NAME
PROMPT = "a large red circle on the left, on a blue background"
TRAINED = (M.CHECKPOINT_DIR / "model_index.json").is_file()

FIXED_PROMPTS = [
    "a large red circle on the left, on a blue background",
    "a small yellow star in the center, on a black background",
    "a large green square at the top, on a white background",
    "a large white triangle at the bottom, on a purple background",
    "a small blue diamond on the right, on a yellow background",
    "a large orange star on the right, on a cyan background",
    "a small pink circle at the top, on a green background",
    "a large black square in the center, on an orange background",
]
"""Prompts of the training distribution (none holds a held-out triple) that the adherence test generates."""
MIN_RIGHT = {"colour": 7, "background": 7, "shape": 6, "position": 6}
"""Of the 8 fixed prompts, how many must be read back right per attribute (issue 7's 90/95/80/80% targets on a
sample of 8)."""


@pytest.fixture(scope="module")
def shapes_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained demo model when the repo has it; else the same architecture with random weights."""
    if TRAINED:
        return M.CHECKPOINT_DIR
    return M.make_random_shapes_flux(tmp_path_factory.mktemp("ckpt") / MODEL, seed=0)


@pytest.fixture(scope="module")
def shapes_stack(shapes_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    from clients.stack import LocalStack, StackConfig

    cfg = StackConfig(checkpoints={MODEL: str(shapes_checkpoint)}, listen="127.0.0.1:0", device="cpu",
                      dtype="float32")
    stack = LocalStack(cfg, workdir=tmp_path_factory.mktemp("stack"))
    stack.start()
    yield stack
    stack.stop()


def test_checkpoint_folder(shapes_checkpoint: Path) -> None:
    """A normal diffusers folder within the size limits, true CFG, 32-token tokenizers, serving defaults."""
    assert M.check_folder_size(shapes_checkpoint) <= M.MAX_FOLDER_BYTES
    index = json.loads((shapes_checkpoint / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert json.loads((shapes_checkpoint / "transformer" / "config.json").read_text())["guidance_embeds"] is False
    for tok in ("tokenizer", "tokenizer_2"):
        assert json.loads((shapes_checkpoint / tok / "tokenizer_config.json").read_text())["model_max_length"] == 32
    defaults = json.loads((shapes_checkpoint / "chitu.json").read_text())
    assert (defaults["width"], defaults["height"], defaults["steps"]) == (128, 128, 20)
    assert defaults["guidance_scale"] >= 1.0


def test_stack_reports_the_demo_defaults(shapes_stack) -> None:
    from clients.client import ChituClient

    with ChituClient(shapes_stack.address) as c:
        (model,) = c.list_models().models
    lim = model.limits
    assert lim.guidance_kind == common_pb2.GUIDANCE_KIND_CFG and lim.max_prompt_tokens == 32
    assert (lim.default_width, lim.default_height, lim.default_steps) == (128, 128, 20)


def test_stack_equals_flux_pipeline(shapes_stack, shapes_checkpoint: Path) -> None:
    """FluxPipeline.from_pretrained loads the checkpoint; the stack's image at the default size and true-CFG
    scale equals the pipeline's."""
    defaults = json.loads((shapes_checkpoint / "chitu.json").read_text())
    ours, _ = stack_image(shapes_stack, MODEL, PROMPT, steps=6, seed=3)
    ref = pipeline_image(shapes_checkpoint, PROMPT, "", defaults["guidance_scale"], steps=6, width=128, height=128,
                         seed=3)
    assert ours.shape == ref.shape == (128, 128, 3) and ref.std() > 1.0
    diff = np.abs(ours.astype(int) - ref.astype(int)).max()
    assert diff <= 1, f"max pixel difference {diff}/255"


def _adherence_images(stack) -> tuple[np.ndarray, Scenes, str]:
    scenes = Scenes.concat([parse_caption(p) for p in FIXED_PROMPTS])
    if TRAINED:
        images = [stack_image(stack, MODEL, p, seed=i)[0] for i, p in enumerate(FIXED_PROMPTS)]
        return np.stack(images), scenes, "generated by the trained checkpoint through the stack"
    return to_uint8(render(scenes)), scenes, "rendered by services.shapes (no trained checkpoint in the repo)"


def test_fixed_prompts_pass_the_adherence_classifier(shapes_stack) -> None:
    images, scenes, source = _adherence_images(shapes_stack)
    preds = classify(load_classifier(), images)
    targets = targets_of(scenes)
    right = {k: int((preds[k] == targets[k]).sum()) for k in MIN_RIGHT}
    assert all(right[k] >= n for k, n in MIN_RIGHT.items()), f"{right} of {len(FIXED_PROMPTS)} ({source})"
