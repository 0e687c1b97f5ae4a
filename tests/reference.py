"""Single-process references: the family's diffusers pipeline on the same checkpoint and settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def flux_reference(checkpoint: Path, prompt: str, *, width: int, height: int, steps: int, guidance: float, seed: int,
                   output_type: str = "pil"):
    """FluxPipeline in one process: a uint8 [H, W, 3] image, or the packed latents for output_type='latent'."""
    from diffusers import FluxPipeline

    from services.families.flux import FluxAdapter

    pipe = FluxPipeline.from_pretrained(checkpoint, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt, width=width, height=height, num_inference_steps=steps, guidance_scale=guidance,
               generator=torch.Generator("cpu").manual_seed(seed),
               max_sequence_length=FluxAdapter(checkpoint).max_sequence_length, output_type=output_type)
    if output_type == "latent":
        return out.images
    return np.asarray(out.images[0].convert("RGB"))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
