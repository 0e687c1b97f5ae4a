"""Configuration of the encoder service."""

from __future__ import annotations

import dataclasses

from services.config import ModelConfig, ServerConfig


@dataclasses.dataclass
class EncoderServiceConfig:
    """``chitu serve encoder --config FILE``."""

    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)
    """Listening address, message caps, drain time, logging."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """Checkpoint whose tokenizers and text encoders are loaded."""
    warmup: bool = True
    """Encode one prompt at start-up (before SERVING) so the first request pays no lazy initialisation."""
