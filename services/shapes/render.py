"""Vectorised torch renderer of ``Scenes``: the same pixels on CPU and GPU, anti-aliased by supersampling.

Shapes are inside-tests on a supersampled pixel grid (circle, square, triangle pointing up, five-pointed star,
diamond), composited back to front (background, second shape, main shape) and box-filtered down to 128x128.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from services.shapes.scenes import CENTRES, IMAGE_SIZE, RADIUS, RGB, Scenes

SUPERSAMPLE = 2
"""Samples per pixel along each axis."""

_STAR_OUTER, _STAR_INNER = 1.15, 0.48
"""Star vertex radii as multiples of the shape radius."""


def _palette(device: torch.device) -> torch.Tensor:
    return torch.tensor(RGB, dtype=torch.float32, device=device) / 255.0


def _inside(kind: int, x: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Inside-test of shape ``kind`` for offsets ``x, y`` from the centre ([B, H, W]) and radii ``r`` ([B, 1, 1])."""
    if kind == 0:  # circle
        return x * x + y * y <= r * r
    if kind == 1:  # square (about the circle's area)
        return torch.maximum(x.abs(), y.abs()) <= 0.85 * r
    if kind == 2:  # equilateral triangle, apex up (y grows downwards), circumradius 1.15 r, centroid at the centre
        rr = 1.15 * r
        inside = y <= rr / 2  # base
        for ang in (math.radians(-30.0), math.radians(210.0)):  # the two slanted edges' outward normals
            inside &= x * math.cos(ang) + y * math.sin(ang) <= rr / 2
        return inside
    if kind == 3:  # five-pointed star, one point up
        rho = torch.sqrt(x * x + y * y)
        theta = torch.atan2(x, -y)  # 0 at the top point
        sector = 2 * math.pi / 5
        t = torch.remainder(theta, sector)
        t = torch.minimum(t, sector - t)  # fold into [0, pi/5]
        px, py = rho * torch.cos(t), rho * torch.sin(t)
        ox, oy = _STAR_OUTER * r, torch.zeros_like(r)
        ix, iy = _STAR_INNER * r * math.cos(sector / 2), _STAR_INNER * r * math.sin(sector / 2)
        # inside when on the origin's side of the edge outer point -> inner point
        cross = (ix - ox) * (py - oy) - (iy - oy) * (px - ox)
        return cross >= 0
    if kind == 4:  # diamond
        return x.abs() + y.abs() <= 1.15 * r
    raise ValueError(f"unknown shape id {kind}")


def _draw(canvas: torch.Tensor, palette: torch.Tensor, colour: torch.Tensor, shape: torch.Tensor, cx: torch.Tensor,
          cy: torch.Tensor, r: torch.Tensor, grid: torch.Tensor, rows: torch.Tensor) -> None:
    """Paint the shapes of scenes ``rows`` into ``canvas`` ([B, 3, H, W]) in place; the other arguments hold one
    value per scene."""
    kinds = shape[rows]
    for kind in torch.unique(kinds).tolist():
        sel = rows[kinds == kind]
        if sel.numel() == 0:
            continue
        x = grid[None, None, :] - cx[sel, None, None]
        y = grid[None, :, None] - cy[sel, None, None]
        mask = _inside(kind, x.expand(-1, grid.numel(), -1), y.expand(-1, -1, grid.numel()), r[sel, None, None])
        col = palette[colour[sel]][:, :, None, None]
        canvas[sel] = torch.where(mask[:, None], col, canvas[sel])


@torch.no_grad()
def render(scenes: Scenes, device: str | torch.device = "cpu", supersample: int = SUPERSAMPLE,
           chunk: int = 512) -> torch.Tensor:
    """Images of ``scenes`` as float32 ``[B, 3, 128, 128]`` in [0, 1] on ``device``."""
    device = torch.device(device)
    out = torch.empty(len(scenes), 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.float32, device=device)
    for start in range(0, len(scenes), chunk):
        out[start:start + chunk] = _render_chunk(scenes[start:start + chunk], device, supersample)
    return out


def _render_chunk(s: Scenes, device: torch.device, ss: int) -> torch.Tensor:
    n, size = len(s), IMAGE_SIZE * ss
    palette = _palette(device)
    grid = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / ss  # pixel units
    half = size // 2

    def t(a: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), device=device).to(dtype)

    bg, bg2 = t(s.bg, torch.long), t(s.bg2, torch.long)
    canvas = palette[bg][:, :, None, None].expand(n, 3, size, size).clone()
    two = (bg2 >= 0).nonzero().flatten()
    if two.numel():
        canvas[two, :, half:, :] = palette[bg2[two]][:, :, None, None]
    centres = torch.tensor(CENTRES, dtype=torch.float32, device=device)
    radius = torch.tensor(RADIUS, dtype=torch.float32, device=device)
    rows = torch.arange(n, device=device)
    has2 = t(s.colour2 >= 0, torch.bool)
    if has2.any():
        pos2 = t(np.maximum(s.position2, 0), torch.long)
        cx2 = centres[pos2, 0] + t(s.dx2)
        cy2 = centres[pos2, 1] + t(s.dy2)
        r2 = radius[0] * t(s.scale2)
        _draw(canvas, palette, t(np.maximum(s.colour2, 0), torch.long), t(np.maximum(s.shape2, 0), torch.long),
              cx2, cy2, r2, grid, rows[has2])
    pos = t(s.position, torch.long)
    cx, cy = centres[pos, 0] + t(s.dx), centres[pos, 1] + t(s.dy)
    r = radius[t(s.size, torch.long)] * t(s.scale)
    _draw(canvas, palette, t(s.colour, torch.long), t(s.shape, torch.long), cx, cy, r, grid, rows)
    if ss > 1:
        canvas = torch.nn.functional.avg_pool2d(canvas, ss)
    return canvas


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] floats in [0, 1] -> [B, H, W, 3] uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
