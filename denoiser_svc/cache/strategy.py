"""The strategy contract, the per-forward context the hooks work with, and the block-range machinery that the
step- and block-level strategies share.

One step of one request, as ``CacheSession.forward`` drives it:

1. ``begin_step``: the strategy decides what its schedule decides alone (``decision``: True = reuse, False =
   compute, None = read the current step's metric first).
2. If the decision needs the current metric and this rank runs several CFG branches, each branch runs a *probe*
   forward: the blocks before the decision point compute, the metric's partial sums are recorded, everything after
   is passed through. The branches' sums are added, reduced over the group, and the strategy decides once for all.
   With one local branch the decision is taken inline, at the decision point of the real forward.
3. The real forward of every branch, with the decision fixed.
4. ``end_step``: the strategy updates its schedule state and reports the step's ``StepRecord``.

Block-range strategies split the blocks into front ``[0, f)`` (always computed; with a probe, its output is reused
by the real forward), middle ``[f, N - b)`` (computed, or replaced by the cache) and back ``[N - b, N)`` (always
computed). The decision point is the call of the first middle block. The hooks see every block call in the spec's
canonical form (``BlockIO``: image tokens, text tokens), so a range may start in one block list and end in another
of another call convention (FLUX.2: double-stream blocks, then single-stream blocks on the joint sequence).
"""

from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from denoiser_svc.cache.hooks import ModelHook, Skip, register_hook, remove_hooks
from denoiser_svc.cache.reduce import MetricReducer
from denoiser_svc.cache.registry import StrategyConfig, StrategyName
from services.families.cache_spec import BlockIO, CacheSpec, ResolvedSpec


@dataclass(frozen=True)
class RunInfo:
    """The facts of one request that a strategy plans with."""

    start_step: int
    end_step: int
    total_steps: int
    times: tuple[float, ...]
    """Schedule time of every step of the whole schedule, then the terminal time (``total_steps + 1`` values)."""
    block_costs: tuple[float, ...]
    attention_costs: tuple[float, ...]
    image_tokens: int = 0
    """Image/video tokens of the whole sequence (0: unknown, no padding is trimmed)."""

    @property
    def steps(self) -> int:
        """Steps this request runs here."""
        return self.end_step - self.start_step

    def index(self, step: int) -> int:
        """Position of ``step`` in this run (0 for its first step)."""
        return step - self.start_step

    def cost_share(self, blocks: range) -> float:
        return sum(self.block_costs[i] for i in blocks) / sum(self.block_costs)


@dataclass
class StepRecord:
    """What one step of a cached request did (identical on every rank)."""

    step: int
    hit: bool
    """The cache replaced some transformer work at this step."""
    skipped: float
    """Fraction of the transformer's block compute skipped at this step."""


@dataclass
class BranchRun:
    """Context of one forward: one request, one CFG branch, one step."""

    strategy: Strategy
    branch: str
    step: int
    state: Any
    """The branch's cache state (the strategy's ``new_branch_state()``)."""
    probe: bool = False
    metric: torch.Tensor | None = None
    """The local partial sums recorded at the decision point (probe or inline)."""
    scratch: dict[str, Any] = field(default_factory=dict)
    """Tensors of this forward only (front input, middle input, ...)."""


