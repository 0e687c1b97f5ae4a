"""A 480p x 81-frame Wan video decoded within a memory budget on the GPU (run on the GPU machine:
``python -m pytest -m gpu tests/gpu/test_wan_vae_gpu.py -s``).

The real-size Wan VAE (random weights, the released config) decodes once untiled to measure its peak; then the
VAE service's memory budget is set to half that peak and ``tiling.mode=auto`` must fall back to tiles (the
allocator refuses the untiled decode) and stay under the budget. The tiled video is blended tiles of a random-weight
decoder, so it is compared loosely (see tests/unit/test_vae_tiling.py for why tiles differ and the exact test).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from services.config import ModelConfig
from services.families.base import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

MIB = 1024 * 1024


def _vae_only_folder(root: Path) -> Path:
    """A WanPipeline folder with the real-size VAE (weights) and the transformer/scheduler configs only: all the
    VAE service reads."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler

    from services.tiny.wan import real_size_configs

    cfg = real_size_configs("wan2.1-t2v-1.3b")
    folder = root / "wan-vae"
    torch.manual_seed(0)
    AutoencoderKLWan(**cfg["vae"]).save_pretrained(folder / "vae")
    UniPCMultistepScheduler(**cfg["scheduler"]).save_pretrained(folder / "scheduler")
    (folder / "transformer").mkdir()
    (folder / "transformer" / "config.json").write_text(json.dumps(
        {"_class_name": "WanTransformer3DModel", **cfg["transformer"]}))
    (folder / "chitu.json").write_text(json.dumps(cfg["defaults"]))
    index = {"_class_name": "WanPipeline", "_diffusers_version": "0.42.1", "boundary_ratio": None,
             "expand_timesteps": False, "scheduler": ["diffusers", "UniPCMultistepScheduler"],
             "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"],
             "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": [None, None],
             "vae": ["diffusers", "AutoencoderKLWan"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_480p_81_frames_decode_within_budget(tmp_path: Path) -> None:
    from vae_svc.config import VaeServiceConfig
    from vae_svc.server import VaeServicer
    from vae_svc.tiling import limit_process_memory

    folder = _vae_only_folder(tmp_path)
    servicer = VaeServicer(VaeServiceConfig(model=ModelConfig(checkpoint=str(folder), device="cuda",
                                                              dtype="bfloat16")))
    asyncio.run(servicer.load())
    device = torch.device("cuda", torch.cuda.current_device())
    params = SamplingParams(width=832, height=480, steps=1, guidance_scale=0.0, seed=0, frames=81)
    latents = torch.randn(servicer.adapter.latent_shape(params), generator=torch.Generator().manual_seed(0))

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    untiled, tiled = servicer._decode(latents, params)
    peak_untiled = torch.cuda.max_memory_allocated()
    assert not tiled and tuple(untiled.shape) == (81, 480, 832, 3)

    budget_mb = int(peak_untiled / MIB / 2)
    torch.cuda.empty_cache()
    limit_process_memory(device, budget_mb)
    servicer.config.memory_budget_mb = budget_mb
    servicer.tile_for_size.clear()
    torch.cuda.reset_peak_memory_stats()
    try:
        frames, tiled = servicer._decode(latents, params)
        peak_tiled = torch.cuda.max_memory_allocated()
    finally:
        limit_process_memory(device, 10**9)  # lift the cap for the rest of the session
    print(f"untiled peak {peak_untiled / MIB:.0f} MiB; budget {budget_mb} MiB; tiled peak {peak_tiled / MIB:.0f} "
          f"MiB with {servicer.tile_for_size} px tiles")
    assert tiled and peak_tiled <= budget_mb * MIB
    assert tuple(frames.shape) == (81, 480, 832, 3)
    assert (frames.float() - untiled.float()).abs().mean() < 0.3 * untiled.float().std()
