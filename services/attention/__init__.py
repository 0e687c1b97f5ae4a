"""Attention as the denoiser's processors see it: two calls, both ``[B, S, H, D]`` in and out.

- ``AttentionOps.joint(q, k, v, key_mask)``: self/joint attention; under sequence parallelism q, k and v are all
  this rank's shard of the sequence (a wrapper re-shards them: Ulysses, Ring, USP).
- ``AttentionOps.cross(q, k, v, key_mask)``: cross-attention whose keys/values (text) are replicated on every rank;
  only q is sharded, so it runs locally with no communication.

``key_mask`` is None or a bool ``[B, S_k]`` (True = attend). The kernels behind these calls come from the backend
registry (``services.attention.backends``).

``AttentionOps.start(q, k, v, key_mask)`` is joint attention in two phases: it starts the call and returns
``finish() -> out``; under sequence parallelism the start launches the input exchange, so work the caller runs
before ``finish`` (e.g. Flux's single-block MLP, which does not depend on attention) overlaps it. Without a
split-phase implementation ``finish`` simply runs ``joint``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
StartFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], Callable[[], torch.Tensor]]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """torch SDPA with PyTorch's own kernel choice; the reference path (identical to diffusers' native backend)."""
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           attn_mask=mask)
    return out.transpose(1, 2)


@dataclass(frozen=True)
class AttentionOps:
    """The attention calls a model's processors make."""

    joint: AttentionFn = sdpa_attention
    cross: AttentionFn = sdpa_attention
    joint_start: StartFn | None = None
    """Split-phase ``joint`` (see the module doc); None: ``start`` defers ``joint`` to ``finish``."""

    def start(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_mask: torch.Tensor | None = None) -> Callable[[], torch.Tensor]:
        """Start joint attention; the returned ``finish()`` gives its output."""
        if self.joint_start is not None:
            return self.joint_start(q, k, v, key_mask)
        joint = self.joint
        return lambda: joint(q, k, v, key_mask)


LOCAL_SDPA = AttentionOps()
