"""Loading helpers shared by the family adapters: partial pipelines, checkpoint defaults, VAE scale factors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from services.families.base import FamilyAdapter

DEFAULTS_FILE = "chitu.json"
"""Optional file in a checkpoint folder with serving defaults: width, height, frames, steps, guidance_scale,
max_size. Tiny and trained checkpoints write it so that their defaults fit their size."""


def checkpoint_defaults(checkpoint: Path) -> dict[str, Any]:
    path = Path(checkpoint) / DEFAULTS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def vae_scale_factor(adapter: FamilyAdapter, component: str = "vae") -> int:
    """2 ** (number of VAE blocks - 1), read from the VAE's config as the pipelines do (8 when absent)."""
    try:
        cfg = adapter.component_config(component)
    except FileNotFoundError:
        return 8
    return 2 ** (len(cfg["block_out_channels"]) - 1)


def load_partial_pipeline(adapter: FamilyAdapter, keep: tuple[str, ...], dtype: torch.dtype, device: torch.device,
                          pipeline_class: str | None = None) -> Any:
    """Load the family's diffusers pipeline with only the ``keep`` components (the rest passed as None)."""
    import diffusers

    cls_name = pipeline_class or adapter.model_index["_class_name"]
    cls = getattr(diffusers, cls_name)
    skip = {name: None for name, entry in adapter.model_index.items()
            if not name.startswith("_") and isinstance(entry, list) and name not in keep}
    pipe = cls.from_pretrained(adapter.checkpoint, dtype=dtype, **skip)
    pipe.set_progress_bar_config(disable=True)
    for name in keep:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            module.to(device)
            module.eval()
            module.requires_grad_(False)
    return pipe