class Strategy(ABC):
    """A FlexCache strategy; subclasses register with ``@register(StrategyName.X, XConfig)``."""

    name: ClassVar[StrategyName]
    config_cls: ClassVar[type[StrategyConfig]]
    needs_current_metric: ClassVar[bool] = False
    """Its hit decision reads the current step's tensors (value-dependent: reduced over the group first)."""
    hook_names: ClassVar[tuple[str, ...]] = ()
    """Names of the hooks it installs (module constants of its module)."""

    def __init__(self, config: StrategyConfig, resolved: ResolvedSpec, run: RunInfo, reducer: MetricReducer):
        self.config = config
        self.resolved = resolved
        self.run = run
        self.reducer = reducer
        self.decision: bool | None = None
        self.branches: dict[str, Any] = {}

    # -- validation ------------------------------------------------------------------------------------------------
    @classmethod
    def unsupported_reason(cls, spec: CacheSpec) -> str | None:
        """Why a family with ``spec`` cannot use this strategy at all (None: it can)."""
        return spec.unsupported.get(cls.name.value)

    @classmethod
    def check(cls, config: StrategyConfig, spec: CacheSpec) -> None:
        """Model-dependent checks of ``config`` (InvalidArgument naming the field); ranges are checked already."""
        return None

    # -- per request -----------------------------------------------------------------------------------------------
    def new_branch_state(self) -> Any:
        return _State()

    def branch_state(self, branch: str) -> Any:
        if branch not in self.branches:
            self.branches[branch] = self.new_branch_state()
        return self.branches[branch]

    def begin_step(self, step: int) -> None:
        self.decision = self.scheduled(step)

    @abstractmethod
    def scheduled(self, step: int) -> bool | None:
        """The decision the schedule makes alone: True reuse, False compute, None read the metric."""

    def decide(self, step: int, metric: torch.Tensor) -> None:
        """Set ``decision`` from the group-wide metric (value-dependent strategies)."""
        raise NotImplementedError(f"{self.name.value} decides from its schedule only")

    def real_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's image tokens of ``hidden`` (``[B, S, ...]``, this rank's contiguous shard of the sequence):
        the first ``image_tokens`` of the whole sequence, without what follows them (sequence-parallel padding,
        and in a unified sequence such as Z-Image's, the family's own pad tokens and the caption), in one process
        too."""
        index, _ = self.reducer.shard
        full = self.run.image_tokens
        if not full:
            return hidden
        local = hidden.shape[1]
        return hidden[:, : max(0, min(local, full - index * local))]

    def decide_inline(self, run: BranchRun, metric: torch.Tensor) -> None:
        """Record the local metric; with no decision yet (one local branch), reduce it and decide."""
        run.metric = metric
        if not run.probe and self.decision is None:
            self.decide(run.step, self.reducer.all_reduce_sum(metric))

    @abstractmethod
    def apply(self, run: BranchRun) -> None:
        """Install this strategy's hooks on the transformer for one forward."""

    def remove(self) -> None:
        modules = [self.resolved.transformer, *self.resolved.blocks, *self.resolved.attention]
        remove_hooks(modules, self.hook_names)

    @contextlib.contextmanager
    def installed(self, run: BranchRun) -> Iterator[None]:
        self.apply(run)
        try:
            yield
        finally:
            self.remove()

    @abstractmethod
    def end_step(self, step: int) -> StepRecord:
        """Update the schedule state after every branch ran ``step``; report it."""

    def cache_bytes(self) -> int:
        """Bytes of tensors held across steps (all branches)."""
        return sum(tensor_bytes(s) for s in self.branches.values())

    def close(self) -> None:
        """Drop every cached tensor and counter (the request is finished, failed or cancelled)."""
        self.branches.clear()
        self.decision = None


class _State:
    """A branch's cache state: attributes set by the strategy."""

    def __repr__(self) -> str:
        return f"_State({sorted(vars(self))})"


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor reachable from ``obj`` (attributes, lists, tuples, dicts)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(x) for x in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(x) for x in obj.values())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, _State):
        return sum(tensor_bytes(v) for v in vars(obj).values())
    return 0


