"""Tiny Z-Image checkpoint: the real classes (ZImageTransformer2DModel, AutoencoderKL, Qwen3Model, Qwen2Tokenizer,
FlowMatchEulerDiscreteScheduler) at toy sizes, saved as a diffusers folder that ``ZImagePipeline.from_pretrained``
loads. The scheduler is Z-Image-Turbo's (static shift 3)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from services.tiny.qwen import make_qwen_tokenizer, qwen3_config
from services.tiny.real_size import builder_main, building

DEFAULTS = {"width": 64, "height": 64, "steps": 8, "guidance_scale": 0.0, "max_size": 1024}
"""chitu.json of the tiny checkpoint (Z-Image-Turbo runs 8 steps without CFG: guidance 0)."""

SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
"""Z-Image-Turbo's scheduler config."""

TRANSFORMER_REAL = {"all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 3840, "n_layers": 30,
                    "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5, "qk_norm": True,
                    "cap_feat_dim": 2560, "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [32, 48, 48],
                    "axes_lens": [1536, 512, 512]}
"""Z-Image(-Turbo)'s transformer config (~6 B parameters)."""
TRANSFORMER_TINY = {**TRANSFORMER_REAL, "in_channels": 4, "dim": 32, "n_layers": 2, "n_refiner_layers": 1,
                    "n_heads": 2, "n_kv_heads": 2, "cap_feat_dim": 16, "axes_dims": [4, 6, 6],
                    "axes_lens": [256, 128, 128]}

VAE_REAL = {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": (128, 256, 512, 512),
            "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
            "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.3611,
            "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False, "force_upcast": True}
"""Z-Image's AutoencoderKL (the Flux.1 VAE: 8x compression, 16 channels)."""
VAE_TINY = {**VAE_REAL, "latent_channels": 4, "block_out_channels": (8, 16, 16, 16), "layers_per_block": 1,
            "norm_num_groups": 4, "sample_size": 128}


def real_size_configs() -> dict[str, dict[str, Any]]:
    """Z-Image-Turbo's component classes and configs, for random-weight real-size models on the GPU machine
    (``make_tiny_z_image(dir, real=True)``, ~20 GB in bfloat16); not run in CI."""
    return {
        "transformer": {"class": "ZImageTransformer2DModel", "config": dict(TRANSFORMER_REAL)},
        "vae": {"class": "AutoencoderKL", "config": dict(VAE_REAL)},
        "text_encoder": {"class": "Qwen3Model", "config": qwen3_config(0, real=True).to_diff_dict()},
        "scheduler": {"class": "FlowMatchEulerDiscreteScheduler", "config": dict(SCHEDULER)},
    }


def make_tiny_z_image(out_dir: str | Path, seed: int = 0, max_sequence_length: int = 64, real: bool = False,
                      device: str = "cpu", dtype: torch.dtype = torch.float32) -> Path:
    """Write a tiny random-weight Z-Image checkpoint folder and return its path (``real=True``: Z-Image-Turbo's
    sizes, ~20 GB in bfloat16)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Model

    out = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = make_qwen_tokenizer(512 if real else max_sequence_length)
    text_cfg = qwen3_config(vocab=len(tokenizer), layers=2, real=real)
    with building(dtype, device):
        vae = AutoencoderKL(**(VAE_REAL if real else VAE_TINY))
        transformer = ZImageTransformer2DModel(**(TRANSFORMER_REAL if real else
                                                  {**TRANSFORMER_TINY, "cap_feat_dim": text_cfg.hidden_size}))
        text_encoder = Qwen3Model(text_cfg)
    with torch.no_grad():  # the pad tokens replace the padding of caption and image sequences: make them matter
        transformer.x_pad_token.normal_(0.0, 0.5)
        transformer.cap_pad_token.normal_(0.0, 0.5)
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=text_encoder,
                          tokenizer=tokenizer, transformer=transformer)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    defaults = {"width": 1024, "height": 1024, "steps": 8, "guidance_scale": 0.0, "max_size": 2048} if real else DEFAULTS
    (out / "chitu.json").write_text(json.dumps(defaults, indent=2) + "\n")
    return out


if __name__ == "__main__":
    builder_main(make_tiny_z_image, "Z-Image(-Turbo) checkpoint folder with random weights (tiny or --real)")
