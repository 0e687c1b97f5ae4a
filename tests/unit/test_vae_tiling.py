"""Tiled VAE decode (vae_svc.tiling) against the untiled decode of the same tiny Wan VAE.

Why tiles differ at all: every tile is decoded alone, so its convolutions see zero padding where the neighbouring
latents would be, and the decoder's mid-block attention (global over a frame) sees only the tile; diffusers blends
overlapping tiles linearly to hide seams. So the test has two parts:

1. Exactness of the tiling itself (tile placement, strides, crops, blending, the causal temporal cache per tile):
   with the decoder made spatially pointwise (3x3 kernels reduced to their centre tap, attention output zeroed so
   the block is the identity; temporal taps kept), every pixel's value no longer depends on its neighbours, so a
   correctly assembled tiled decode must equal the untiled one: frames within 1/255 (in practice identical).
2. The real random-weight VAE: tiles change values (random weights have no reason to be local), so the bound is
   that the tiled video is still the same picture (mean error well below the image's contrast) and that the error
   shrinks as tiles grow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock

from services.families.base import SamplingParams
from services.registry import load_adapter
from vae_svc.tiling import set_tiling, tile_sizes, tiling

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def wan_vae(tiny_wan: Path):
    adapter = load_adapter(tiny_wan)
    return adapter, adapter.load_vae(torch.float32, CPU)


def _decode(adapter, model, latents, params, tile: int | None) -> tuple[np.ndarray, int]:
    calls = []
    hook = model.vae.decoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        with tiling(model.vae, tile, overlap=0.25):
            frames = adapter.decode(model, latents, params).numpy().astype(int)
    finally:
        hook.remove()
    return frames, len(calls)


def _latents(adapter, params: SamplingParams) -> torch.Tensor:
    return torch.randn(adapter.latent_shape(params), generator=torch.Generator().manual_seed(0))


def test_tiling_is_exact_for_a_pointwise_decoder(tiny_wan: Path) -> None:
    adapter = load_adapter(tiny_wan)
    model = adapter.load_vae(torch.float32, CPU)
    with torch.no_grad():
        for mod in model.vae.decoder.modules():
            if isinstance(mod, WanAttentionBlock):
                mod.proj.weight.zero_()
                mod.proj.bias.zero_()
            elif isinstance(mod, (torch.nn.Conv2d, torch.nn.Conv3d)) and mod.weight.shape[-1] == 3:
                centre = mod.weight[..., 1:2, 1:2].clone()
                mod.weight.zero_()
                mod.weight[..., 1:2, 1:2] = centre
    params = SamplingParams(width=96, height=128, steps=1, guidance_scale=0.0, seed=0, frames=5)
    latents = _latents(adapter, params)
    ref, untiled_calls = _decode(adapter, model, latents, params, None)
    assert ref.std() > 1.0, "the decoded video is flat: the comparison would prove nothing"
    for tile in (48, 64):
        ours, tiled_calls = _decode(adapter, model, latents, params, tile)
        assert tiled_calls > 3 * untiled_calls, "the tiled path did not run"
        assert np.abs(ours - ref).max() <= 1, f"tile {tile}"


def test_tiled_random_vae_stays_close_and_improves_with_tile_size(wan_vae) -> None:
    adapter, model = wan_vae
    params = SamplingParams(width=96, height=96, steps=1, guidance_scale=0.0, seed=0, frames=5)
    latents = _latents(adapter, params)
    ref, _ = _decode(adapter, model, latents, params, None)
    errors = {tile: float(np.abs(_decode(adapter, model, latents, params, tile)[0] - ref).mean()) for tile in (48, 64)}
    # measured on this tiny random VAE at 96x96: ~8.4/255 (48 px tiles) and ~5.6/255 (64 px) mean abs error, vs a
    # contrast (std) of ~45/255; bound at 12/255, and bigger tiles (more context per pixel) must be closer
    assert errors[48] < 12.0 and errors[64] < errors[48], errors
    assert errors[48] < 0.3 * ref.std()


def test_untiled_after_tiling(wan_vae) -> None:
    """``tiling`` switches tiling off again: the next decode is the untiled one, bit for bit."""
    adapter, model = wan_vae
    params = SamplingParams(width=96, height=96, steps=1, guidance_scale=0.0, seed=0, frames=1)
    latents = _latents(adapter, params)
    ref, _ = _decode(adapter, model, latents, params, None)
    _decode(adapter, model, latents, params, 48)
    assert not model.vae.use_tiling
    again, _ = _decode(adapter, model, latents, params, None)
    assert np.array_equal(again, ref)


def test_autoencoder_kl_style_settings(tiny_flux: Path) -> None:
    """AutoencoderKL (Flux) tiles by one square size and an overlap factor; set_tiling fills those."""
    vae = load_adapter(tiny_flux).load_vae(torch.float32, CPU).vae
    set_tiling(vae, 64, overlap=0.25)
    assert vae.use_tiling and vae.tile_sample_min_size == 64 and vae.tile_latent_min_size == 8
    assert vae.tile_overlap_factor == pytest.approx(0.25)
    set_tiling(vae, None)
    assert not vae.use_tiling


def test_tile_sizes() -> None:
    assert tile_sizes(256, 64, 8) == [256, 128, 64]
    assert tile_sizes(200, 64, 16) == [192, 96]


def test_qwen_image_vae_tiles() -> None:
    """AutoencoderKLQwenImage (the VAE that must decode 1328^2 Qwen images within the budget) has Wan-style tile
    settings; set_tiling drives them, its tiled path runs with the output shape of the untiled one, and tiling is
    off again afterwards. (Its tiled_decode is Wan's algorithm; the exactness test above covers that algorithm, and
    a random-weight decoder's tile error says nothing about a trained one, so no value bound here.)"""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                 latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    z = torch.randn(1, 4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    calls = []
    vae.decoder.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        ref = vae.decode(z).sample
        untiled_calls = len(calls)
        with tiling(vae, 64, overlap=0.25):
            assert (vae.tile_sample_min_height, vae.tile_sample_stride_width) == (64, 48)
            tiled = vae.decode(z).sample
    assert len(calls) - untiled_calls > 1, "the tiled path did not run"
    assert tiled.shape == ref.shape == (1, 3, 1, 128, 128) and not vae.use_tiling


def test_auto_falls_back_to_tiles_on_out_of_memory_and_remembers(tiny_wan: Path, monkeypatch) -> None:
    """``tiling.mode=auto`` (the VAE service's decode): an untiled decode that runs out of CUDA memory is retried in
    tiles of ``tile_size``, halved until one fits; the size that fitted is where the next decode of that output size
    starts; when even ``min_tile_size`` does not fit the request fails with RESOURCE_EXHAUSTED naming the budget.
    The CPU has no allocator cap, so the out-of-memory errors are injected where the CUDA allocator raises them, by
    tile size; the decodes themselves are the real VAE's (the GPU test runs the real cap:
    tests/gpu/test_wan_vae_gpu.py)."""
    import asyncio

    from services.config import ModelConfig
    from services.errors import ResourceExhausted
    from vae_svc.config import TilingConfig, VaeServiceConfig
    from vae_svc.server import VaeServicer

    servicer = VaeServicer(VaeServiceConfig(model=ModelConfig(checkpoint=str(tiny_wan), device="cpu", dtype="float32"),
                                            tiling=TilingConfig(mode="auto", tile_size=64, min_tile_size=32),
                                            memory_budget_mb=512))
    asyncio.run(servicer.load())
    real_once = servicer._decode_once
    tried: list[int | None] = []
    fits = {"largest": 32}

    def decode_once(latents, params, tile):
        tried.append(tile)
        if tile is None or tile > fits["largest"]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real_once(latents, params, tile)

    monkeypatch.setattr(servicer, "_decode_once", decode_once)
    params = SamplingParams(width=96, height=96, steps=1, guidance_scale=0.0, seed=0, frames=5)
    latents = _latents(servicer.adapter, params)
    frames, tiled = servicer._decode(latents, params)
    assert tiled and tried == [None, 64, 32]
    assert torch.equal(frames, real_once(latents, params, 32))  # the decode that fitted is the one returned
    tried.clear()
    servicer._decode(latents, params)
    assert tried == [32]  # starts from what fitted for this output size
    fits["largest"] = 16
    tried.clear()
    with pytest.raises(ResourceExhausted, match=r"96x96x5 does not fit.*32px tiles; raise memory_budget_mb \(512 MiB\)"):
        servicer._decode(latents, params)
    assert tried == [32]
