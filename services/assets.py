"""The embedded default model: what ``chitu up`` serves with no arguments."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path.home() / ".cache" / "chitu" / "checkpoints"
TINY_DEFAULT_NAME = "tiny-flux"
EMBEDDED_CHECKPOINT = REPO_ROOT / "services" / "checkpoints" / "chitu-shapes-flux"
"""The trained demo model (``docs/shapes-model.md``), committed in the repo once trained."""
TINY_DEFAULTS = {"width": 128, "height": 128, "steps": 8, "guidance_scale": 3.5, "max_size": 1024}


@contextlib.contextmanager
def _atomic_folder(out: Path) -> Iterator[Path]:
    """A temporary folder next to ``out``, renamed to ``out`` when the block succeeds (concurrent builders: the first
    to finish wins, the others' work is dropped), removed whatever happens."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "model_index.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def build_tiny(family: str, out_dir: Path, seed: int = 0) -> Path:
    """Build a tiny checkpoint of ``family`` atomically (into a temporary folder, then renamed)."""
    from services.tiny import builders

    builder = builders().get(family)
    if builder is None:
        raise ValueError(f"no tiny checkpoint builder for family {family!r}; known: {sorted(builders())}")
    with _atomic_folder(out_dir) as tmp:
        builder(tmp, seed=seed)
        defaults_path = tmp / "chitu.json"
        if not defaults_path.exists():
            defaults_path.write_text(json.dumps(TINY_DEFAULTS, indent=2) + "\n")
    return out_dir


def widen_heads(checkpoint: Path, out: Path, heads: int, seed: int = 0) -> Path:
    """A copy of the (tiny) ``checkpoint`` whose transformer has ``heads`` attention heads, same head size, fresh
    random weights, other components unchanged: the tiny transformers have 2 heads, too few for Ulysses over 4 ranks
    or in head chunks. Atomic like ``build_tiny``; an existing ``out`` is reused."""
    import diffusers
    import torch

    if (out / "model_index.json").is_file():
        return out
    with _atomic_folder(out) as tmp:
        shutil.copytree(checkpoint, tmp, dirs_exist_ok=True)
        cfg = json.loads((tmp / "transformer" / "config.json").read_text())
        cls = getattr(diffusers, cfg["_class_name"])
        if "n_heads" in cfg:  # Z-Image: width = heads x head size
            head_dim = cfg["dim"] // cfg["n_heads"]
            cfg.update(n_heads=heads, n_kv_heads=heads, dim=heads * head_dim)
        else:
            cfg["num_attention_heads"] = heads
        torch.manual_seed(seed)
        model = cls.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
        shutil.rmtree(tmp / "transformer")
        model.save_pretrained(tmp / "transformer", safe_serialization=True)
    return out


def default_checkpoint(embedded: Path = EMBEDDED_CHECKPOINT) -> Path:
    """The embedded default model folder: the trained ``chitu-shapes-flux`` checkpoint when the repo has it, else the
    tiny random-weight Flux checkpoint (built into the cache if needed)."""
    if (embedded / "model_index.json").is_file():
        return embedded
    path = CACHE_DIR / TINY_DEFAULT_NAME
    if not (path / "model_index.json").is_file():
        build_tiny("flux", path)
    return path
