"""Per-request cache sessions and the per-model ``FlexCache`` that owns them.

``FlexCache`` lives next to the loaded transformer (one per worker). A request with a cache policy gets a
``CacheSession`` in ``open`` (keyed by request id); each step's branch forwards go through ``forward``; ``release``
drops the session and returns its accounting, and the worker calls it in ``finally`` on every path (finished,
failed, cancelled), so no state outlives its request. Hooks are installed for one forward at a time and removed in
``finally`` too: between forwards the model is exactly the loaded model, and requests with different strategies (or
none) interleave freely.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from denoiser_svc.cache.policy import CachePolicy, validate_for_model
from denoiser_svc.cache.reduce import LOCAL_REDUCER, MetricReducer
from denoiser_svc.cache.registry import get_strategy
from denoiser_svc.cache.strategy import BranchRun, RunInfo, StepRecord, Strategy
from services.families.base import DenoiseState, FamilyAdapter
from services.families.cache_spec import CacheSpec, ResolvedSpec
from services.log import get_logger

log = get_logger(__name__)

ForwardFn = Callable[[str], torch.Tensor]
"""One transformer call for one CFG branch (the runner's closure over the request's state and step)."""


@dataclass
class CacheSummary:
    """The accounting of one cached request."""

    strategy: str
    config: str
    records: list[StepRecord]
    peak_bytes: int

    @property
    def skipped_fraction(self) -> float:
        """Fraction of the run's transformer block compute that the cache skipped."""
        return sum(r.skipped for r in self.records) / len(self.records) if self.records else 0.0

    @property
    def pattern(self) -> str:
        """One letter per step: ``C`` computed, ``H`` the cache replaced work."""
        return "".join("H" if r.hit else "C" for r in self.records)

    def metadata(self) -> dict[str, str]:
        """``DenoiseSummary.metadata`` entries (forwarded to ``GenerationResult.metadata`` and the sidecar JSON)."""
        return {"cache.strategy": self.strategy, "cache.config": self.config, "cache.steps": str(len(self.records)),
                "cache.hit_steps": str(sum(r.hit for r in self.records)), "cache.pattern": self.pattern,
                "cache.skipped_fraction": f"{self.skipped_fraction:.4f}",
                "cache.skipped_per_step": json.dumps([round(r.skipped, 4) for r in self.records]),
                "cache.memory_bytes": str(self.peak_bytes)}


class CacheSession:
    """One request's strategy instance, its per-branch state and its accounting."""

    def __init__(self, request_id: str, strategy: Strategy):
        self.request_id = request_id
        self.strategy = strategy
        self.records: list[StepRecord] = []
        self.peak_bytes = 0

    def forward(self, step: int, branches: tuple[str, ...], fn: ForwardFn) -> dict[str, torch.Tensor]:
        """Run every local branch of ``step`` under the cache (see ``denoiser_svc.cache.strategy``)."""
        s = self.strategy
        s.begin_step(step)
        runs = {b: BranchRun(s, b, step, s.branch_state(b)) for b in branches}
        if s.decision is None and len(branches) > 1:
            # several CFG branches on this rank: probe each up to the decision point, decide once for all
            total: torch.Tensor | None = None
            for b in branches:
                run = runs[b]
                run.probe = True
                with s.installed(run):
                    fn(b)
                run.probe = False
                if run.metric is None:
                    raise RuntimeError(f"{s.name.value}: the probe of branch {b!r} never reached the decision point")
                total = run.metric if total is None else total + run.metric
            assert total is not None
            s.decide(step, s.reducer.all_reduce_sum(total))
        preds: dict[str, torch.Tensor] = {}
        for b in branches:
            with s.installed(runs[b]):
                preds[b] = fn(b)
        record = s.end_step(step)
        self.records.append(record)
        self.peak_bytes = max(self.peak_bytes, s.cache_bytes())
        return preds

    def summary(self) -> CacheSummary:
        return CacheSummary(self.strategy.name.value, self.strategy.config.describe(), list(self.records),
                            self.peak_bytes)

    def close(self) -> None:
        self.strategy.remove()
        self.strategy.close()


class FlexCache:
    """The cache sessions of one loaded transformer, keyed by request id.

    ``reducer`` is how value-dependent metrics are summed over the ranks that share a request: the identity in a
    group of one process, a group all-reduce (``GroupReducer``) in a multi-process group.
    """

    def __init__(self, adapter: FamilyAdapter, model: Any, component: str = "transformer",
                 reducer: MetricReducer = LOCAL_REDUCER):
        self.adapter = adapter
        self.model = model
        self.reducer = reducer
        self.spec: CacheSpec | None = adapter.cache_spec(component)
        self._resolved: ResolvedSpec | None = None
        self.sessions: dict[str, CacheSession] = {}

    @property
    def resolved(self) -> ResolvedSpec:
        if self.spec is None:
            raise RuntimeError(f"the {self.adapter.family} family has no cache spec")
        if self._resolved is None:
            self._resolved = self.spec.resolve(self.model)
        return self._resolved

    def open(self, request_id: str, policy: CachePolicy | None, state: DenoiseState) -> None:
        """Start ``request_id``'s session (nothing when ``policy`` is None: full compute)."""
        self.release(request_id)
        if policy is None:
            return
        validate_for_model(policy, self.spec, self.adapter.family)  # the server checked; jobs may come from elsewhere
        cls = get_strategy(policy.strategy)
        spec = self.spec
        assert spec is not None
        image_tokens, text_tokens = spec.tokens(state) if spec.tokens is not None else (0, 0)
        block_costs, attention_costs = spec.costs(image_tokens, text_tokens)
        times = tuple(float(t) for t in state.timesteps.detach().float().cpu().tolist()) + (0.0,)
        run = RunInfo(start_step=state.start_step, end_step=state.end_step, total_steps=state.total_steps,
                      times=times, block_costs=block_costs, attention_costs=attention_costs,
                      image_tokens=image_tokens)
        strategy = cls(policy.config, self.resolved, run, self.reducer)
        self.sessions[request_id] = CacheSession(request_id, strategy)
        log.info("flexcache_open", request_id=request_id, strategy=policy.strategy.value,
                 config=policy.config.describe(), steps=run.steps)

    def forward(self, request_id: str, step: int, branches: tuple[str, ...], fn: ForwardFn) -> dict[str, torch.Tensor]:
        """Each local branch's prediction at ``step``: plain forwards without a session, cached ones with one."""
        session = self.sessions.get(request_id)
        if session is None:
            return {b: fn(b) for b in branches}
        return session.forward(step, branches, fn)

    def release(self, request_id: str) -> dict[str, str]:
        """Drop ``request_id``'s session (if any) and return its accounting as summary metadata."""
        session = self.sessions.pop(request_id, None)
        if session is None:
            return {}
        try:
            summary = session.summary()
        finally:
            session.close()
        meta = summary.metadata()
        log.info("flexcache_summary", request_id=request_id, **{k.removeprefix("cache."): v for k, v in meta.items()})
        return meta
