"""MeanCache — Gao et al., "MeanCache: From Instantaneous to Average Velocity for Accelerating Flow Matching
Inference" (ICLR 2026).

Step-level: on a reused step the transformer does not run at all; its prediction (the flow-matching velocity) is
built from the last *fresh* (computed) predictions. Reusing the instantaneous velocity ``v(t_f)`` drifts; MeanCache
uses the *average* velocity over the step's interval ``[t_i, t_{i+1}]`` instead, corrected to first order with the
velocity's rate of change estimated from earlier fresh steps (the role the paper's cached JVP plays):
``v_hat_i = v_f + (t_mid - t_f) * (v_f - v_p) / (t_f - t_p)``, ``t_mid = (t_i + t_{i+1}) / 2``, where ``f`` and
``p`` are the last two fresh steps (with one fresh step: ``v_f``). Fresh steps run unchanged.

Decision rule (a fixed schedule, the same on every rank, for any step count): ``round(fresh_fraction * steps)``
fresh steps (at least ``warmup_steps + final_steps``): the first ``warmup_steps``, the last ``final_steps``, and the
rest spread evenly over the steps in between (midpoints of equal segments).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from denoiser_svc.cache.hooks import ModelHook, Skip, register_hook, remove_hooks
from denoiser_svc.cache.registry import StrategyConfig, StrategyName, register, setting
from denoiser_svc.cache.strategy import BranchRun, StepRecord, Strategy, tensor_bytes

MEANCACHE_HOOK = "flexcache.meancache"


@dataclass(frozen=True)
class MeanCacheConfig(StrategyConfig):
    """Settings of MeanCache (``chitu.v1.MeanCacheConfig``)."""

    fresh_fraction: float = setting(0.5, 0.0, 1.0, lo_open=True)
    """Fraction of the steps that run the transformer; 1 never reuses."""
    warmup_steps: int = setting(2, 1, 1000)
    """Steps always fresh at the start (two give the first slope)."""
    final_steps: int = setting(1, 0, 1000)
    """Steps always fresh at the end."""


def fresh_steps(steps: int, fresh_fraction: float, warmup_steps: int, final_steps: int) -> frozenset[int]:
    """The run indices that compute, for a run of ``steps`` steps."""
    head = min(warmup_steps, steps)
    tail = min(final_steps, steps - head)
    middle = steps - head - tail
    budget = max(head + tail, min(steps, math.floor(fresh_fraction * steps + 0.5)))
    k = min(budget - head - tail, middle)
    inner = {head + math.floor((j + 0.5) * middle / k) for j in range(k)} if k > 0 else set()
    return frozenset(range(head)) | frozenset(range(steps - tail, steps)) | frozenset(inner)


Prediction = torch.Tensor | list[torch.Tensor]
"""The transformer's prediction: one tensor, or one tensor per batch element (Z-Image returns a list)."""


def _prediction(output: Any) -> Prediction:
    """The prediction in a transformer's output: the output itself, its first item, or a ModelOutput's first field."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list):
        first = output[0]
        return list(first) if isinstance(first, list | tuple) else first
    return output[next(iter(output.keys()))]  # a diffusers ModelOutput


def _replace_prediction(output: Any, value: Prediction) -> Any:
    if isinstance(output, torch.Tensor):
        return value
    if isinstance(output, tuple | list):
        return type(output)([value, *output[1:]])
    out = type(output)(**dict(output))
    out[next(iter(output.keys()))] = value
    return out


def _each(fn: Callable[..., torch.Tensor], *values: Prediction) -> Prediction:
    """``fn`` applied to the tensors of predictions of one structure (per batch element for lists)."""
    if isinstance(values[0], torch.Tensor):
        return fn(*values)
    return [fn(*items) for items in zip(*values, strict=True)]


class _MeanCacheHook(ModelHook):
    def __init__(self, owner: MeanCache, run: BranchRun):
        self.owner, self.run = owner, run

    def pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | Skip:
        if self.owner.decision:
            return Skip(self.owner.estimate(self.run))
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        if not self.owner.decision:
            self.owner.record(self.run, output)
        return output


@register(StrategyName.MEANCACHE, MeanCacheConfig)
class MeanCache(Strategy):
    hook_names = (MEANCACHE_HOOK,)
    config: MeanCacheConfig

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        c = self.config
        self.fresh = fresh_steps(self.run.steps, c.fresh_fraction, c.warmup_steps, c.final_steps)

    def apply(self, run: BranchRun) -> None:
        apply_meancache(self.resolved.transformer, self.config, run)

    def remove(self) -> None:
        remove_hooks([self.resolved.transformer], self.hook_names)

    def scheduled(self, step: int) -> bool | None:
        return self.run.index(step) not in self.fresh

    def record(self, run: BranchRun, output: Any) -> None:
        state = run.state
        state.previous = getattr(state, "latest", None)
        velocity = _each(lambda v: v.detach().clone(), _prediction(output))
        state.latest = (self.run.times[run.step], velocity)
        state.template = _replace_prediction(output, velocity)  # the output's structure, holding only our copy

    def estimate(self, run: BranchRun) -> Any:
        state = run.state
        t_f, v_f = state.latest
        velocity = v_f
        if state.previous is not None:
            t_p, v_p = state.previous
            t_mid = 0.5 * (self.run.times[run.step] + self.run.times[run.step + 1])
            slope = (t_mid - t_f) / (t_f - t_p)
            velocity = _each(lambda f, p: f + slope * (f - p), v_f, v_p)
        return _replace_prediction(state.template, velocity)

    def end_step(self, step: int) -> StepRecord:
        hit = bool(self.decision)
        return StepRecord(step, hit, 1.0 if hit else 0.0)

    def cache_bytes(self) -> int:
        total = 0
        for state in self.branches.values():
            for name in ("latest", "previous"):
                item = getattr(state, name, None)
                if item is not None:
                    total += tensor_bytes(item[1])
        return total


def apply_meancache(module: torch.nn.Module, config: MeanCacheConfig, run: BranchRun) -> None:
    """Hook ``module`` (the transformer) for one forward of ``run``, a branch of a MeanCache session."""
    strategy = run.strategy
    if not isinstance(strategy, MeanCache) or strategy.config is not config or strategy.resolved.transformer is not module:
        raise ValueError(f"{MEANCACHE_HOOK}: run belongs to another strategy, config or transformer")
    register_hook(module, MEANCACHE_HOOK, _MeanCacheHook(strategy, run))


def remove_meancache(module: torch.nn.Module) -> None:
    """Remove the MeanCache hook from ``module``."""
    remove_hooks([module], (MEANCACHE_HOOK,))
