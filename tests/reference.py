"""Single-process references: the family's diffusers pipeline on the same checkpoint and settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def pipeline_text_tokens(checkpoint: Path) -> int:
    """The ``max_sequence_length`` the references hand the diffusers pipelines, read from the checkpoint here rather
    than taken from the adapter under test: every family's pipeline default, 512, capped by the model_max_length of
    its long-text tokenizer (Flux.1's T5 in ``tokenizer_2``, the others' in ``tokenizer``; 64 in the tiny checkpoints)."""
    folder = checkpoint / ("tokenizer_2" if (checkpoint / "tokenizer_2").is_dir() else "tokenizer")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    return min(512, int(config.get("model_max_length", 512)))


def flux_reference(checkpoint: Path, prompt: str, *, width: int, height: int, steps: int, guidance: float, seed: int,
                   output_type: str = "pil"):
    """FluxPipeline in one process: a uint8 [H, W, 3] image, or the packed latents for output_type='latent'."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(checkpoint, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt, width=width, height=height, num_inference_steps=steps, guidance_scale=guidance,
               generator=torch.Generator("cpu").manual_seed(seed),
               max_sequence_length=pipeline_text_tokens(checkpoint), output_type=output_type)
    if output_type == "latent":
        return out.images
    return np.asarray(out.images[0].convert("RGB"))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def wan_reference(checkpoint: Path, prompt: str, *, negative_prompt: str | None, width: int, height: int, frames: int,
                  steps: int, guidance: float, seed: int, guidance_2: float | None = None,
                  output_type: str = "np"):
    """WanPipeline in one process (both experts for a Wan2.2 folder): uint8 frames [F, H, W, 3], rounded as
    diffusers' ``numpy_to_pil`` does, or the latents for output_type='latent'."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(checkpoint, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    extra = {} if guidance_2 is None else {"guidance_scale_2": guidance_2}
    out = pipe(prompt, negative_prompt=negative_prompt, width=width, height=height, num_frames=frames,
               num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(seed),
               max_sequence_length=pipeline_text_tokens(checkpoint), output_type=output_type, **extra)
    if output_type == "latent":
        return out.frames
    return (out.frames[0] * 255).round().astype(np.uint8)
