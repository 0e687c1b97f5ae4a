"""Tiny random-weight checkpoints of the real architectures (diffusers-format folders, built on CPU in seconds)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def builders() -> dict[str, Callable[..., Path]]:
    """Family name -> ``builder(out_dir, seed=...)``."""
    from services.tiny.flux import make_tiny_flux
    from services.tiny.wan import make_tiny_wan, make_tiny_wan22

    return {"flux": make_tiny_flux, "wan": make_tiny_wan, "wan22": make_tiny_wan22}