def l1_sums(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[sum |a - b|, sum |b|]`` in float64: the partial sums of the relative L1 change of ``a`` from ``b``."""
    return torch.stack([(a.float() - b.float()).abs().sum(dtype=torch.float64), b.float().abs().sum(dtype=torch.float64)])


def relative(sums: torch.Tensor) -> float:
    """Relative change from ``l1_sums`` totals (infinite when the reference is zero)."""
    num, den = (float(x) for x in sums.tolist())
    return num / den if den > 0 else float("inf")


def _clone(x: torch.Tensor | None) -> torch.Tensor | None:
    # cached tensors may come from compiled (CUDA-graph) regions whose buffers are reused: keep our own copy
    return None if x is None else x.detach().clone()


# ----------------------------------------------------------------------------------------------------------------
# Block-range strategies
# ----------------------------------------------------------------------------------------------------------------


class _BlockHook(ModelHook):
    def __init__(self, owner: BlockRangeStrategy, run: BranchRun, index: int):
        self.owner, self.run, self.index = owner, run, index

    def pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | Skip:
        return self.owner.block_pre(self.run, self.index, module, args, kwargs)

    def post_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        return self.owner.block_post(self.run, self.index, output)


class BlockRangeStrategy(Strategy):
    """Front blocks computed, middle blocks computed or replaced from the cache, back blocks computed."""

    needs_front_input: ClassVar[bool] = False
    """The metric reads the input of block 0 (front residual)."""

    def __init__(self, config: StrategyConfig, resolved: ResolvedSpec, run: RunInfo, reducer: MetricReducer):
        super().__init__(config, resolved, run, reducer)
        self.front, self.back = self.block_range()
        n = len(resolved.blocks)
        self.middle = range(self.front, n - self.back)
        self.middle_share = run.cost_share(self.middle)

    @abstractmethod
    def block_range(self) -> tuple[int, int]:
        """(front, back) block counts."""

    # strategy-specific parts -----------------------------------------------------------------------------------------
    def metric(self, run: BranchRun, block: torch.nn.Module, mid_in: BlockIO) -> torch.Tensor:
        """Local partial sums of the decision metric; may update the branch's state (called once per branch and
        step, at the decision point, also on steps whose decision the schedule made)."""
        raise NotImplementedError

    @abstractmethod
    def reuse(self, run: BranchRun, mid_in: BlockIO) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The middle's (hidden, context) output on a hit."""

    @abstractmethod
    def store(self, run: BranchRun, mid_in: BlockIO, hidden: torch.Tensor, context: torch.Tensor | None) -> None:
        """Remember what a computed middle produced."""

    # hooks -------------------------------------------------------------------------------------------------------------
    def block_pre(self, run: BranchRun, i: int, block: torch.nn.Module, args: tuple,
                  kwargs: dict[str, Any]) -> tuple[tuple, dict] | Skip:
        rs = self.resolved
        if rs.has_joint:  # joint blocks are split at the text length of the forward's separate-stream blocks
            text_len = rs.text_length(i, args, kwargs)
            if text_len is not None:
                run.scratch["text_len"] = text_len
        tl = run.scratch.get("text_len")
        first, last = self.middle.start, self.middle.stop - 1
        if i < first:
            stash = run.scratch.get("front_stash")
            if stash is not None and not run.probe:  # this step's probe computed the front already
                if i == first - 1:
                    return Skip(rs.make_output(i, *stash))
                return Skip(self._passthrough(i, args, kwargs, tl))
            if i == 0 and self.needs_front_input and run.metric is None:
                run.scratch["front_in"] = _clone(rs.block_inputs(i, args, kwargs, tl).hidden)
            return args, kwargs
        if i == first:
            io = rs.block_inputs(i, args, kwargs, tl)
            mid_in = BlockIO(_clone(io.hidden), _clone(io.context), io.temb)
            run.scratch["mid_in"] = mid_in
            if self.needs_current_metric and run.metric is None:
                if run.probe and first > 0:
                    run.scratch["front_stash"] = (mid_in.hidden, mid_in.context)
                self.decide_inline(run, self.metric(run, block, mid_in))
            if run.probe:
                return Skip(rs.make_output(i, io.hidden, io.context))
            if self.decision is None:
                raise RuntimeError(f"{self.name.value}: no cache decision at step {run.step}")
            run.scratch["hit"] = hit = bool(self.decision)
            if hit:
                return Skip(rs.make_output(i, *self.reuse(run, mid_in)) if i == last
                            else rs.make_output(i, io.hidden, io.context))
            return args, kwargs
        if run.probe or (i <= last and run.scratch["hit"]):
            if i == last and not run.probe:
                return Skip(rs.make_output(i, *self.reuse(run, run.scratch["mid_in"])))
            return Skip(self._passthrough(i, args, kwargs, tl))
        return args, kwargs

    def _passthrough(self, i: int, args: tuple, kwargs: dict[str, Any], text_len: int | None) -> Any:
        """Block ``i``'s output when it is skipped without changing the sequence (its input, in its output form)."""
        io = self.resolved.block_inputs(i, args, kwargs, text_len)
        return self.resolved.make_output(i, io.hidden, io.context)

    def block_post(self, run: BranchRun, i: int, output: Any) -> Any:
        if i == self.middle.stop - 1 and not run.probe and not run.scratch.get("hit", True):
            hidden, context = self.resolved.read_output(i, output, run.scratch.get("text_len"))
            self.store(run, run.scratch["mid_in"], hidden, context)
        return output

    def end_step(self, step: int) -> StepRecord:
        hit = bool(self.decision)
        return StepRecord(step, hit, self.middle_share if hit else 0.0)


def apply_block_hooks(module: torch.nn.Module, config: StrategyConfig, run: BranchRun, name: str) -> None:
    """Hook every block of ``module`` (the transformer) as hook ``name`` for one forward of ``run``, whose
    strategy must be the block-range strategy configured by ``config``."""
    strategy = run.strategy
    if not isinstance(strategy, BlockRangeStrategy) or strategy.config is not config:
        raise ValueError(f"{name}: run belongs to {strategy.name.value} with another config")
    if strategy.resolved.transformer is not module:
        raise ValueError(f"{name}: run's strategy is bound to another transformer")
    for i, block in enumerate(strategy.resolved.blocks):
        register_hook(block, name, _BlockHook(strategy, run, i))


def store_residual(state: Any, mid_in: BlockIO, hidden: torch.Tensor, context: torch.Tensor | None) -> None:
    """Keep the middle's residual (output - input) for both streams."""
    state.res_hidden = hidden - mid_in.hidden
    state.res_context = None if context is None or mid_in.context is None else context - mid_in.context


def apply_residual(state: Any, mid_in: BlockIO) -> tuple[torch.Tensor, torch.Tensor | None]:
    if getattr(state, "res_hidden", None) is None:
        raise RuntimeError("cache hit before any computed step (no residual cached)")
    context = mid_in.context
    if context is not None and state.res_context is not None:
        context = context + state.res_context
    return mid_in.hidden + state.res_hidden, context
