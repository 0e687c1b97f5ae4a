"""Configuration of the VAE service."""

from __future__ import annotations

import dataclasses
from typing import Literal

from services.config import ConfigError, ModelConfig, ServerConfig


@dataclasses.dataclass
class TilingConfig:
    """Spatial tiling of the VAE decode (diffusers' ``enable_tiling``) to bound its memory.

    Tiles overlap and are blended, so a tiled decode is close to, not equal to, the untiled one (the decoders'
    mid-block attention is global per frame); ``auto`` therefore decodes untiled whenever that fits.
    """

    mode: Literal["auto", "always", "never"] = "auto"
    """``auto``: untiled, and on a CUDA out-of-memory error (the budget reached) again in tiles of ``tile_size``,
    halving it down to ``min_tile_size`` until it fits; the size that worked is reused for that output size.
    ``always``: every decode in tiles of ``tile_size``. ``never``: never tiled (out of memory is an error)."""
    tile_size: int = 256
    """Height and width of one tile in output pixels (a multiple of the VAE's spatial factor)."""
    overlap: float = 0.25
    """Fraction of a tile that overlaps its neighbour and is blended (diffusers' default 0.25: stride = 0.75 tile)."""
    min_tile_size: int = 64
    """Smallest tile ``auto`` tries before giving up with RESOURCE_EXHAUSTED."""

    def validate(self) -> None:
        if self.tile_size < 16 or self.tile_size % 16:
            raise ConfigError(f"tiling.tile_size must be a multiple of 16 and >= 16, got {self.tile_size}")
        if self.min_tile_size < 16 or self.min_tile_size % 16 or self.min_tile_size > self.tile_size:
            raise ConfigError(f"tiling.min_tile_size must be a multiple of 16 in [16, tile_size], "
                              f"got {self.min_tile_size}")
        if not 0 <= self.overlap < 1:
            raise ConfigError(f"tiling.overlap must be in [0, 1), got {self.overlap}")


@dataclasses.dataclass
class VaeServiceConfig:
    """``chitu serve vae --config FILE``."""

    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)
    """Listening address, message caps, drain time, logging."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """Checkpoint whose VAE is loaded."""
    png_compress_level: int = 1
    """zlib level of PNG output (0-9); 1 is fast and still lossless."""
    memory_budget_mb: int = 0
    """GPU memory this process may use (weights + decode), in MiB; 0 means the whole card. Enforced by the CUDA
    caching allocator (``set_per_process_memory_fraction``); decodes that would exceed it run tiled (see
    ``tiling``). Ignored on the CPU."""
    tiling: TilingConfig = dataclasses.field(default_factory=TilingConfig)
    """When and how the decode is split into spatial tiles."""
    slicing: bool = True
    """Decode a batch one sample at a time (diffusers' ``enable_slicing``, where the VAE has it)."""
    warmup: bool = True
    """Decode latents of the model's default size once at start-up, before the health status says SERVING, so that
    the first request does not pay the device's first-call costs (kernel loading, cuDNN's algorithm choice)."""
    mp4_crf: int = 18
    """H.264 constant rate factor of MP4 output (0 = lossless luma, 18 ~ visually lossless, 51 = worst)."""
    mp4_pixel_format: Literal["yuv420p", "yuv444p"] = "yuv420p"
    """Chroma subsampling of MP4 output: yuv420p plays everywhere; yuv444p keeps full colour resolution."""

    def validate(self) -> None:
        if not 0 <= self.png_compress_level <= 9:
            raise ConfigError(f"png_compress_level must be in [0, 9], got {self.png_compress_level}")
        if self.memory_budget_mb < 0:
            raise ConfigError(f"memory_budget_mb must be >= 0 (0 = no budget), got {self.memory_budget_mb}")
        if not 0 <= self.mp4_crf <= 51:
            raise ConfigError(f"mp4_crf must be in [0, 51], got {self.mp4_crf}")
