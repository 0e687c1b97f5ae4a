"""Prompt adherence of generated shapes images: a small CNN that reads a scene's attributes back from pixels.

The classifier predicts, from a 128x128 RGB image, the main shape's colour, shape, size and position, the
background colour (top half of a two-tone background), the second background tone (or "plain") and whether a
second shape is present. It is trained here on CPU, deterministically, on freshly rendered scenes of *every*
combination (held-out triples included: it is the judge, not the generator), with blur, noise and colour jitter so
that it reads soft, slightly off-colour generated images too. Its weights are committed
(``classifier.safetensors``, < 2 MB); retrain with ``python -m services.shapes.evaluate train``.

Adherence of a generated image to the scene its caption describes is the share of attributes read back right;
``adherence`` reports colour, shape, size, position and background accuracy and the share of images with all of
colour, shape, position and background right.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from services.shapes.render import render
from services.shapes.scenes import N_COLOURS, N_POSITIONS, N_SHAPES, N_SIZES, Scenes, sample_scenes

WEIGHTS = Path(__file__).resolve().parent / "classifier.safetensors"
"""The committed classifier weights."""

HEADS: dict[str, int] = {"colour": N_COLOURS, "shape": N_SHAPES, "size": N_SIZES, "position": N_POSITIONS,
                         "background": N_COLOURS, "background2": N_COLOURS + 1, "second": 2}
"""Output heads and their class counts (``background2``: 0 = plain, k + 1 = colour k)."""

SCORED = ("colour", "shape", "position", "background")
"""Attributes that make up the all-correct adherence score."""

TRAIN_SEED = 20261127


def targets_of(scenes: Scenes) -> dict[str, torch.Tensor]:
    """Class index per head for each scene."""
    t = {"colour": scenes.colour, "shape": scenes.shape, "size": scenes.size, "position": scenes.position,
         "background": scenes.bg, "background2": scenes.bg2 + 1, "second": (scenes.colour2 >= 0).astype(np.int64)}
    return {k: torch.as_tensor(np.asarray(v, dtype=np.int64)) for k, v in t.items()}


class ShapesClassifier(nn.Module):
    """Four stride-2 convolutions down to an 8x8 map (kept spatial, for position), one hidden layer, seven heads."""

    def __init__(self, width: int = 48, hidden: int = 128):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]

        self.features = nn.Sequential(*block(3, width // 2), *block(width // 2, width), *block(width, 64),
                                      *block(64, 64), nn.Conv2d(64, 24, 1), nn.SiLU(), nn.Flatten())
        self.hidden = nn.Sequential(nn.Linear(24 * 8 * 8, hidden), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, n) for name, n in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``images``: [B, 3, 128, 128] floats in [0, 1]; returns logits per head."""
        h = self.hidden(self.features(images * 2 - 1))
        return {name: head(h) for name, head in self.heads.items()}


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(2.5 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-x * x / (2 * sigma * sigma))
    k = k / k.sum()
    c = images.shape[1]
    out = nn.functional.conv2d(nn.functional.pad(images, (radius, radius, 0, 0), mode="replicate"),
                               k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return nn.functional.conv2d(nn.functional.pad(out, (0, 0, radius, radius), mode="replicate"),
                                k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur (sigma 0..1.5), per-channel gain and offset, Gaussian noise: what a generator's output may look like."""
    b = images.shape[0]
    out = images.clone()
    levels = torch.randint(0, 4, (b,), generator=gen)
    for level, sigma in ((1, 0.6), (2, 1.0), (3, 1.5)):
        sel = (levels == level).nonzero().flatten()
        if sel.numel():
            out[sel] = _gaussian_blur(out[sel], sigma)
    gain = 1 + (torch.rand(b, 3, 1, 1, generator=gen) - 0.5) * 0.2
    offset = (torch.rand(b, 3, 1, 1, generator=gen) - 0.5) * 0.1
    noise = torch.randn(out.shape, generator=gen) * torch.rand(b, 1, 1, 1, generator=gen) * 0.05
    return (out * gain + offset + noise).clamp(0, 1)


def train_classifier(steps: int = 1500, batch: int = 96, seed: int = TRAIN_SEED, lr: float = 2e-3,
                     log_every: int = 100) -> tuple[ShapesClassifier, list[dict[str, float]]]:
    """Train on fresh scenes every step (split "all"); deterministic for a given seed on one machine."""
    torch.manual_seed(seed)
    model = ShapesClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    log: list[dict[str, float]] = []
    t0, running = time.perf_counter(), 0.0
    for step in range(steps):
        lr_now = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr_now
        scenes = sample_scenes(batch, seed=seed * 1000 + step, split="all")
        images = augment(render(scenes), gen)
        logits = model(images)
        targets = targets_of(scenes)
        loss = sum(nn.functional.cross_entropy(logits[k], targets[k]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += float(loss.detach())
        if (step + 1) % log_every == 0:
            log.append({"step": step + 1, "loss": running / log_every, "seconds": time.perf_counter() - t0})
            print(f"classifier step {step + 1}/{steps} loss {running / log_every:.4f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
            running = 0.0
    model.eval()
    return model, log


def save_classifier(model: ShapesClassifier, path: Path = WEIGHTS) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))


def load_classifier(path: Path = WEIGHTS, device: str | torch.device = "cpu") -> ShapesClassifier:
    from safetensors.torch import load_file

    model = ShapesClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()


def as_float_images(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] (or one [H, W, 3]) or float [B, 3, H, W] in [0, 1] -> float [B, 3, H, W]."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.dtype == torch.uint8:
        if images.ndim == 3:
            images = images[None]
        images = images.permute(0, 3, 1, 2).float() / 255.0
    if tuple(images.shape[1:]) != (3, 128, 128):
        raise ValueError(f"the classifier reads 128x128 RGB images, got shape {list(images.shape)}")
    return images.float()


@torch.no_grad()
def classify(model: ShapesClassifier, images: torch.Tensor | np.ndarray, batch: int = 256) -> dict[str, torch.Tensor]:
    """Predicted class per head for each image (uint8 HWC or float CHW images)."""
    x = as_float_images(images)
    device = next(model.parameters()).device
    preds: dict[str, list[torch.Tensor]] = {k: [] for k in HEADS}
    for i in range(0, x.shape[0], batch):
        logits = model(x[i:i + batch].to(device))
        for k in HEADS:
            preds[k].append(logits[k].argmax(-1).cpu())
    return {k: torch.cat(v) for k, v in preds.items()}


def adherence(preds: dict[str, torch.Tensor], scenes: Scenes) -> dict[str, float]:
    """Accuracy per attribute against the intended scenes, and ``all``: colour, shape, position and background
    all right."""
    targets = targets_of(scenes)
    right = {k: preds[k] == targets[k] for k in ("colour", "shape", "size", "position", "background")}
    out = {k: float(v.float().mean()) for k, v in right.items()}
    out["all"] = float(torch.stack([right[k] for k in SCORED]).all(0).float().mean())
    return out


def check(model: ShapesClassifier, n: int = 2000, seed: int = 7, augmented: bool = False) -> dict[str, float]:
    """Accuracy on ``n`` fresh rendered scenes of every combination (optionally augmented)."""
    scenes = sample_scenes(n, seed=seed, split="all")
    images = render(scenes)
    if augmented:
        images = augment(images, torch.Generator().manual_seed(seed))
    preds = classify(model, images)
    targets = targets_of(scenes)
    return {k: float((preds[k] == targets[k]).float().mean()) for k in HEADS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="train or check the shapes adherence classifier")
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train from scratch and write the weights")
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--out", type=Path, default=WEIGHTS)
    c = sub.add_parser("check", help="accuracy of the committed weights on fresh scenes")
    c.add_argument("--n", type=int, default=2000)
    args = parser.parse_args(argv)
    if args.cmd == "train":
        torch.set_num_threads(max(1, torch.get_num_threads()))
        model, _ = train_classifier(steps=args.steps)
        save_classifier(model, args.out)
        print(json.dumps({"clean": check(model), "augmented": check(model, augmented=True)}, indent=1))
    else:
        model = load_classifier()
        print(json.dumps({"clean": check(model, args.n), "augmented": check(model, args.n, augmented=True)},
                         indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
