"""Tiny FLUX.2-klein checkpoint: the real classes (Flux2Transformer2DModel, AutoencoderKLFlux2, Qwen3ForCausalLM,
Qwen2Tokenizer, FlowMatchEulerDiscreteScheduler) at toy sizes, saved as a diffusers folder that
``Flux2KleinPipeline.from_pretrained`` loads. ``distilled=True`` (the default) is FLUX.2-klein-4B (step-distilled:
no CFG); ``distilled=False`` is the klein *base* model, which runs CFG with an empty negative prompt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from services.tiny.qwen import make_qwen_tokenizer, qwen3_config
from services.tiny.real_size import builder_main, building

DEFAULTS = {"width": 64, "height": 64, "steps": 4, "guidance_scale": 1.0, "max_size": 1024}
"""chitu.json of the tiny checkpoint (klein-4B runs 4 steps; guidance is ignored by the distilled model)."""


def flux2_scheduler() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    # FLUX.2-klein's scheduler config (the pipeline passes mu from compute_empirical_mu)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           time_shift_type="exponential")


TRANSFORMER_REAL = {
    "patch_size": 1, "in_channels": 128, "num_layers": 5, "num_single_layers": 20, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 7680, "timestep_guidance_channels": 256, "mlp_ratio": 3.0,
    "axes_dims_rope": (32, 32, 32, 32), "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": False,
}
"""FLUX.2-klein-4B's transformer config (~3.9 B parameters)."""
TRANSFORMER_TINY = {**TRANSFORMER_REAL, "in_channels": 16, "num_layers": 1, "num_single_layers": 2,
                    "attention_head_dim": 16, "num_attention_heads": 2, "timestep_guidance_channels": 32,
                    "mlp_ratio": 2.0, "axes_dims_rope": (4, 4, 4, 4)}
VAE_REAL = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 32,
            "norm_num_groups": 32, "sample_size": 1024, "patch_size": (2, 2), "batch_norm_eps": 1e-4}
"""AutoencoderKLFlux2's config in FLUX.2-klein (16x spatial compression after the 2x2 patchify)."""
VAE_TINY = {**VAE_REAL, "block_out_channels": (8, 16, 16, 16), "layers_per_block": 1, "latent_channels": 4,
            "norm_num_groups": 4, "sample_size": 128}


def real_size_configs() -> dict[str, dict[str, Any]]:
    """FLUX.2-klein-4B's component classes and configs, for building random-weight real-size models on the GPU
    machine (``make_tiny_flux2_klein(dir, real=True)``); not run in CI."""
    return {
        "transformer": {"class": "Flux2Transformer2DModel", "config": dict(TRANSFORMER_REAL)},
        "vae": {"class": "AutoencoderKLFlux2", "config": dict(VAE_REAL)},
        "text_encoder": {"class": "Qwen3ForCausalLM", "config": qwen3_config(0, real=True).to_diff_dict()},
    }


def make_tiny_flux2_klein(out_dir: str | Path, seed: int = 0, max_sequence_length: int = 64,
                          distilled: bool = True, real: bool = False, device: str = "cpu",
                          dtype: torch.dtype = torch.float32) -> Path:
    """Write a tiny random-weight FLUX.2-klein checkpoint folder and return its path (``real=True``: FLUX.2-klein-4B's
    sizes, ~16 GB in bfloat16, for the GPU smoke test)."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3ForCausalLM

    out = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = make_qwen_tokenizer(512 if real else max_sequence_length)
    text_cfg = qwen3_config(vocab=len(tokenizer), real=real)
    with building(dtype, device):
        vae = AutoencoderKLFlux2(**(VAE_REAL if real else VAE_TINY))
        transformer = Flux2Transformer2DModel(**(TRANSFORMER_REAL if real else
                                                 {**TRANSFORMER_TINY, "joint_attention_dim": 3 * text_cfg.hidden_size}))
        text_encoder = Qwen3ForCausalLM(text_cfg)
    # the BatchNorm statistics de-normalise the latents before decoding: make them matter
    vae.bn.running_mean.copy_(torch.randn_like(vae.bn.running_mean) * 0.1)
    vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) + 0.5)
    pipe = Flux2KleinPipeline(
        scheduler=flux2_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
        is_distilled=distilled,
    )
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    defaults = {"width": 1024, "height": 1024, "steps": 4, "guidance_scale": 1.0, "max_size": 2048} if real else DEFAULTS
    (out / "chitu.json").write_text(json.dumps(defaults, indent=2) + "\n")
    return out


def make_tiny_flux2_klein_base(out_dir: str | Path, seed: int = 0, real: bool = False, device: str = "cpu",
                               dtype: torch.dtype = torch.float32) -> Path:
    """The undistilled klein *base* variant (runs CFG with an empty negative prompt when guidance_scale > 1)."""
    out = make_tiny_flux2_klein(out_dir, seed=seed, distilled=False, real=real, device=device, dtype=dtype)
    defaults = json.loads((out / "chitu.json").read_text())
    (out / "chitu.json").write_text(json.dumps({**defaults, "steps": 50 if real else 6, "guidance_scale": 4.0},
                                               indent=2) + "\n")
    return out


if __name__ == "__main__":
    builder_main(make_tiny_flux2_klein, "FLUX.2-klein-4B checkpoint folder with random weights (tiny or --real)")
