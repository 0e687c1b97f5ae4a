"""Tiny Flux.1 checkpoint: the real classes (FluxTransformer2DModel, AutoencoderKL with 8x downsampling,
CLIPTextModel, T5EncoderModel, FlowMatchEulerDiscreteScheduler) at toy sizes, saved as a diffusers folder that
``FluxPipeline.from_pretrained`` loads.

Two variants: guidance-distilled (``guidance_embeds=True``, like Flux.1-dev: guidance_scale is a transformer input)
and true CFG (``true_cfg=True``: ``guidance_embeds=False``, served like FluxPipeline's ``true_cfg_scale`` with a
negative prompt). The component builders also make the trained demo model (``services.shapes.model``)."""

from __future__ import annotations

from pathlib import Path

import torch

from services.tiny.tokenizers import make_clip_tokenizer, make_t5_tokenizer


def flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # Flux.1-dev's scheduler config
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )


def flux_vae(latent_channels: int = 4, widths: tuple[int, ...] = (8, 16, 16, 16), groups: int = 4,
             layers_per_block: int = 1):
    from diffusers import AutoencoderKL

    n = len(widths)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=widths,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=layers_per_block, norm_num_groups=groups, sample_size=128,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
        force_upcast=True,
    )


def clip_text_encoder(hidden: int = 32, layers: int = 2, heads: int = 2, projection: int = 32, vocab: int = 0,
                      max_positions: int = 77):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=max_positions, projection_dim=projection,
                         bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1, hidden_act="quick_gelu")
    return CLIPTextModel(cfg)


def t5_text_encoder(d_model: int = 32, layers: int = 2, heads: int = 4, vocab: int = 0, dropout: float = 0.1):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=vocab, d_model=d_model, d_kv=d_model // heads, d_ff=d_model * 2, num_layers=layers,
                   num_heads=heads, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                   feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_encoder_decoder=False,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, dropout_rate=dropout)
    return T5EncoderModel(cfg)


def flux_transformer(latent_channels: int = 4, layers: int = 1, single_layers: int = 2, heads: int = 2,
                     head_dim: int = 16, text_dim: int = 32, pooled_dim: int = 32, guidance: bool = True,
                     axes: tuple[int, int, int] = (4, 6, 6)):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=latent_channels * 4, out_channels=None, num_layers=layers,
        num_single_layers=single_layers, attention_head_dim=head_dim, num_attention_heads=heads,
        joint_attention_dim=text_dim, pooled_projection_dim=pooled_dim, guidance_embeds=guidance,
        axes_dims_rope=axes,
    )


def real_size_configs() -> dict[str, dict]:
    """Flux.1-dev's component sizes (random weights for the GPU smoke run): a 12 B transformer, CLIP-L, T5-XXL and the
    16-channel VAE. The in-memory tokenizers stay small; the embedding tables have the released vocabulary sizes."""
    return {
        "transformer": {"latent_channels": 16, "layers": 19, "single_layers": 38, "heads": 24, "head_dim": 128,
                        "text_dim": 4096, "pooled_dim": 768, "guidance": True, "axes": (16, 56, 56)},
        "vae": {"latent_channels": 16, "widths": (128, 256, 512, 512), "groups": 32},
        "text_encoder": {"hidden": 768, "layers": 12, "heads": 12, "projection": 768, "vocab": 49408},
        "text_encoder_2": {"d_model": 4096, "layers": 24, "heads": 64, "vocab": 32128, "d_ff": 10240, "d_kv": 64},
    }


def make_tiny_flux(out_dir: str | Path, seed: int = 0, max_sequence_length: int = 64, true_cfg: bool = False,
                   real: bool = False, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Path:
    """Write a tiny random-weight Flux.1 checkpoint folder and return its path; ``true_cfg`` builds the transformer
    without guidance embeddings (served with true classifier-free guidance); ``real`` builds Flux.1-dev's sizes
    (about 33 GB in bfloat16; initialise on a GPU)."""
    from diffusers import FluxPipeline

    from services.tiny.real_size import building

    out = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = make_clip_tokenizer(77)
    tokenizer_2 = make_t5_tokenizer(512 if real else max_sequence_length)
    if real:
        cfg = real_size_configs()
        t5 = cfg["text_encoder_2"]
        with building(dtype, device):
            from transformers import T5Config, T5EncoderModel

            text_encoder_2 = T5EncoderModel(T5Config(
                vocab_size=t5["vocab"], d_model=t5["d_model"], d_kv=t5["d_kv"], d_ff=t5["d_ff"],
                num_layers=t5["layers"], num_heads=t5["heads"], feed_forward_proj="gated-gelu",
                dense_act_fn="gelu_new", is_encoder_decoder=False, pad_token_id=0, eos_token_id=1))
            components = {"vae": flux_vae(**cfg["vae"]), "text_encoder": clip_text_encoder(**cfg["text_encoder"]),
                          "text_encoder_2": text_encoder_2,
                          "transformer": flux_transformer(**{**cfg["transformer"], "guidance": not true_cfg})}
    else:
        components = {"vae": flux_vae(), "text_encoder": clip_text_encoder(vocab=len(tokenizer)),
                      "text_encoder_2": t5_text_encoder(vocab=len(tokenizer_2)),
                      "transformer": flux_transformer(guidance=not true_cfg)}
    pipe = FluxPipeline(scheduler=flux_scheduler(), tokenizer=tokenizer, tokenizer_2=tokenizer_2, **components)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


if __name__ == "__main__":
    from services.tiny.real_size import builder_main

    builder_main(make_tiny_flux, "Flux.1-dev checkpoint folder with random weights (tiny, or --real sizes)")
