"""MP4 (H.264) encoding of decoded frames through PyAV, whose wheel ships FFmpeg with libx264."""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np
import torch

CODEC = "libx264"
MISSING_PYAV = "MP4 output needs PyAV, which is not installed where the VAE service runs (pip install av)"


def mp4_available() -> bool:
    """Whether PyAV (FFmpeg with libx264) imports: MP4 output depends on it (checked once, at service start)."""
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def encode_mp4(frames: torch.Tensor | np.ndarray, fps: float, crf: int = 18, pixel_format: str = "yuv420p") -> bytes:
    """``[F, H, W, 3]`` uint8 RGB frames -> an MP4 file's bytes (H.264, constant rate factor ``crf``)."""
    import av

    arr = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected [F, H, W, 3] uint8 frames, got {arr.shape} {arr.dtype}")
    n, h, w, _ = arr.shape
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(CODEC, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, pixel_format
        stream.options = {"crf": str(crf)}
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr[i]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)
    return buf.getvalue()


def decode_mp4(data: bytes) -> tuple[np.ndarray, float]:
    """An MP4 file's bytes -> (``[F, H, W, 3]`` uint8 RGB frames, frames per second)."""
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.base_rate or 0)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    return np.stack(frames), fps
