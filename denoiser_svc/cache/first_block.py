"""First-Block cache — the FBCache of ParaAttention (C. Cheng, 2025), a TeaCache variant that needs no fitted
polynomial: the first block's own residual is the indicator.

Decision rule: every step computes block 0 and takes its residual ``r_t = block0(x) - x`` (image tokens). Its
relative L1 change from ``r_ref``, the first-block residual of the last fully computed step (summed over every
rank and CFG branch), decides: below ``threshold`` the remaining blocks are replaced by the cached residual of the
last computed step (both token streams); otherwise they run, and ``r_ref`` and the cache are refreshed. The first
``warmup_steps`` always compute; ``max_consecutive_hits`` (0 = no cap) bounds reuses in a row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from denoiser_svc.cache.hooks import remove_hooks
from denoiser_svc.cache.registry import StrategyConfig, StrategyName, register, setting
from denoiser_svc.cache.strategy import (
    BlockRangeStrategy,
    BranchRun,
    StepRecord,
    apply_block_hooks,
    apply_residual,
    l1_sums,
    relative,
    store_residual,
)
from services.errors import InvalidArgument
from services.families.cache_spec import BlockIO, CacheSpec

FIRST_BLOCK_HOOK = "flexcache.first_block"


@dataclass(frozen=True)
class FirstBlockCacheConfig(StrategyConfig):
    """Settings of the First-Block cache (``chitu.v1.FirstBlockCacheConfig``)."""

    threshold: float = setting(0.08, 0.0, 1.0)
    """Bound on the relative L1 change of the first block's residual; 0 never reuses."""
    warmup_steps: int = setting(1, 1, 1000)
    """Steps always computed at the start of the run."""
    max_consecutive_hits: int = setting(0, 0, 1000)
    """Reuses in a row before a step must compute; 0 means no cap."""


class FrontResidualStrategy(BlockRangeStrategy):
    """Shared by First-Block cache and DBCache: the front blocks' residual decides whether the middle is reused."""

    needs_current_metric = True
    needs_front_input = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.consecutive = 0

    def scheduled(self, step: int) -> bool | None:
        cfg = self.config
        if self.run.index(step) < cfg.warmup_steps:  # type: ignore[attr-defined]
            return False
        cap = cfg.max_consecutive_hits  # type: ignore[attr-defined]
        if cap and self.consecutive >= cap:
            return False
        return None

    def metric(self, run: BranchRun, block: torch.nn.Module, mid_in: BlockIO) -> torch.Tensor:
        residual = self.real_tokens(mid_in.hidden - run.scratch.pop("front_in"))
        run.state.front_residual = residual  # becomes the reference if this step computes
        reference = getattr(run.state, "reference", None)
        if reference is None:
            return torch.tensor([1.0, 0.0], dtype=torch.float64, device=residual.device)
        return l1_sums(residual, reference)

    def decide(self, step: int, metric: torch.Tensor) -> None:
        self.decision = relative(metric) < self.config.threshold  # type: ignore[attr-defined]

    def reuse(self, run: BranchRun, mid_in: BlockIO) -> tuple[torch.Tensor, torch.Tensor | None]:
        return apply_residual(run.state, mid_in)

    def store(self, run: BranchRun, mid_in: BlockIO, hidden: torch.Tensor, context: torch.Tensor | None) -> None:
        store_residual(run.state, mid_in, hidden, context)

    def end_step(self, step: int) -> StepRecord:
        record = super().end_step(step)
        for state in self.branches.values():
            residual = state.__dict__.pop("front_residual", None)
            if not record.hit and residual is not None:
                state.reference = residual
        self.consecutive = self.consecutive + 1 if record.hit else 0
        return record


@register(StrategyName.FIRST_BLOCK, FirstBlockCacheConfig)
class FirstBlockCache(FrontResidualStrategy):
    hook_names = (FIRST_BLOCK_HOOK,)
    config: FirstBlockCacheConfig

    @classmethod
    def check(cls, config: StrategyConfig, spec: CacheSpec) -> None:
        if spec.total_blocks < 2:
            raise InvalidArgument(f"cache.first_block: this model has {spec.total_blocks} block; the First-Block "
                                  f"cache needs at least 2")

    def block_range(self) -> tuple[int, int]:
        return 1, 0

    def apply(self, run: BranchRun) -> None:
        apply_first_block_cache(self.resolved.transformer, self.config, run)


def apply_first_block_cache(module: torch.nn.Module, config: FirstBlockCacheConfig, run: BranchRun) -> None:
    """Hook the blocks of ``module`` (the transformer) for one forward of ``run``, a branch of a First-Block session."""
    apply_block_hooks(module, config, run, FIRST_BLOCK_HOOK)


def remove_first_block_cache(module: torch.nn.Module) -> None:
    """Remove every First-Block cache hook under ``module``."""
    remove_hooks(module.modules(), (FIRST_BLOCK_HOOK,))
