"""Process groups of a denoiser group, all built from one rank layout.

Layout order (outermost first): ``cfg, ring, ulysses``::

    layout = torch.arange(world_size).reshape(cfg_degree, ring_degree, ulysses_degree)

Ulysses is innermost so that its ranks are adjacent (its all-to-all moves the most bytes, every attention call,
and adjacent GPUs share the fastest links); ring comes next (point-to-point K/V passing, overlapped with compute);
CFG is outermost (one all-gather of the prediction per step). The sequence-parallel group ``sp`` spans ring x
ulysses; a rank's index in it (``ring_rank * ulysses_degree + ulysses_rank``) is the index of the sequence shard it
holds, so that after the Ulysses all-to-all a rank holds the contiguous chunk ``ring_rank`` of the sequence.

Groups are the rows of the layout once the axis (or axes) is moved last, so every group of one axis has the same
size and every rank is in exactly one group per axis.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from denoiser_svc.config import ParallelConfig
from services.config import ConfigError


@dataclass(frozen=True)
class Axis:
    """One kind of process group: its name, what it is called in messages, and the layout dims it spans."""

    name: str
    title: str
    dims: tuple[int, ...]


AXES: tuple[Axis, ...] = (
    Axis("cfg", "CFG-parallel", (0,)),
    Axis("ring", "ring-attention", (1,)),
    Axis("ulysses", "Ulysses", (2,)),
    Axis("sp", "sequence-parallel (ring x Ulysses)", (1, 2)),
)
"""The one table the groups and their ``get_<name>_group`` accessors are generated from."""


def rank_layout(config: ParallelConfig) -> torch.Tensor:
    """``[cfg, ring, ulysses]`` tensor of global ranks.

    Example, 8 GPUs as ``cfg_degree=2, ring_degree=2, ulysses_degree=2``::

        layout = [[[0, 1], [2, 3]],
                  [[4, 5], [6, 7]]]
        cfg groups     : [0, 4] [1, 5] [2, 6] [3, 7]   (cond on 0-3, uncond on 4-7)
        ring groups    : [0, 2] [1, 3] [4, 6] [5, 7]
        ulysses groups : [0, 1] [2, 3] [4, 5] [6, 7]
        sp groups      : [0, 1, 2, 3] [4, 5, 6, 7]      (rank 6 holds sequence shard 2 of the uncond branch)
    """
    return torch.arange(config.world_size).reshape(config.cfg_degree, config.ring_degree, config.ulysses_degree)


def axis_groups(layout: torch.Tensor, axis: Axis) -> list[list[int]]:
    """The rank lists of every group along ``axis`` (rows of the layout with the axis dims moved last)."""
    keep = [d for d in range(layout.ndim) if d not in axis.dims]
    size = math.prod(layout.shape[d] for d in axis.dims)
    return layout.permute(*keep, *axis.dims).reshape(-1, size).tolist()


# torch >= 2.13 renamed all_gather_into_tensor (the GPU image runs 2.11)
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class RankGroup:
    """One process group as this rank sees it, with the collectives the denoiser uses. A group of one rank has no
    torch.distributed group and every collective is the identity."""

    def __init__(self, axis: Axis, ranks: list[int], rank: int, group: dist.ProcessGroup | None):
        self.axis = axis
        self.ranks = tuple(ranks)
        self.global_rank = rank
        self.rank = self.ranks.index(rank)
        self.group = group

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def next_rank(self) -> int:
        """Global rank of the next member (ring order)."""
        return self.ranks[(self.rank + 1) % self.size]

    @property
    def prev_rank(self) -> int:
        return self.ranks[(self.rank - 1) % self.size]

    def __repr__(self) -> str:
        return f"RankGroup({self.axis.name}, ranks={list(self.ranks)}, rank={self.rank})"

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate every member's ``x`` (same shape on all) along ``dim``, in group order."""
        if self.size == 1:
            return x
        x = x.contiguous()
        out = torch.empty(self.size * x.numel(), dtype=x.dtype, device=x.device)
        _all_gather_flat(out, x.reshape(-1), group=self.group)
        return self._merge_gathered(out, x, dim)

    def _merge_gathered(self, out: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every member's ``x`` stacked flat in ``out`` -> ``[P, *shape]`` -> P next to ``dim`` -> merged into it."""
        return out.view(self.size, *x.shape).movedim(0, dim).flatten(dim, dim + 1)

    def stack_gather(self, x: torch.Tensor) -> torch.Tensor:
        """``[P, *x.shape]``: every member's ``x`` in group order."""
        if self.size == 1:
            return x.unsqueeze(0)
        return self.all_gather(x.unsqueeze(0), 0)

    def all_to_all_async(self, x: torch.Tensor, traced: bool = False) -> Callable[[], torch.Tensor]:
        """Start ``all_to_all(x)``; returns ``finish()``, which yields the result (the exchange runs meanwhile: NCCL
        on its own stream, gloo on its thread). ``traced``: as a functional collective, which ``torch.compile``
        traces into the compiled graph (no graph break around it, so inductor fuses the copies on either side and
        CUDA graphs can cover the whole block); run eagerly it is the same all-to-all."""
        if self.size == 1:
            return lambda: x
        assert x.shape[0] == self.size, f"all_to_all over {self.axis.name}: dim 0 is {x.shape[0]}, not {self.size}"
        x = x.contiguous()
        if traced:
            pending = funcol.all_to_all_single(x, None, None, self.group)
            return lambda: funcol.wait_tensor(pending)
        out = torch.empty_like(x)
        work = dist.all_to_all_single(out, x, group=self.group, async_op=True)

        def finish() -> torch.Tensor:
            work.wait()
            return out

        return finish

    def all_gather_traced(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """``all_gather`` as a functional collective (see ``all_to_all_async``)."""
        if self.size == 1:
            return x
        out = funcol.wait_tensor(funcol.all_gather_tensor(x.contiguous(), 0, self.group))  # [P * d0, ...]
        return self._merge_gathered(out, x, dim)

    def ring_pass(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Start sending ``x`` to the next member and receiving the previous member's; returns ``wait()`` which
        yields the received tensor (compute may run in between)."""
        x = x.contiguous()
        buf = torch.empty_like(x)
        ops = [dist.P2POp(dist.isend, x, self.next_rank, self.group),
               dist.P2POp(dist.irecv, buf, self.prev_rank, self.group)]
        works = dist.batch_isend_irecv(ops)

        def wait() -> torch.Tensor:
            for work in works:
                work.wait()
            return buf

        return wait


class ParallelGroups:
    """Every group of this rank (built once, passed to whoever needs them), plus the gloo control group.

    Accessors are generated from ``AXES``: ``get_cfg_group()``, ``get_ring_group()``, ``get_ulysses_group()``,
    ``get_sp_group()``; each fails with a message naming its group when that group was not built.
    """

    get_cfg_group: Callable[[], RankGroup]
    get_ring_group: Callable[[], RankGroup]
    get_ulysses_group: Callable[[], RankGroup]
    get_sp_group: Callable[[], RankGroup]

    def __init__(self, config: ParallelConfig, rank: int, groups: dict[str, RankGroup],
                 control: dist.ProcessGroup | None = None):
        self.config = config
        self.rank = rank
        self.world_size = config.world_size
        self._groups = groups
        self.control = control
        """gloo group over all ranks for control messages (None in a group of one)."""

    def group(self, name: str) -> RankGroup:
        group = self._groups.get(name)
        if group is None:
            title = next((a.title for a in AXES if a.name == name), name)
            raise RuntimeError(f"the {title} group ({name!r}) is not initialised on rank {self.rank}; "
                               f"built groups: {sorted(self._groups)}")
        return group

    def describe(self) -> str:
        return " ".join(f"{name}={list(g.ranks)}" for name, g in self._groups.items())

    @classmethod
    def single(cls, config: ParallelConfig | None = None) -> ParallelGroups:
        """The groups of a one-process group (every axis of size 1, no torch.distributed)."""
        config = config or ParallelConfig()
        if config.world_size != 1:
            raise ConfigError(f"a one-process group cannot run {config.describe()}")
        return cls(config, 0, {a.name: RankGroup(a, [0], 0, None) for a in AXES})

    @classmethod
    def build(cls, config: ParallelConfig, rank: int, backend: str) -> ParallelGroups:
        """Create every group; call on every rank after ``init_process_group`` (each rank creates every group of
        every axis in the same order, as torch.distributed requires)."""
        world = dist.get_world_size()
        if world != config.world_size:
            raise ConfigError(f"the process group has {world} ranks but parallel asks for {config.world_size} "
                              f"({config.describe()})")
        layout = rank_layout(config)
        groups: dict[str, RankGroup] = {}
        for axis in AXES:
            for ranks in axis_groups(layout, axis):
                pg = dist.new_group(ranks, backend=backend) if len(ranks) > 1 else None
                if rank in ranks:
                    groups[axis.name] = RankGroup(axis, ranks, rank, pg)
        # control messages wait for requests between bursts of work: no collective timeout (liveness comes from
        # heartbeats instead)
        control = dist.new_group(list(range(world)), backend="gloo", timeout=datetime.timedelta(days=365))
        return cls(config, rank, groups, control)


def _accessor(name: str) -> Callable[[ParallelGroups], RankGroup]:
    def get(self: ParallelGroups) -> RankGroup:
        return self.group(name)

    get.__name__ = f"get_{name}_group"
    get.__doc__ = f"This rank's {next(a.title for a in AXES if a.name == name)} group."
    return get


for _axis in AXES:
    setattr(ParallelGroups, f"get_{_axis.name}_group", _accessor(_axis.name))
