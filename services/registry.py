"""Model registry: which family adapter serves a checkpoint folder, and which stage loads which components.

A checkpoint is a diffusers-format folder; its family is read from ``model_index.json`` (``_class_name``).
"""

from __future__ import annotations

import json
from pathlib import Path

from services.errors import InvalidArgument
from services.families.base import FamilyAdapter
from services.families.flux import FluxAdapter
from services.families.flux2_klein import Flux2KleinAdapter
from services.families.qwen_image import QwenImageAdapter
from services.families.wan import WanAdapter
from services.families.z_image import ZImageAdapter

ADAPTERS: tuple[type[FamilyAdapter], ...] = (FluxAdapter, WanAdapter, Flux2KleinAdapter, QwenImageAdapter,
                                              ZImageAdapter)
"""Every supported family, one adapter class each."""

STAGES = ("encoder", "denoiser", "vae")


def families() -> dict[str, type[FamilyAdapter]]:
    return {cls.family: cls for cls in ADAPTERS}


def adapter_class_for_pipeline(pipeline_class: str) -> type[FamilyAdapter]:
    for cls in ADAPTERS:
        if pipeline_class in cls.pipeline_classes:
            return cls
    known = sorted(p for cls in ADAPTERS for p in cls.pipeline_classes)
    raise InvalidArgument(f"pipeline class {pipeline_class!r} is not supported; supported: {known}")


def load_adapter(checkpoint: str | Path) -> FamilyAdapter:
    """The adapter for a checkpoint folder (reads model_index.json only)."""
    path = Path(checkpoint)
    index = path / "model_index.json"
    if not index.is_file():
        raise InvalidArgument(f"{path} is not a diffusers checkpoint folder (no model_index.json)")
    pipeline_class = json.loads(index.read_text()).get("_class_name", "")
    return adapter_class_for_pipeline(pipeline_class)(path)


def family_of(checkpoint: str | Path) -> str:
    return load_adapter(checkpoint).family
