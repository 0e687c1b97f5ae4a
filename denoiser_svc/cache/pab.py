"""PAB — Zhao et al., "Real-Time Video Generation with Pyramid Attention Broadcast" (ICLR 2025).

Attention outputs change little between adjacent steps in the middle of denoising, so an attention module's
output is computed once and *broadcast* (reused) over the next steps; the rest of every block runs normally.

Decision rule (a fixed schedule, the same on every rank): inside the window ``[start_fraction, end_fraction)`` of
the run, every attention module (the family's ``CacheSpec.attention`` of each block) computes on the window's first
step and then every ``interval``-th step and returns its cached output on the steps between; outside the window it
always computes. Under sequence parallelism a broadcast step also skips the attention's all-to-all / ring passes,
on every rank alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from denoiser_svc.cache.blockdance import window
from denoiser_svc.cache.hooks import ModelHook, Skip, register_hook, remove_hooks
from denoiser_svc.cache.registry import StrategyConfig, StrategyName, register, setting
from denoiser_svc.cache.strategy import BranchRun, StepRecord, Strategy
from services.errors import InvalidArgument
from services.families.cache_spec import CacheSpec

PAB_HOOK = "flexcache.pab"


@dataclass(frozen=True)
class PABConfig(StrategyConfig):
    """Settings of Pyramid Attention Broadcast (``chitu.v1.PABConfig``)."""

    interval: int = setting(2, 1, 100)
    """In the window: attention recomputed every ``interval`` steps and broadcast between; 1 never reuses."""
    start_fraction: float = setting(0.2, 0.0, 1.0)
    """Where in the run broadcasting starts."""
    end_fraction: float = setting(0.9, 0.0, 1.0)
    """Where in the run broadcasting stops (above ``start_fraction``)."""

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.end_fraction <= self.start_fraction:
            raise InvalidArgument(f"{prefix}.end_fraction={self.end_fraction} must be above start_fraction="
                                  f"{self.start_fraction}; allowed: start_fraction < end_fraction <= 1")


def _clone_output(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.detach().clone()
    if isinstance(output, tuple | list):
        return type(output)(_clone_output(x) for x in output)
    return output


class _AttentionHook(ModelHook):
    def __init__(self, owner: PAB, run: BranchRun, index: int):
        self.owner, self.run, self.index = owner, run, index

    def pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | Skip:
        if self.owner.decision:
            return Skip(self.run.state.outputs[self.index])
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        if not self.owner.decision and self.owner.keep(self.run.step):
            self.run.state.outputs[self.index] = _clone_output(output)
        return output


@register(StrategyName.PAB, PABConfig)
class PAB(Strategy):
    hook_names = (PAB_HOOK,)
    config: PABConfig

    @classmethod
    def unsupported_reason(cls, spec: CacheSpec) -> str | None:
        if spec.attention is None:
            return "its adapter names no attention module per block"
        return super().unsupported_reason(spec)

    @classmethod
    def check(cls, config: StrategyConfig, spec: CacheSpec) -> None:
        assert isinstance(config, PABConfig)  # the window is checked with the config (PABConfig.validate)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.window = window(self.run.steps, self.config.start_fraction, self.config.end_fraction)
        run = self.run
        self.share = sum(run.attention_costs) / sum(run.block_costs)

    def new_branch_state(self) -> Any:
        state = super().new_branch_state()
        state.outputs = {}
        return state

    def apply(self, run: BranchRun) -> None:
        apply_pab(self.resolved.transformer, self.config, run)

    def scheduled(self, step: int) -> bool | None:
        idx = self.run.index(step)
        return idx in self.window and (idx - self.window.start) % self.config.interval != 0

    def keep(self, step: int) -> bool:
        """Whether the outputs computed at ``step`` may be broadcast to a later step."""
        return self.run.index(step) + 1 in self.window

    def end_step(self, step: int) -> StepRecord:
        hit = bool(self.decision)
        if not hit and not self.keep(step):
            for state in self.branches.values():
                state.outputs.clear()
        return StepRecord(step, hit, self.share if hit else 0.0)


def apply_pab(module: torch.nn.Module, config: PABConfig, run: BranchRun) -> None:
    """Hook the attention modules of ``module``'s blocks for one forward of ``run``, a branch of a PAB session."""
    strategy = run.strategy
    if not isinstance(strategy, PAB) or strategy.config is not config or strategy.resolved.transformer is not module:
        raise ValueError(f"{PAB_HOOK}: run belongs to another strategy, config or transformer")
    for i, attn in enumerate(strategy.resolved.attention):
        register_hook(attn, PAB_HOOK, _AttentionHook(strategy, run, i))


def remove_pab(module: torch.nn.Module) -> None:
    """Remove every PAB hook under ``module``."""
    remove_hooks(module.modules(), (PAB_HOOK,))
