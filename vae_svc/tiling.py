"""Switching a diffusers VAE between untiled and spatially tiled decoding.

diffusers' VAEs come in two tiling styles: per-axis tile sizes and strides in output pixels (``AutoencoderKLWan``,
``AutoencoderKLQwenImage``: ``tile_sample_min_height`` / ``tile_sample_stride_height`` ...) and one square tile
size with an overlap factor (``AutoencoderKL``, ``AutoencoderKLFlux2``: ``tile_sample_min_size``,
``tile_latent_min_size``, ``tile_overlap_factor``). ``set_tiling`` drives either from one (tile, overlap) pair.

Why tiles differ from the untiled decode: each tile is decoded on its own, so convolutions at a tile's edge see
zero padding instead of the neighbouring latents, and the decoders' mid-block self-attention (global over one
frame) only sees the tile. diffusers hides the seams by decoding overlapping tiles and blending the overlap
linearly; the remaining difference is what ``tests/unit/test_vae_tiling.py`` bounds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def spatial_factor(vae: torch.nn.Module) -> int:
    """Output pixels per latent pixel along one axis."""
    ratio = getattr(vae, "spatial_compression_ratio", None)
    if ratio:
        return int(ratio)
    return 2 ** (len(vae.config.block_out_channels) - 1)


def can_tile(vae: torch.nn.Module) -> bool:
    return hasattr(vae, "use_tiling") and (hasattr(vae, "tile_sample_min_height") or hasattr(vae, "tile_sample_min_size"))


def set_tiling(vae: torch.nn.Module, tile: int | None, overlap: float = 0.25) -> None:
    """Tiles of ``tile`` x ``tile`` output pixels overlapping by ``overlap`` of a tile; ``None`` switches tiling off."""
    if tile is None:
        if hasattr(vae, "use_tiling"):
            vae.use_tiling = False
        return
    if not can_tile(vae):
        raise ValueError(f"{type(vae).__name__} has no tiled decode")
    factor = spatial_factor(vae)
    stride = max(factor, int(tile * (1 - overlap)) // factor * factor)
    if hasattr(vae, "tile_sample_min_height"):
        vae.tile_sample_min_height = vae.tile_sample_min_width = tile
        vae.tile_sample_stride_height = vae.tile_sample_stride_width = stride
    else:
        vae.tile_sample_min_size = tile
        vae.tile_latent_min_size = tile // factor
        vae.tile_overlap_factor = 1 - stride / tile
    vae.use_tiling = True


@contextlib.contextmanager
def tiling(vae: torch.nn.Module, tile: int | None, overlap: float = 0.25) -> Iterator[None]:
    """Decode tiled (or untiled for ``None``) inside the block; untiled again afterwards."""
    set_tiling(vae, tile, overlap)
    try:
        yield
    finally:
        set_tiling(vae, None)


def tile_sizes(start: int, smallest: int, factor: int) -> list[int]:
    """``start``, then halved while at least ``smallest``, each rounded down to a multiple of ``factor``."""
    sizes, tile = [], start
    while tile >= smallest:
        sizes.append(max(factor, tile // factor * factor))
        tile //= 2
    return sizes


def limit_process_memory(device: torch.device, budget_mb: int) -> float | None:
    """Cap this process's CUDA allocations at ``budget_mb`` MiB; returns the fraction set (None when not capped)."""
    if device.type != "cuda" or budget_mb <= 0:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = min(1.0, budget_mb * 1024 * 1024 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return fraction
