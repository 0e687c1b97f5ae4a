"""Applies a family's ``SequenceParallelPlan``: shards the transformer's token sequences across the
sequence-parallel group with module hooks, pads uneven lengths, gathers the outputs back.

Per transformer call:

- at every split point (``SeqSplit``) a tensor of segment ``s`` with full length ``L`` is zero-padded to
  ``Lp = ceil(L / P) * P`` and this rank keeps shard ``sp_rank`` of length ``Lp / P``; all tensors of one segment
  must agree on ``L``;
- everything between runs on the shard (per-token layers are unaffected by the split; attention re-shards);
- at every gather point (``SeqGather``) the shards are all-gathered (``[B, Lp / P, C] -> [B, Lp, C]``) and the
  padding is cut off, so the rest of the model and the scheduler see exactly the unsharded tensor.

The attention wrapper asks this object (its key layout) where the padded keys are: a rank's joint-attention
sequence is the concatenation, in ``plan.joint_layout`` order, of its shard of each segment, and padding sits at the
end of each segment's last shards. That is host-side knowledge (shapes only), so dropping padded keys costs no
device synchronisation.

Why text is sharded too (Flux, FLUX.2, Qwen-Image, Z-Image): replicating the text tokens on every rank makes each
rank compute the text stream in full (Flux 1024^2 on 4 ranks: 512 + 1024 tokens per rank instead of 1152), which
caps the speedup near 3x; attention is over the union of all ranks' tokens either way. Sharding every segment
computes each token exactly once and attends each key exactly once, which is both exact and the least work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from denoiser_svc.config import ParallelConfig
from denoiser_svc.parallel.groups import RankGroup
from services.config import ConfigError
from services.families.base import FamilyAdapter, SeqGather, SeqSplit, SequenceParallelPlan


def check_layout(config: ParallelConfig, adapter: FamilyAdapter, component: str) -> SequenceParallelPlan | None:
    """Model-dependent checks of the layout (configs only, before any rank loads weights); returns the plan."""
    if config.cfg_degree == 2 and adapter.limits().guidance_kind != "cfg":
        raise ConfigError(f"parallel.cfg_degree=2 runs the two CFG branches on different ranks, but the "
                          f"{adapter.family} family uses {adapter.limits().guidance_kind!r} guidance (one branch); "
                          f"use cfg_degree=1")
    if config.sp_degree == 1:
        return adapter.sequence_parallel_plan(component)
    plan = adapter.sequence_parallel_plan(component)
    if plan is None:
        raise ConfigError(f"the {adapter.family} family has no sequence-parallel plan; parallel.ring_degree and "
                          f"parallel.ulysses_degree must be 1")
    if plan.num_heads % config.ulysses_degree:
        raise ConfigError(f"parallel.ulysses_degree={config.ulysses_degree} must divide the model's "
                          f"{plan.num_heads} attention heads (Ulysses gives each rank heads/ulysses_degree heads); "
                          f"use a divisor of {plan.num_heads}, or ring_degree for the rest")
    chunks = config.ulysses_chunks if config.ulysses_degree > 1 else 1
    if plan.num_heads % (config.ulysses_degree * chunks):
        raise ConfigError(f"parallel.ulysses_degree={config.ulysses_degree} x parallel.ulysses_chunks={chunks} must "
                          f"divide the model's {plan.num_heads} attention heads (each chunk gives every rank the "
                          f"same number of heads); lower ulysses_chunks")
    return plan


@dataclass(frozen=True)
class _Segment:
    full: int
    """Length of the whole sequence."""
    local: int
    """Length of each rank's shard (padded length / degree)."""
    degree: int

    @property
    def padded(self) -> bool:
        return self.local * self.degree != self.full


def resolve_modules(model: Any, path: str) -> list[torch.nn.Module]:
    """``transformer.proj_out`` on a pipeline-like handle: the first part by attribute, the rest as submodules;
    ``*`` matches one path component (``transformer.transformer_blocks.*``: every block)."""
    head, _, rest = path.partition(".")
    module = model if not head else getattr(model, head, None)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"sequence-parallel plan path {path!r}: {head!r} is not a torch module of the model")
    if not rest:
        return [module]
    if "*" not in rest:
        return [module.get_submodule(rest)]
    pattern = rest.split(".")
    found = [m for name, m in module.named_modules() if name and _match(name.split("."), pattern)]
    if not found:
        raise ValueError(f"sequence-parallel plan path {path!r} matches no module")
    return found


def _match(parts: list[str], pattern: list[str]) -> bool:
    return len(parts) == len(pattern) and all(p == "*" or p == n for n, p in zip(parts, pattern, strict=True))


