"""CFG parallel: the conditional and unconditional branches of one step run on different ranks and meet once.

With ``cfg_degree=2`` the CFG group has two members: member 0 computes ``cond``, member 1 ``uncond`` (each with
its own sequence-parallel group of the same shape). After the forward, one all-gather over the CFG group gives both
predictions to both members, which mix them identically (``adapter.combine``), so every rank keeps the same latents.

A request without CFG on a ``cfg_degree=2`` group (guidance off, or no negative prompt where the family needs one)
runs ``cond`` on both halves: correct, with the second half's work wasted; such requests are better served by a
``cfg_degree=1`` group.
"""

from __future__ import annotations

import torch

from denoiser_svc.parallel.groups import RankGroup
from services.families.base import BRANCHES, Branch, DenoiseState, FamilyAdapter


class CfgCombiner:
    """Which branches this rank computes, and how the step's guided prediction is formed from them."""

    def __init__(self, group: RankGroup):
        self.group = group

    def local_branches(self, state: DenoiseState) -> tuple[Branch, ...]:
        if not state.do_cfg:
            return ("cond",)
        if self.group.size == 1:
            return BRANCHES
        return (BRANCHES[self.group.rank],)

    def guided(self, adapter: FamilyAdapter, state: DenoiseState, preds: dict[Branch, torch.Tensor]) -> torch.Tensor:
        """The prediction the scheduler steps with."""
        if not state.do_cfg:
            return preds["cond"]
        if self.group.size == 1:
            return adapter.combine(state, preds["cond"], preds["uncond"])
        (mine,) = preds.values()
        both = self.group.stack_gather(mine)  # [2, *pred.shape]: member 0's cond, member 1's uncond
        return adapter.combine(state, both[0], both[1])
