"""How cache metrics become identical on every rank of a denoiser group.

A strategy whose hit decision reads tensor values (a relative change, a residual magnitude) first computes the
metric's *partial sums* on this rank (its sequence shard, its CFG branches) as a small float64 tensor, then asks the
worker's ``MetricReducer`` for the sum over every rank that works on the request (the sequence-parallel and the
CFG-parallel groups). Every rank then evaluates the same decision rule on bit-identical sums, so all ranks (and
both CFG branches) take the same branch of the forward, and the collectives inside it stay matched.

One process: ``LOCAL_REDUCER`` (identity). A multi-process group: ``GroupReducer`` over its groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch


class MetricReducer(Protocol):
    """Sums metric partial sums over the ranks of a denoiser group that share a request."""

    shard: tuple[int, int]
    """(index, count) of this rank's contiguous shard of the image/video token sequence (sequence parallelism pads
    the sequence at its end; metrics leave the padding out so that they equal the unsharded ones)."""

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``values`` (float64, a few elements) over the group; identical on every rank."""


class LocalReducer:
    """A group of one process: the local sums are the sums."""

    shard = (0, 1)

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        return values


LOCAL_REDUCER = LocalReducer()


class GroupReducer:
    """All-reduce over torch.distributed process groups, one after the other.

    ``groups`` are the groups whose ranks share a request (for a ``ParallelGroups`` ``g``:
    ``[g.get_sp_group(), g.get_cfg_group()]``); items may be ``torch.distributed.ProcessGroup``s or objects with a
    ``.group`` attribute holding one (``None`` = a group of one, skipped); ``shard`` is this rank's index in the
    sequence-parallel group and that group's size (``(g.get_sp_group().rank, g.get_sp_group().size)``). Summing over the sequence-parallel group
    and then over the CFG group gives the sum over their product, and each all-reduce leaves the same bits on every
    member, so the result is identical on every rank.
    """

    def __init__(self, groups: Sequence[Any], shard: tuple[int, int] = (0, 1)):
        self.groups = [getattr(g, "group", g) for g in groups]
        self.shard = shard

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = values.clone()
        for group in self.groups:
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out
