"""Configuration of the VAE service."""

from __future__ import annotations

import dataclasses

from services.config import ModelConfig, ServerConfig


@dataclasses.dataclass
class VaeServiceConfig:
    """``chitu serve vae --config FILE``."""

    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)
    """Listening address, message caps, drain time, logging."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """Checkpoint whose VAE is loaded."""
    png_compress_level: int = 1
    """zlib level of PNG output (0-9); 1 is fast and still lossless."""

    def validate(self) -> None:
        if not 0 <= self.png_compress_level <= 9:
            from services.config import ConfigError

            raise ConfigError(f"png_compress_level must be in [0, 9], got {self.png_compress_level}")
