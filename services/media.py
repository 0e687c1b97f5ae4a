"""Media encoding of decoded frames: PNG (lossless) and raw RGB."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def encode_png(frame: torch.Tensor | np.ndarray, compress_level: int = 1) -> bytes:
    """[H, W, 3] uint8 -> PNG bytes."""
    arr = frame.numpy() if isinstance(frame, torch.Tensor) else frame
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> [H, W, 3] uint8."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
