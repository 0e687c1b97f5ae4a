"""MagCache — Ma et al., "MagCache: Fast Video Generation with Magnitude-Aware Cache" (2025).

The magnitude ratio ``gamma_t = |R_t| / |R_{t-1}|`` of successive transformer residuals ``R`` (output of the last
block minus input of the first) stays close to 1 and changes slowly over most of the schedule; MagCache skips steps
while the error that this drift accumulates stays small.

Decision rule: the first ``retention_fraction`` of the run (at least two steps) and the last step compute. After
that, a step multiplies the running ratio ``P *= gamma_t`` and adds ``|1 - P|`` to the error ``E``; while
``E < threshold`` and fewer than ``max_consecutive_hits`` reuses happened in a row, the step reuses the cached
residual; otherwise it computes and resets ``P = 1, E = 0``. The paper reads ``gamma_t`` from a curve calibrated
offline on the released weights; here the schedule is estimated online from the same request, so it fits any
checkpoint and step count: every computed step measures ``|R|`` (summed over every rank and CFG branch), and
``gamma`` is the per-step geometric mean of the last measured ratio.
"""

from __future__ import annotations

import math
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
    store_residual,
)
from services.families.cache_spec import BlockIO

MAGCACHE_HOOK = "flexcache.magcache"


@dataclass(frozen=True)
class MagCacheConfig(StrategyConfig):
    """Settings of MagCache (``chitu.v1.MagCacheConfig``)."""

    threshold: float = setting(0.12, 0.0, 1.0)
    """Bound on the accumulated magnitude-ratio error; 0 never reuses."""
    max_consecutive_hits: int = setting(3, 1, 1000)
    """Reuses in a row before a step must compute (the paper's K)."""
    retention_fraction: float = setting(0.2, 0.0, 1.0)
    """Fraction of the run, at its start, that always computes (at least two steps, to measure a ratio)."""


@register(StrategyName.MAGCACHE, MagCacheConfig)
class MagCache(BlockRangeStrategy):
    hook_names = (MAGCACHE_HOOK,)
    config: MagCacheConfig

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.retained = max(2, math.ceil(self.config.retention_fraction * self.run.steps))
        self.ratio = 1.0
        """Estimated per-step magnitude ratio."""
        self.running_ratio = 1.0
        self.error = 0.0
        self.consecutive = 0
        self.last_norm: tuple[int, float] | None = None
        """(run index, |R|) of the last computed step."""

    def block_range(self) -> tuple[int, int]:
        return 0, 0

    def apply(self, run: BranchRun) -> None:
        apply_magcache(self.resolved.transformer, self.config, run)

    def scheduled(self, step: int) -> bool | None:
        idx = self.run.index(step)
        if idx < self.retained or step == self.run.end_step - 1 or self.last_norm is None:
            return self._compute()
        running = self.running_ratio * self.ratio
        error = self.error + abs(1.0 - running)
        if error < self.config.threshold and self.consecutive < self.config.max_consecutive_hits:
            self.running_ratio, self.error = running, error
            self.consecutive += 1
            return True
        return self._compute()

    def _compute(self) -> bool:
        self.running_ratio, self.error, self.consecutive = 1.0, 0.0, 0
        return False

    def reuse(self, run: BranchRun, mid_in: BlockIO) -> tuple[torch.Tensor, torch.Tensor | None]:
        return apply_residual(run.state, mid_in)

    def store(self, run: BranchRun, mid_in: BlockIO, hidden: torch.Tensor, context: torch.Tensor | None) -> None:
        store_residual(run.state, mid_in, hidden, context)
        residual = self.real_tokens(run.state.res_hidden)
        run.state.norm_sq = residual.float().pow(2).sum(dtype=torch.float64).reshape(1)

    def end_step(self, step: int) -> StepRecord:
        record = super().end_step(step)
        if not record.hit:
            local = [s.__dict__.pop("norm_sq") for s in self.branches.values() if "norm_sq" in s.__dict__]
            total = self.reducer.all_reduce_sum(torch.stack(local).sum(0))
            norm = math.sqrt(float(total.item()))
            idx = self.run.index(step)
            if self.last_norm is not None and self.last_norm[1] > 0 and norm > 0:
                gap = idx - self.last_norm[0]
                self.ratio = (norm / self.last_norm[1]) ** (1.0 / gap)
            self.last_norm = (idx, norm)
        return record


def apply_magcache(module: torch.nn.Module, config: MagCacheConfig, run: BranchRun) -> None:
    """Hook the blocks of ``module`` (the transformer) for one forward of ``run``, a branch of a MagCache session."""
    apply_block_hooks(module, config, run, MAGCACHE_HOOK)


def remove_magcache(module: torch.nn.Module) -> None:
    """Remove every MagCache hook under ``module``."""
    remove_hooks(module.modules(), (MAGCACHE_HOOK,))
