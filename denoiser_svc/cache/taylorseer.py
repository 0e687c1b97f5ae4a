"""TaylorSeer — Liu et al., "From Reusing to Forecasting: Accelerating Diffusion Models with TaylorSeers"
(ICCV 2025).

Decision rule (a fixed schedule, the same on every rank): after ``warmup_steps`` computed steps, one step in every
``interval`` computes the forecast blocks; the steps in between *forecast* their residual (output minus input, both
token streams) with a Taylor series around the last computed step, from derivatives cached at computed steps
(finite differences up to ``order``, taken in the schedule's own time so uneven step sizes are handled; order 0 is
plain reuse). ``front_blocks`` and ``back_blocks`` run on every step around the forecast ones, which keeps the
forecast anchored to the current input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from denoiser_svc.cache.hooks import remove_hooks
from denoiser_svc.cache.registry import StrategyConfig, StrategyName, register, setting
from denoiser_svc.cache.strategy import BlockRangeStrategy, BranchRun, apply_block_hooks
from services.errors import InvalidArgument
from services.families.cache_spec import BlockIO, CacheSpec

TAYLORSEER_HOOK = "flexcache.taylorseer"


@dataclass(frozen=True)
class TaylorSeerConfig(StrategyConfig):
    """Settings of TaylorSeer (``chitu.v1.TaylorSeerConfig``)."""

    interval: int = setting(3, 1, 100)
    """One computed step every ``interval`` steps (after warm-up); 1 never forecasts."""
    order: int = setting(1, 0, 3)
    """Order of the Taylor series (derivatives cached per stream)."""
    warmup_steps: int = setting(2, 1, 1000)
    """Steps always computed at the start of the run."""
    front_blocks: int = setting(0, 0, 1000)
    """Blocks computed every step before the forecast ones."""
    back_blocks: int = setting(0, 0, 1000)
    """Blocks computed every step after the forecast ones."""


@dataclass
class _Series:
    """Newton divided differences (derivatives / k!) of one tensor stream over the last ``order + 1`` computed
    times, newest first, kept in float32 (differences of close bf16 tensors would lose most of their digits)."""

    times: list[float] = field(default_factory=list)
    diffs: list[torch.Tensor] = field(default_factory=list)

    def add(self, t: float, value: torch.Tensor, order: int) -> None:
        diffs = [value.float()]
        for k in range(1, min(order, len(self.diffs)) + 1):
            diffs.append((diffs[k - 1] - self.diffs[k - 1]) / (t - self.times[k - 1]))
        self.times = [t, *self.times][: order + 1]
        self.diffs = diffs

    def at(self, t: float, dtype: torch.dtype) -> torch.Tensor:
        out = self.diffs[0]
        factor = 1.0
        for k in range(1, len(self.diffs)):
            factor *= t - self.times[k - 1]
            out = out + factor * self.diffs[k]
        return out.to(dtype)


@register(StrategyName.TAYLORSEER, TaylorSeerConfig)
class TaylorSeer(BlockRangeStrategy):
    hook_names = (TAYLORSEER_HOOK,)
    config: TaylorSeerConfig

    @classmethod
    def check(cls, config: StrategyConfig, spec: CacheSpec) -> None:
        assert isinstance(config, TaylorSeerConfig)
        n = spec.total_blocks
        if config.front_blocks + config.back_blocks >= n:
            raise InvalidArgument(
                f"cache.taylorseer.front_blocks={config.front_blocks} + back_blocks={config.back_blocks} leave no block "
                f"to forecast: this model has {n} blocks; allowed: front_blocks + back_blocks <= {n - 1}")

    def block_range(self) -> tuple[int, int]:
        return self.config.front_blocks, self.config.back_blocks

    def apply(self, run: BranchRun) -> None:
        apply_taylorseer(self.resolved.transformer, self.config, run)

    def scheduled(self, step: int) -> bool | None:
        idx = self.run.index(step)
        warm = self.config.warmup_steps
        return not (idx < warm or (idx - warm) % self.config.interval == 0)

    def reuse(self, run: BranchRun, mid_in: BlockIO) -> tuple[torch.Tensor, torch.Tensor | None]:
        t = self.run.times[run.step]
        hidden = mid_in.hidden + run.state.hidden.at(t, mid_in.hidden.dtype)
        context = mid_in.context
        if context is not None and run.state.context is not None:
            context = context + run.state.context.at(t, context.dtype)
        return hidden, context

    def store(self, run: BranchRun, mid_in: BlockIO, hidden: torch.Tensor, context: torch.Tensor | None) -> None:
        t, order = self.run.times[run.step], self.config.order
        state = run.state
        if getattr(state, "hidden", None) is None:
            state.hidden = _Series()
            state.context = _Series() if context is not None and mid_in.context is not None else None
        state.hidden.add(t, hidden - mid_in.hidden, order)
        if state.context is not None:
            state.context.add(t, context - mid_in.context, order)


def apply_taylorseer(module: torch.nn.Module, config: TaylorSeerConfig, run: BranchRun) -> None:
    """Hook the blocks of ``module`` (the transformer) for one forward of ``run``, a branch of a TaylorSeer session."""
    apply_block_hooks(module, config, run, TAYLORSEER_HOOK)


def remove_taylorseer(module: torch.nn.Module) -> None:
    """Remove every TaylorSeer hook under ``module``."""
    remove_hooks(module.modules(), (TAYLORSEER_HOOK,))
