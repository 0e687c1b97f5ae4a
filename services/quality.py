"""Image quality against a reference: PSNR and SSIM (torch only; no torchvision, lpips or scikit-image).

Both take images as ``[H, W, C]`` or ``[N, H, W, C]`` (uint8 frames, as the VAE stage returns them, or floats) or
``[N, C, H, W]`` float tensors with ``channels_last=False``; numpy arrays are accepted too. ``data_range`` is the
span of the pixel values: 255 for uint8 (the default for integer input), 1.0 for floats in [0, 1].

SSIM follows Wang et al. (2004) as commonly implemented: an 11x11 Gaussian window with sigma 1.5, constants
``(0.01 L)^2`` and ``(0.03 L)^2``, computed per channel on the valid region (no padding) in float64 and averaged
over channels, pixels and images. Images smaller than the window use a window of their size.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def _to_nchw(x: Any, channels_last: bool) -> tuple[torch.Tensor, bool]:
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else torch.as_tensor(x)
    integer = not t.is_floating_point()
    t = t.detach().to("cpu", torch.float64)
    if t.ndim == 2:
        t = t[..., None] if channels_last else t[None]
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4:
        raise ValueError(f"expected an image [H, W, C] or a batch [N, H, W, C], got shape {list(t.shape)}")
    return (t.permute(0, 3, 1, 2) if channels_last else t), integer


def _pair(a: Any, b: Any, channels_last: bool, data_range: float | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    x, int_a = _to_nchw(a, channels_last)
    y, int_b = _to_nchw(b, channels_last)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {list(x.shape)} vs {list(y.shape)}")
    if data_range is None:
        data_range = 255.0 if (int_a and int_b) else 1.0
    return x, y, float(data_range)


def mse(a: Any, b: Any, channels_last: bool = True) -> float:
    x, y, _ = _pair(a, b, channels_last, 1.0)
    return float(((x - y) ** 2).mean())


def psnr(a: Any, b: Any, data_range: float | None = None, channels_last: bool = True) -> float:
    """Peak signal-to-noise ratio in dB (``inf`` for identical images)."""
    x, y, rng = _pair(a, b, channels_last, data_range)
    err = float(((x - y) ** 2).mean())
    return math.inf if err == 0 else 10.0 * math.log10(rng * rng / err)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """The normalised ``[size, size]`` Gaussian window (float64)."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma * sigma))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: Any, b: Any, data_range: float | None = None, channels_last: bool = True, window: int = 11,
         sigma: float = 1.5) -> float:
    """Mean structural similarity (1.0 for identical images)."""
    x, y, rng = _pair(a, b, channels_last, data_range)
    size = min(window, x.shape[-1], x.shape[-2])
    w = gaussian_window(size, sigma * size / window)
    c = x.shape[1]
    kernel = w.expand(c, 1, size, size).contiguous()

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=c)

    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x * mu_x
    syy = filt(y * y) - mu_y * mu_y
    sxy = filt(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (sxx + syy + c2))
    return float(s.mean())
