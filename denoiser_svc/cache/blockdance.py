"""BlockDance — Zhang et al., "BlockDance: Reuse Structurally Similar Spatio-Temporal Features to Accelerate
Diffusion Transformers" (CVPR 2025).

Late in denoising the structure of the image is settled, and the features that the structure-focused blocks (the
leading ones) produce barely change between adjacent steps. BlockDance caches the output of block ``i`` on a *cache
step* and, on the following *reuse steps*, starts the forward from that cached feature: blocks ``[0, i]`` are
skipped, the deeper blocks run on the current timestep embedding.

Decision rule (a fixed schedule, the same on every rank): inside the window ``[start_fraction, end_fraction)`` of
the run, the window's first step and then every ``interval``-th step is a cache step, the others reuse; outside the
window every step computes. ``i + 1 = round(reuse_fraction * blocks)`` (at least one block is skipped and one runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from denoiser_svc.cache.hooks import remove_hooks
from denoiser_svc.cache.registry import StrategyConfig, StrategyName, register, setting
from denoiser_svc.cache.strategy import BlockRangeStrategy, BranchRun, _clone, apply_block_hooks
from services.errors import InvalidArgument
from services.families.cache_spec import BlockIO, CacheSpec

BLOCKDANCE_HOOK = "flexcache.blockdance"


@dataclass(frozen=True)
class BlockDanceConfig(StrategyConfig):
    """Settings of BlockDance (``chitu.v1.BlockDanceConfig``)."""

    interval: int = setting(2, 1, 100)
    """In the window: one cache step every ``interval`` steps, the others reuse; 1 never reuses."""
    reuse_fraction: float = setting(0.6, 0.0, 1.0, lo_open=True)
    """Fraction of the blocks (the leading ones) skipped on reuse steps."""
    start_fraction: float = setting(0.4, 0.0, 1.0)
    """Where in the run the reuse window opens."""
    end_fraction: float = setting(1.0, 0.0, 1.0)
    """Where in the run the reuse window closes (above ``start_fraction``)."""


def window(steps: int, start_fraction: float, end_fraction: float) -> range:
    """The run indices of a ``[start_fraction, end_fraction)`` window of a ``steps``-step run."""
    return range(math.ceil(start_fraction * steps - 1e-9), math.ceil(end_fraction * steps - 1e-9))


@register(StrategyName.BLOCKDANCE, BlockDanceConfig)
class BlockDance(BlockRangeStrategy):
    hook_names = (BLOCKDANCE_HOOK,)
    config: BlockDanceConfig

    @classmethod
    def check(cls, config: StrategyConfig, spec: CacheSpec) -> None:
        assert isinstance(config, BlockDanceConfig)
        if config.end_fraction <= config.start_fraction:
            raise InvalidArgument(f"cache.blockdance.end_fraction={config.end_fraction} must be above start_fraction="
                                  f"{config.start_fraction}; allowed: start_fraction < end_fraction <= 1")
        if spec.total_blocks < 2:
            raise InvalidArgument(f"cache.blockdance: this model has {spec.total_blocks} block; BlockDance needs at "
                                  f"least 2 (one skipped, one computed)")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.window = window(self.run.steps, self.config.start_fraction, self.config.end_fraction)

    def block_range(self) -> tuple[int, int]:
        n = len(self.resolved.blocks)
        skipped = min(max(round(self.config.reuse_fraction * n), 1), n - 1)
        return 0, n - skipped

    def apply(self, run: BranchRun) -> None:
        apply_blockdance(self.resolved.transformer, self.config, run)

    def scheduled(self, step: int) -> bool | None:
        idx = self.run.index(step)
        if idx not in self.window:
            return False
        return (idx - self.window.start) % self.config.interval != 0

    def reuse(self, run: BranchRun, mid_in: BlockIO) -> tuple[torch.Tensor, torch.Tensor | None]:
        return run.state.hidden, run.state.context

    def store(self, run: BranchRun, mid_in: BlockIO, hidden: torch.Tensor, context: torch.Tensor | None) -> None:
        idx = self.run.index(run.step)
        if idx + 1 in self.window:  # only a feature that a later step may reuse is kept
            run.state.hidden, run.state.context = _clone(hidden), _clone(context)
        else:
            run.state.hidden = run.state.context = None


def apply_blockdance(module: torch.nn.Module, config: BlockDanceConfig, run: BranchRun) -> None:
    """Hook the blocks of ``module`` (the transformer) for one forward of ``run``, a branch of a BlockDance session."""
    apply_block_hooks(module, config, run, BLOCKDANCE_HOOK)


def remove_blockdance(module: torch.nn.Module) -> None:
    """Remove every BlockDance hook under ``module``."""
    remove_hooks(module.modules(), (BLOCKDANCE_HOOK,))
