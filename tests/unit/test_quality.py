"""PSNR and SSIM (services.quality) against their definitions: a closed-form PSNR, and SSIM against a direct
window-by-window evaluation of Wang et al.'s formula (float64; they must agree to 1e-10)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from services.quality import gaussian_window, psnr, ssim


def test_psnr_closed_form() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 250, size=(16, 12, 3), dtype=np.uint8)
    b = a + 5  # every pixel off by 5: MSE 25
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 25), abs=1e-9)
    assert psnr(a, a) == math.inf
    x = torch.rand(2, 8, 8, 3, dtype=torch.float64)
    assert psnr(x, x + 0.1) == pytest.approx(20.0, abs=1e-9)  # floats: data range 1, MSE 0.01
    assert psnr(x.permute(0, 3, 1, 2), (x + 0.1).permute(0, 3, 1, 2), channels_last=False) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(a, a[:-1])


def _ssim_direct(x: np.ndarray, y: np.ndarray, rng: float) -> float:
    """SSIM by its definition, one 11x11 Gaussian window at a time (valid region), averaged over channels."""
    w = gaussian_window(11, 1.5).numpy()
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
    vals = []
    for c in range(x.shape[2]):
        for i in range(x.shape[0] - 10):
            for j in range(x.shape[1] - 10):
                px, py = x[i:i + 11, j:j + 11, c], y[i:i + 11, j:j + 11, c]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * px * px).sum() - mx * mx, (w * py * py).sum() - my * my
                cxy = (w * px * py).sum() - mx * my
                vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_the_definition() -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, size=(20, 17, 3)).astype(np.uint8)
    noise = rng.normal(0, 20, size=a.shape)
    b = np.clip(a + noise, 0, 255).astype(np.uint8)
    assert ssim(a, b) == pytest.approx(_ssim_direct(a.astype(np.float64), b.astype(np.float64), 255.0), abs=1e-10)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert ssim(a, b) == pytest.approx(ssim(b, a), abs=1e-12)
    worse = np.clip(a + 3 * noise, 0, 255).astype(np.uint8)
    assert ssim(a, worse) < ssim(a, b) < 1.0
