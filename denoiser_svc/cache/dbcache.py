"""DBCache — the Dual Block Cache of cache-dit (vipshop, 2025): ``F`` front blocks and ``B`` back blocks are
computed every step, the middle is cached.

Decision rule: the front blocks' residual ``r_t = front(x) - x`` (image tokens) is compared with the one of the last
fully computed step; when its relative L1 change (summed over every rank and CFG branch) is below ``threshold``,
the middle blocks are replaced by their cached residual (both token streams) and the back blocks still run on the
result, which corrects much of the reuse error; otherwise the middle runs and the cache is refreshed. The first
``warmup_steps`` always compute; ``max_consecutive_hits`` (0 = no cap) bounds reuses in a row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from denoiser_svc.cache.first_block import FrontResidualStrategy
from denoiser_svc.cache.hooks import remove_hooks
from denoiser_svc.cache.registry import StrategyConfig, StrategyName, register, setting
from denoiser_svc.cache.strategy import BranchRun, apply_block_hooks
from services.errors import InvalidArgument
from services.families.cache_spec import CacheSpec

DBCACHE_HOOK = "flexcache.dbcache"


@dataclass(frozen=True)
class DBCacheConfig(StrategyConfig):
    """Settings of DBCache (``chitu.v1.DBCacheConfig``)."""

    threshold: float = setting(0.08, 0.0, 1.0)
    """Bound on the relative L1 change of the front blocks' residual; 0 never reuses."""
    front_blocks: int = setting(1, 1, 1000)
    """Blocks computed every step before the middle (their residual decides)."""
    back_blocks: int = setting(1, 0, 1000)
    """Blocks computed every step after the middle."""
    warmup_steps: int = setting(2, 1, 1000)
    """Steps always computed at the start of the run."""
    max_consecutive_hits: int = setting(3, 0, 1000)
    """Reuses in a row before a step must compute; 0 means no cap."""


@register(StrategyName.DBCACHE, DBCacheConfig)
class DBCache(FrontResidualStrategy):
    hook_names = (DBCACHE_HOOK,)
    config: DBCacheConfig

    @classmethod
    def check(cls, config: StrategyConfig, spec: CacheSpec) -> None:
        assert isinstance(config, DBCacheConfig)
        n = spec.total_blocks
        if config.front_blocks + config.back_blocks >= n:
            raise InvalidArgument(
                f"cache.dbcache.front_blocks={config.front_blocks} + back_blocks={config.back_blocks} leave no middle "
                f"block to cache: this model has {n} blocks; allowed: front_blocks >= 1, back_blocks >= 0, "
                f"front_blocks + back_blocks <= {n - 1}")

    def block_range(self) -> tuple[int, int]:
        return self.config.front_blocks, self.config.back_blocks

    def apply(self, run: BranchRun) -> None:
        apply_dbcache(self.resolved.transformer, self.config, run)


def apply_dbcache(module: torch.nn.Module, config: DBCacheConfig, run: BranchRun) -> None:
    """Hook the blocks of ``module`` (the transformer) for one forward of ``run``, a branch of a DBCache session."""
    apply_block_hooks(module, config, run, DBCACHE_HOOK)


def remove_dbcache(module: torch.nn.Module) -> None:
    """Remove every DBCache hook under ``module``."""
    remove_hooks(module.modules(), (DBCACHE_HOOK,))
