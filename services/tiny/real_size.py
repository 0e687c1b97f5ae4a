"""Building random-weight checkpoints at the real sizes (GPU smoke runs), and the command line of the image-family
builders: ``python -m services.tiny.<family> DIR [--real] [--device cuda] [--dtype bfloat16]``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch


@contextlib.contextmanager
def building(dtype: torch.dtype, device: str | torch.device) -> Iterator[None]:
    """Modules constructed inside get ``dtype`` parameters initialised on ``device`` (a real-size model initialises
    in seconds on a GPU, in minutes on the CPU)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def builder_main(builder: Callable[..., Path], description: str, argv: list[str] | None = None) -> None:
    """``DIR [--real] [--device D] [--dtype T] [--seed N]`` -> ``builder(DIR, seed, real=..., device=..., dtype=...)``."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("dir")
    parser.add_argument("--real", action="store_true", help="the released model's sizes (random weights)")
    parser.add_argument("--device", default="cpu", help="where weights are initialised (cuda is much faster)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="weight dtype of --real folders (tiny ones are always float32)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.real else torch.float32
    print(builder(args.dir, seed=args.seed, real=args.real, device=args.device, dtype=dtype))
