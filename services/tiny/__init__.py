"""Tiny random-weight checkpoints of the real architectures (diffusers-format folders, built on CPU in seconds)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def builders() -> dict[str, Callable[..., Path]]:
    """Family name -> ``builder(out_dir, seed=...)``."""
    from services.tiny.flux import make_tiny_flux
    from services.tiny.flux2_klein import make_tiny_flux2_klein, make_tiny_flux2_klein_base
    from services.tiny.qwen_image import make_tiny_qwen_image
    from services.tiny.wan import make_tiny_wan, make_tiny_wan22
    from services.tiny.z_image import make_tiny_z_image

    return {"flux": make_tiny_flux, "wan": make_tiny_wan, "wan22": make_tiny_wan22,
            "flux2_klein": make_tiny_flux2_klein, "flux2_klein_base": make_tiny_flux2_klein_base,
            "qwen_image": make_tiny_qwen_image, "z_image": make_tiny_z_image}
