"""TeaCache — Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model" (CVPR 2025).

Decision rule: at every step take the first block's timestep-modulated input ``m_t`` (the family's
``CacheSpec.modulated_input``), its relative L1 change ``d_t = |m_t - m_{t-1}|_1 / |m_{t-1}|_1`` (summed over every
rank and CFG branch), and the family's rescaling polynomial ``p`` (fitted between input change and output change).
Accumulate ``A += p(d_t)``; while ``A < threshold`` the step reuses the transformer's cached residual (output of the
last block minus input of the first, both token streams) instead of running the blocks; otherwise it computes,
refreshes the residual and resets ``A = 0``. The first ``warmup_steps`` and the last step always compute.
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
    apply_block_hooks,
    apply_residual,
    l1_sums,
    relative,
    store_residual,
)
from services.errors import InvalidArgument
from services.families.cache_spec import BlockIO, CacheSpec

TEACACHE_HOOK = "flexcache.teacache"


@dataclass(frozen=True)
class TeaCacheConfig(StrategyConfig):
    """Settings of TeaCache (``chitu.v1.TeaCacheConfig``)."""

    threshold: float = setting(0.4, 0.0, 5.0)
    """Bound on the accumulated rescaled relative L1 change of the modulated input; 0 never reuses."""
    warmup_steps: int = setting(1, 1, 1000)
    """Steps always computed at the start of the run."""
    coefficients: tuple[float, ...] = setting((), -1e12, 1e12)
    """Rescaling polynomial, highest power first; empty means the family's (fitted on its released weights)."""


def polyval(coefficients: tuple[float, ...], x: float) -> float:
    out = 0.0
    for c in coefficients:
        out = out * x + c
    return out


@register(StrategyName.TEACACHE, TeaCacheConfig)
class TeaCache(BlockRangeStrategy):
    needs_current_metric = True
    hook_names = (TEACACHE_HOOK,)
    config: TeaCacheConfig

    @classmethod
    def unsupported_reason(cls, spec: CacheSpec) -> str | None:
        reason = super().unsupported_reason(spec)  # the family's own reason first (e.g. no fitted polynomial)
        if reason is None and spec.modulated_input is None:
            return "its adapter defines no timestep-modulated input"
        return reason

    @classmethod
    def check(cls, config: StrategyConfig, spec: CacheSpec) -> None:
        assert isinstance(config, TeaCacheConfig)
        if not config.coefficients and not spec.teacache_coefficients:
            raise InvalidArgument("cache.teacache.coefficients must be given: this family has no fitted rescaling "
                                  "polynomial (allowed: 1 to 8 numbers, highest power first)")
        if len(config.coefficients) > 8:
            raise InvalidArgument(f"cache.teacache.coefficients has {len(config.coefficients)} numbers; allowed: "
                                  f"1 to 8 (highest power first)")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.coefficients = self.config.coefficients or self.resolved.spec.teacache_coefficients
        self.accumulated = 0.0

    def apply(self, run: BranchRun) -> None:
        apply_teacache(self.resolved.transformer, self.config, run)

    def block_range(self) -> tuple[int, int]:
        return 0, 0

    def scheduled(self, step: int) -> bool | None:
        if self.run.index(step) < self.config.warmup_steps or step == self.run.end_step - 1:
            self.accumulated = 0.0
            return False
        return None

    def metric(self, run: BranchRun, block: torch.nn.Module, mid_in: BlockIO) -> torch.Tensor:
        modulated = self.real_tokens(self.resolved.spec.modulated_input(block, mid_in.hidden, mid_in.temb))
        previous = getattr(run.state, "modulated", None)
        run.state.modulated = modulated.detach().clone()
        if previous is None:
            return torch.zeros(2, dtype=torch.float64, device=modulated.device)
        return l1_sums(modulated, previous)

    def decide(self, step: int, metric: torch.Tensor) -> None:
        change = relative(metric)
        self.accumulated += polyval(self.coefficients, change) if math.isfinite(change) else math.inf
        if self.accumulated < self.config.threshold:
            self.decision = True
        else:
            self.decision = False
            self.accumulated = 0.0

    def reuse(self, run: BranchRun, mid_in: BlockIO) -> tuple[torch.Tensor, torch.Tensor | None]:
        return apply_residual(run.state, mid_in)

    def store(self, run: BranchRun, mid_in: BlockIO, hidden: torch.Tensor, context: torch.Tensor | None) -> None:
        store_residual(run.state, mid_in, hidden, context)


def apply_teacache(module: torch.nn.Module, config: TeaCacheConfig, run: BranchRun) -> None:
    """Hook the blocks of ``module`` (the transformer) for one forward of ``run``, a branch of a TeaCache session."""
    apply_block_hooks(module, config, run, TEACACHE_HOOK)


def remove_teacache(module: torch.nn.Module) -> None:
    """Remove every TeaCache hook under ``module``."""
    remove_hooks(module.modules(), (TEACACHE_HOOK,))
