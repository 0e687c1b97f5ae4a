"""Tiny Qwen-Image checkpoint: the real classes (QwenImageTransformer2DModel, AutoencoderKLQwenImage,
Qwen2_5_VLForConditionalGeneration with a one-block vision tower, Qwen2Tokenizer, FlowMatchEulerDiscreteScheduler)
at toy sizes, saved as a diffusers folder that ``QwenImagePipeline.from_pretrained`` loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from services.tiny.qwen import make_qwen_tokenizer
from services.tiny.real_size import builder_main, building

DEFAULTS = {"width": 64, "height": 64, "steps": 6, "guidance_scale": 4.0, "max_size": 1024}
"""chitu.json of the tiny checkpoint (Qwen-Image's true_cfg_scale default is 4)."""

SCHEDULER = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5,
             "max_shift": 0.9, "base_image_seq_len": 256, "max_image_seq_len": 8192, "shift_terminal": 0.02,
             "time_shift_type": "exponential"}
"""Qwen-Image's scheduler config."""

TRANSFORMER_REAL = {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
                    "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False,
                    "axes_dims_rope": (16, 56, 56)}
"""Qwen-Image's transformer config (~20 B parameters)."""
TRANSFORMER_TINY = {**TRANSFORMER_REAL, "in_channels": 16, "out_channels": 4, "num_layers": 2, "attention_head_dim": 16,
                    "num_attention_heads": 2, "joint_attention_dim": 32, "axes_dims_rope": (4, 6, 6)}

VAE_REAL: dict[str, Any] = {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                            "attn_scales": [], "temperal_downsample": [False, True, True]}
"""AutoencoderKLQwenImage's config (8x spatial compression; latents_mean/std are the class defaults)."""
VAE_TINY: dict[str, Any] = {**VAE_REAL, "base_dim": 8, "z_dim": 4, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1}

TEXT_REAL = {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
             "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 128000,
             "rms_norm_eps": 1e-6,
             "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1_000_000.0}}
"""Qwen2.5-VL-7B-Instruct's text model."""
VISION_REAL = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
               "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
               "fullatt_block_indexes": [7, 15, 23, 31]}
"""Qwen2.5-VL-7B-Instruct's vision tower (loaded by the pipeline's class, unused for text-to-image)."""
TEXT_TINY = {**TEXT_REAL, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 1, "max_position_embeddings": 2048,
             "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1_000_000.0}}
VISION_TINY = {**VISION_REAL, "depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
               "out_hidden_size": 32, "fullatt_block_indexes": [0]}


def text_encoder_config(vocab: int, real: bool = False) -> Any:
    """Qwen2.5-VL config; the four vision marker ids sit right after the tokenizer's vocabulary."""
    from transformers import Qwen2_5_VLConfig

    if real:
        return Qwen2_5_VLConfig(text_config={**TEXT_REAL, "bos_token_id": 151643, "eos_token_id": 151645},
                                vision_config=dict(VISION_REAL))
    return Qwen2_5_VLConfig(text_config={**TEXT_TINY, "vocab_size": vocab + 4, "bos_token_id": None,
                                         "eos_token_id": None, "pad_token_id": None},
                            vision_config=dict(VISION_TINY), image_token_id=vocab, video_token_id=vocab + 1,
                            vision_start_token_id=vocab + 2, vision_end_token_id=vocab + 3)


def real_size_configs() -> dict[str, dict[str, Any]]:
    """Qwen-Image's component classes and configs, for random-weight real-size models on the GPU machine
    (``make_tiny_qwen_image(dir, real=True)``, ~58 GB in bfloat16); not run in CI."""
    return {
        "transformer": {"class": "QwenImageTransformer2DModel", "config": dict(TRANSFORMER_REAL)},
        "vae": {"class": "AutoencoderKLQwenImage", "config": dict(VAE_REAL)},
        "text_encoder": {"class": "Qwen2_5_VLForConditionalGeneration",
                         "config": {"text_config": dict(TEXT_REAL), "vision_config": dict(VISION_REAL)}},
        "scheduler": {"class": "FlowMatchEulerDiscreteScheduler", "config": dict(SCHEDULER)},
    }


def make_tiny_qwen_image(out_dir: str | Path, seed: int = 0, real: bool = False, device: str = "cpu",
                         dtype: torch.dtype = torch.float32) -> Path:
    """Write a tiny random-weight Qwen-Image checkpoint folder and return its path (``real=True``: Qwen-Image's
    sizes, ~58 GB in bfloat16)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = make_qwen_tokenizer(1024 if real else 128, chat_template=None)
    vae_cfg = VAE_REAL if real else VAE_TINY
    if not real:  # per-channel latent statistics of the right length (the class defaults have 16)
        g = torch.Generator().manual_seed(seed)
        vae_cfg = {**vae_cfg, "latents_mean": (torch.randn(vae_cfg["z_dim"], generator=g) * 0.5).tolist(),
                   "latents_std": (torch.rand(vae_cfg["z_dim"], generator=g) + 0.5).tolist()}
    with building(dtype, device):
        vae = AutoencoderKLQwenImage(**vae_cfg)
        transformer = QwenImageTransformer2DModel(**(TRANSFORMER_REAL if real else TRANSFORMER_TINY))
        text_encoder = Qwen2_5_VLForConditionalGeneration(text_encoder_config(len(tokenizer), real=real))
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=text_encoder,
                             tokenizer=tokenizer, transformer=transformer)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    defaults = {"width": 1024, "height": 1024, "steps": 50, "guidance_scale": 4.0, "max_size": 2048} if real else DEFAULTS
    (out / "chitu.json").write_text(json.dumps(defaults, indent=2) + "\n")
    return out


if __name__ == "__main__":
    builder_main(make_tiny_qwen_image, "Qwen-Image checkpoint folder with random weights (tiny or --real)")
