"""Wan checkpoints built from configs: tiny random-weight Wan2.1 / Wan2.2 folders for tests, and the real-size
configs of Wan2.1-T2V-1.3B, Wan2.1-T2V-14B and Wan2.2-T2V-A14B for the GPU smoke run (random weights).

Real classes throughout (WanTransformer3DModel, AutoencoderKLWan, UMT5EncoderModel, UniPCMultistepScheduler),
saved as a diffusers folder that ``WanPipeline.from_pretrained`` loads. Each component is seeded on its own
(text encoder ``seed``, VAE ``seed + 1``, transformers ``seed + 2`` / ``seed + 3``), so the tiny Wan2.1 and Wan2.2
checkpoints of one seed have byte-identical text encoders and VAEs: ``chitu up`` serves both from one encoder
and one VAE (shared pools).
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from services.tiny.tokenizers import make_t5_tokenizer

Variant = Literal["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.2-t2v-a14b"]

# Wan2.1 Diffusers releases: UniPC in flow mode, shift 3.0 (480p)
_UNIPC = {"num_train_timesteps": 1000, "prediction_type": "flow_prediction", "use_flow_sigmas": True,
          "flow_shift": 3.0, "solver_order": 2, "solver_type": "bh2", "lower_order_final": True,
          "final_sigmas_type": "zero", "predict_x0": True, "beta_start": 0.0001, "beta_end": 0.02,
          "beta_schedule": "linear", "timestep_spacing": "linspace"}

_UMT5_XXL = {"vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
             "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
             "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "layer_norm_epsilon": 1e-6,
             "tie_word_embeddings": False, "is_encoder_decoder": False, "pad_token_id": 0, "eos_token_id": 1,
             "decoder_start_token_id": 0}

_WAN_T2V_1_3B = {"patch_size": [1, 2, 2], "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16,
                 "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30,
                 "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024}
_WAN_T2V_14B = {**_WAN_T2V_1_3B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}

_WAN_VAE = {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
            "temperal_downsample": [False, True, True]}  # latents_mean/std: the class defaults (the released values)


def tiny_configs(two_experts: bool = False, max_sequence_length: int = 64) -> dict[str, Any]:
    """Toy sizes of every component: a 32x32 x 5-frame video runs 3 steps in well under a second on a CPU."""
    # head dim 16: the smallest the GPU kernels take (power-of-two head dims: norm_rope, merged cross-attention)
    transformer = {"patch_size": [1, 2, 2], "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4,
                   "out_channels": 4, "text_dim": 32, "freq_dim": 32, "ffn_dim": 32, "num_layers": 2,
                   "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 64}
    return {
        "transformer": transformer,
        "transformer_2": copy.deepcopy(transformer) if two_experts else None,
        "boundary_ratio": 0.875 if two_experts else None,
        "vae": {"base_dim": 8, "z_dim": 4, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_scales": [],
                "temperal_downsample": [False, True, True], "latents_mean": [0.1, -0.2, 0.3, 0.0],
                "latents_std": [1.5, 2.0, 1.2, 0.8]},
        "text_encoder": {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
                         "relative_attention_num_buckets": 8, "relative_attention_max_distance": 32,
                         "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_encoder_decoder": False,
                         "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0},
        "scheduler": dict(_UNIPC),
        "tokenizer_max_length": max_sequence_length,
        "defaults": {"width": 32, "height": 32, "frames": 5, "steps": 3, "guidance_scale": 5.0, "max_size": 256,
                     "max_frames": 33, "fps": 16},
    }


def real_size_configs(variant: Variant) -> dict[str, Any]:
    """The released architectures (configs of the Wan-AI ``*-Diffusers`` repositories) for a random-weight smoke
    run at the native 480p x 81 frames; not built in CI (Wan2.1-14B and each Wan2.2 expert are 14B parameters)."""
    if variant == "wan2.1-t2v-1.3b":
        transformer, transformer_2, ratio, scheduler, steps, guidance = _WAN_T2V_1_3B, None, None, _UNIPC, 50, 5.0
    elif variant == "wan2.1-t2v-14b":
        transformer, transformer_2, ratio, scheduler, steps, guidance = _WAN_T2V_14B, None, None, _UNIPC, 50, 5.0
    elif variant == "wan2.2-t2v-a14b":
        # the release's t2v-A14B settings: boundary 0.875, shift 12, 40 steps, guidance (4.0 high, 3.0 low noise)
        transformer, transformer_2, ratio = _WAN_T2V_14B, _WAN_T2V_14B, 0.875
        scheduler, steps, guidance = {**_UNIPC, "flow_shift": 12.0}, 40, 4.0
    else:
        raise ValueError(f"unknown Wan variant {variant!r}; known: wan2.1-t2v-1.3b, wan2.1-t2v-14b, wan2.2-t2v-a14b")
    return {
        "transformer": dict(transformer),
        "transformer_2": dict(transformer_2) if transformer_2 else None,
        "boundary_ratio": ratio,
        "vae": dict(_WAN_VAE),
        "text_encoder": dict(_UMT5_XXL),
        "scheduler": dict(scheduler),
        "tokenizer_max_length": 512,
        "defaults": {"width": 832, "height": 480, "frames": 81, "steps": steps, "guidance_scale": guidance,
                     "max_size": 1280, "fps": 16},
    }


@contextlib.contextmanager
def _building(dtype: torch.dtype, device: str | torch.device) -> Iterator[None]:
    """Construct modules directly in ``dtype`` on ``device`` (a 14B model never exists in float32 on the host)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_wan(out_dir: str | Path, configs: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu", link_experts: bool = False) -> Path:
    """Write a random-weight WanPipeline folder from ``configs`` (``tiny_configs`` / ``real_size_configs``).

    ``link_experts``: ``transformer_2`` becomes a symlink to ``transformer`` (same random weights), so a real-size
    Wan2.2 folder needs 28 GB of disk for its experts instead of 56 (timings and memory are the same).
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    out = Path(out_dir)
    tokenizer = make_t5_tokenizer(configs["tokenizer_max_length"])
    te_cfg = dict(configs["text_encoder"])
    te_cfg.setdefault("vocab_size", len(tokenizer))
    with _building(dtype, device):
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(UMT5Config(**te_cfg))
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLWan(**configs["vae"])
        torch.manual_seed(seed + 2)
        transformer = WanTransformer3DModel(**configs["transformer"])
        transformer_2 = None
        if configs.get("transformer_2"):
            if link_experts and configs["transformer_2"] != configs["transformer"]:
                raise ValueError("link_experts needs both experts to have the same config")
            torch.manual_seed(seed + 3)
            transformer_2 = transformer if link_experts else WanTransformer3DModel(**configs["transformer_2"])
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                       scheduler=UniPCMultistepScheduler(**configs["scheduler"]), transformer=transformer,
                       transformer_2=transformer_2, boundary_ratio=configs.get("boundary_ratio"))
    out.mkdir(parents=True, exist_ok=True)
    if link_experts and transformer_2 is not None:
        pipe.transformer_2 = None  # saved once, then linked
        pipe.save_pretrained(out, safe_serialization=True)
        (out / "transformer_2").symlink_to("transformer", target_is_directory=True)
        index = json.loads((out / "model_index.json").read_text())
        index["transformer_2"] = index["transformer"]
        (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    else:
        pipe.save_pretrained(out, safe_serialization=True)
    (out / "chitu.json").write_text(json.dumps(configs["defaults"], indent=2) + "\n")
    return out


def make_tiny_wan(out_dir: str | Path, seed: int = 0) -> Path:
    """Tiny Wan2.1-T2V: one transformer."""
    return build_wan(out_dir, tiny_configs(two_experts=False), seed=seed)


def make_tiny_wan22(out_dir: str | Path, seed: int = 0) -> Path:
    """Tiny Wan2.2-T2V-A14B layout: transformer (high noise) + transformer_2 (low noise) + boundary_ratio."""
    return build_wan(out_dir, tiny_configs(two_experts=True), seed=seed)


def main(argv: list[str] | None = None) -> None:
    """``python -m services.tiny.wan VARIANT DIR``: a real-size random-weight folder (GPU smoke run)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("variant", choices=["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.2-t2v-a14b"])
    parser.add_argument("dir")
    parser.add_argument("--device", default="cuda", help="where the weights are initialised (default cuda)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--link-experts", action="store_true", help="Wan2.2: transformer_2 -> transformer symlink")
    args = parser.parse_args(argv)
    build_wan(args.dir, real_size_configs(args.variant), dtype=getattr(torch, args.dtype), device=args.device,
              link_experts=args.link_experts)
    print(args.dir)


if __name__ == "__main__":
    main()