class UlyssesView(NamedTuple):
    """This call's joint-attention keys as a rank sees them after a Ulysses all-to-all over the whole
    sequence-parallel group (ring degree 1): immutable, rebuilt eagerly at every split, read by the traced Ulysses
    path inside compiled blocks (``torch.compile`` guards on it: the same lengths reuse the same graph)."""

    sharded: bool
    """False in the parts of a model that run whole on every rank, ahead of the split (Z-Image's refiners): joint
    attention there is the local kernel."""
    local_len: int
    """Joint keys per rank before the all-to-all (the sum of this rank's shards of the joint segments)."""
    valid: torch.Tensor | None
    """Positions of the real keys in the gathered sequence (a device tensor, cached per layout); None when nothing
    is padded."""


UNSPLIT = UlyssesView(False, 0, None)
"""The view inside a transformer call before any joint segment is split."""


class SequenceSharder:
    """Installs the plan's hooks on a loaded model and holds the per-call segment state (the key layout the
    attention wrapper reads)."""

    def __init__(self, plan: SequenceParallelPlan, group: RankGroup):
        self.plan = plan
        self.group = group
        self._segments: dict[str, _Segment] | None = None
        self.view: UlyssesView | None = None
        """Inside a transformer call (``scope``): ``UNSPLIT`` until a joint segment is split, then the layout once
        every joint segment is (see ``UlyssesView``). None outside a call and while only some joint segments are
        split (the eager path then reports the inconsistency)."""
        self._index_cache: dict[tuple, torch.Tensor | None] = {}
        self._handles: list[Any] = []

    # -- lifecycle ---------------------------------------------------------------------------------------------------
    def install(self, model: Any) -> int:
        """Register the split and gather hooks; returns how many hooks."""
        for path, splits in self.plan.splits.items():
            inputs = tuple(s for s in splits if not s.on_output)
            outputs = tuple(s for s in splits if s.on_output)
            for module in resolve_modules(model, path):
                if inputs:
                    self._handles.append(module.register_forward_pre_hook(self._input_hook(inputs),
                                                                          with_kwargs=True))
                if outputs:
                    self._handles.append(module.register_forward_hook(self._output_split_hook(outputs)))
        for path, gather in self.plan.gathers.items():
            for module in resolve_modules(model, path):
                self._handles.append(module.register_forward_hook(self._gather_hook(gather)))
        return len(self._handles)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """One transformer call: segment state starts empty and is always cleared, even after an exception."""
        self._reset()
        self.view = UNSPLIT
        try:
            yield
        finally:
            self._reset()

    def _reset(self) -> None:
        self._segments = None
        self.view = None

    def _update_view(self, device: torch.device) -> None:
        split = [name in (self._segments or {}) for name in self.plan.joint_layout]
        if not all(split):
            self.view = None if any(split) else UNSPLIT
            return
        local = sum(self._segments[name].local for name in self.plan.joint_layout)
        self.view = UlyssesView(True, local, self.valid_index(list(range(self.group.size)), local, device))

    # -- splitting and gathering -------------------------------------------------------------------------------------
    def _segment(self, name: str, full: int) -> _Segment:
        if self._segments is None:
            self._segments = {}
        seg = self._segments.get(name)
        if seg is None:
            p = self.group.size
            seg = self._segments[name] = _Segment(full, max(-(-full // p), 1), p)
        elif seg.full != full:
            raise ValueError(f"sequence-parallel plan: segment {name!r} has length {seg.full} at one split and "
                             f"{full} at another")
        return seg

    @torch.compiler.disable
    def split(self, x: torch.Tensor, spec: SeqSplit) -> torch.Tensor:
        """This rank's shard of ``x`` along ``spec.dim`` (zero-padded at the end to a multiple of the degree)."""
        out = self._split_segments(x, spec)
        self._update_view(x.device)
        return out

    def _split_segments(self, x: torch.Tensor, spec: SeqSplit) -> torch.Tensor:
        dim = spec.dim % x.ndim
        if isinstance(spec.segment, str):
            return self._split(x, dim, self._segment(spec.segment, x.shape[dim]))
        # a concatenation of segments: split each part, concatenate this rank's parts
        known = self._segments or {}
        missing = [name for name in spec.segment if name not in known]
        if missing:
            raise RuntimeError(f"sequence-parallel plan splits {spec.segment} at {spec.key!r}, but segment(s) "
                               f"{missing} have not been split earlier in this call")
        sizes = [known[name].full for name in spec.segment]
        if sum(sizes) != x.shape[dim]:
            raise RuntimeError(f"{spec.key!r} has length {x.shape[dim]} along dim {dim}; segments {spec.segment} "
                               f"have lengths {sizes}")
        parts = torch.split(x, sizes, dim)
        return torch.cat([self._split(p, dim, known[n]) for p, n in zip(parts, spec.segment, strict=True)], dim)

    def _split(self, x: torch.Tensor, dim: int, seg: _Segment) -> torch.Tensor:
        pad = seg.local * self.group.size - seg.full
        if pad:  # zeros at the end (any dtype: masks, complex rotary tables)
            x = torch.cat([x, x.new_zeros(x.shape[:dim] + (pad,) + x.shape[dim + 1:])], dim)
        return x.narrow(dim, self.group.rank * seg.local, seg.local).contiguous()

    @torch.compiler.disable
    def gather(self, x: torch.Tensor, spec: SeqGather) -> torch.Tensor:
        """The whole sequence from every rank's shard ``[.., Lp/P, ..] -> [.., L, ..]``."""
        dim = spec.dim % x.ndim
        if self._segments is None or spec.segment not in self._segments:
            raise RuntimeError(f"sequence-parallel plan gathers segment {spec.segment!r}, which no split produced "
                               f"in this call")
        seg = self._segments[spec.segment]
        if x.shape[dim] != seg.local:
            raise RuntimeError(f"gathering {spec.segment!r}: the shard has length {x.shape[dim]}, expected {seg.local}")
        return self.group.all_gather(x, dim).narrow(dim, 0, seg.full)

    def _input_hook(self, specs: tuple[SeqSplit, ...]):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            args = list(args)
            for spec in specs:
                if isinstance(spec.key, int):
                    if spec.key < len(args) and args[spec.key] is not None:
                        args[spec.key] = self.split(args[spec.key], spec)
                elif kwargs.get(spec.key) is not None:
                    kwargs[spec.key] = self.split(kwargs[spec.key], spec)
            return tuple(args), kwargs

        return hook

    def _output_split_hook(self, specs: tuple[SeqSplit, ...]):
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
            if isinstance(output, torch.Tensor):
                assert len(specs) == 1 and specs[0].key == 0, "a tensor output is split with key 0"
                return self.split(output, specs[0])
            out = list(output)
            for spec in specs:
                out[spec.key] = self.split(out[spec.key], spec)
            return type(output)(out) if isinstance(output, tuple) else out

        return hook

    def _gather_hook(self, spec: SeqGather):
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
            if spec.index is None:
                return self.gather(output, spec)
            out = list(output)
            out[spec.index] = self.gather(out[spec.index], spec)
            return type(output)(out) if isinstance(output, tuple) else out

        return hook

    # -- key layout: where the padded keys are -------------------------------------------------------------------------
    def _joint_segments(self) -> list[_Segment]:
        if self._segments is None:
            raise RuntimeError("sequence-parallel attention ran outside a sharded transformer call (no split hook ran)")
        try:
            return [self._segments[name] for name in self.plan.joint_layout]
        except KeyError as exc:
            raise RuntimeError(f"joint attention layout {self.plan.joint_layout} names segment {exc}, which no split "
                               f"produced in this call (splits so far: {sorted(self._segments)})") from None

    def sharded(self) -> bool:
        """Whether this call's joint attention runs on shards: False before any segment of the joint layout was
        split (parts of a model that run whole on every rank ahead of the split, e.g. Z-Image's refiners)."""
        return self._segments is not None and any(name in self._segments for name in self.plan.joint_layout)

    def check_local_length(self, local_len: int) -> None:
        expected = sum(seg.local for seg in self._joint_segments())
        if local_len != expected:
            raise RuntimeError(f"joint attention got {local_len} local keys, but the plan's layout "
                               f"{self.plan.joint_layout} gives {expected} on each rank")

    def valid_index(self, shards: list[int], local_len: int, device: torch.device) -> torch.Tensor | None:
        """Positions of the real (unpadded) keys in the concatenation of ``shards``' local sequences (each
        ``local_len`` long); None when nothing is padded."""
        segments = self._joint_segments()
        if not any(seg.padded for seg in segments):
            return None
        key = (tuple(shards), tuple(segments), device)
        if key not in self._index_cache:
            if len(self._index_cache) > 256:
                self._index_cache.clear()
            ranges = []
            for j, shard in enumerate(shards):
                offset = j * local_len
                for seg in segments:
                    valid = min(max(seg.full - shard * seg.local, 0), seg.local)
                    ranges.append(torch.arange(offset, offset + valid))
                    offset += seg.local
            self._index_cache[key] = torch.cat(ranges).to(device)
        return self._index_cache[key]
