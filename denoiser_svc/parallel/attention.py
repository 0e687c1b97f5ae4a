"""Sequence-parallel attention as a wrapper around any attention kernel: Ulysses, Ring and USP (Ulysses x Ring).

A processor calls ``AttentionOps.joint(q, k, v, key_mask)`` with this rank's shard of the sequence (all heads):
``[B, S/P, H, D]`` where P = ring_degree x ulysses_degree. The wrapper

1. Ulysses (degree U): one all-to-all re-shards q, k, v from (sequence shard, all heads) to (U sequence shards,
   H/U heads): ``[B, S/P, H, D] -> [B, S*U/P, H/U, D]``;
2. Ring (degree R): K/V blocks travel around the ring group (send to the next rank while computing on the current
   block); each block gives a partial output and its log-sum-exp, merged exactly:
   ``out = sum_i exp(lse_i - lse) out_i`` with ``lse = logsumexp_i lse_i``; without ring, the kernel runs once;
3. Ulysses again: the inverse all-to-all brings the output back to (sequence shard, all heads).

Padding: sequences are zero-padded to a multiple of P by the sharder (``sharding.py``), which knows on the host
where the padding sits. The wrapper drops padded keys (and values) before every kernel call, so padding never
changes a result and the kernels run unmasked (any backend); a block that is all padding is skipped. Padded
queries compute garbage that the sharder discards. A ``key_mask`` from the processor (text padding of the model
itself) is gathered alongside the keys and handed to the kernel. A joint call made before the plan split anything
in this transformer call (blocks that run whole on every rank, ahead of the split) runs the kernel locally.

``AttentionOps.cross`` (cross-attention to replicated text K/V) is passed through: only q is sharded, no
communication is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from services.attention import AttentionFn, AttentionOps

if TYPE_CHECKING:
    from denoiser_svc.parallel.groups import ParallelGroups, RankGroup
    from denoiser_svc.parallel.sharding import KeyLayout

LseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]
"""``(q, k, v, key_mask) -> (out [B, S_q, H, D], lse [B, H, S_q] float32)`` (natural-log sum of exp of the
scaled scores), the convention of ``services.attention.backends.Backend.fn_lse``."""

_MATH_CHUNK = 1024


def _math_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None):
    """Attention written out in float32, chunked over queries (exact; the masked CUDA fallback)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    kt = k.float().permute(0, 2, 3, 1)  # [B, H, D, S_k]
    vt = v.float().transpose(1, 2)  # [B, H, S_k, D]
    bias = None
    if key_mask is not None:
        bias = torch.zeros(key_mask.shape, dtype=torch.float32, device=q.device)
        bias = bias.masked_fill(~key_mask, float("-inf"))[:, None, None, :]
    outs, lses = [], []
    for start in range(0, q.shape[1], _MATH_CHUNK):
        scores = torch.matmul(q[:, start:start + _MATH_CHUNK].float().transpose(1, 2) * scale, kt)
        if bias is not None:
            scores = scores + bias
        lse = torch.logsumexp(scores, dim=-1)  # [B, H, s]
        outs.append(torch.matmul(torch.exp(scores - lse[..., None]), vt).transpose(1, 2))
        lses.append(lse)
    return torch.cat(outs, dim=1).to(q.dtype), torch.cat(lses, dim=-1)


def default_lse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The LSE-returning kernel used when the configured backend has none: on the CPU PyTorch's flash kernel
    (``aten._scaled_dot_product_flash_attention_for_cpu``, which returns the LSE; masks as an additive bias of the
    query dtype); on CUDA the flash (half precision) or memory-efficient (float32) aten op, or the float32 math
    kernel when a key mask is present."""
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, S, D] views
    if q.device.type == "cpu":
        bias = None
        if key_mask is not None:
            bias = torch.zeros(key_mask.shape, dtype=q.dtype).masked_fill(~key_mask, float("-inf"))[:, None, None, :]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, False, attn_mask=bias)
    elif key_mask is not None:
        return _math_lse(q, k, v, key_mask)
    elif q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, False, False)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True, 0.0, False)[:2]
    b, s, h, _ = q.shape
    return out.transpose(1, 2), lse.reshape(b, h, -1)[:, :, :s].float()


def probing_lse(probe: AttentionFn, lse: LseFn) -> LseFn:
    """``lse`` that also calls ``probe`` on the same inputs, so that a shape recorder (the kernel autotuner's warm-up)
    sees the kernel calls of ring attention too. Used for one warm-up step only (it computes twice)."""

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None):
        probe(q, k, v, key_mask)
        return lse(q, k, v, key_mask)

    return fn


def merge_partial(out: torch.Tensor | None, lse: torch.Tensor | None, block_out: torch.Tensor,
                  block_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a block's partial attention into the running one. ``out`` ``[B, S, H, D]`` float32, ``lse``
    ``[B, S, H]`` float32; ``-inf`` LSE means "no key seen yet" and weighs nothing."""
    block_out = block_out.float()
    if out is None:
        return block_out, block_lse
    new_lse = torch.logaddexp(lse, block_lse)
    ref = new_lse.masked_fill(torch.isinf(new_lse), 0.0)  # both -inf: weights exp(-inf) = 0, no nan
    out = out * torch.exp(lse - ref).unsqueeze(-1) + block_out * torch.exp(block_lse - ref).unsqueeze(-1)
    return out, new_lse


def _select_keys(idx: torch.Tensor | None, *xs: torch.Tensor | None) -> list[torch.Tensor | None]:
    if idx is None:
        return list(xs)
    return [None if x is None else x.index_select(1, idx) for x in xs]


class SequenceParallelAttention:
    """``AttentionOps.joint`` over the sequence-parallel group (Ulysses, Ring or both); ``cross`` stays local."""

    def __init__(self, groups: ParallelGroups, kernel: AttentionFn, lse_kernel: LseFn | None,
                 keys: KeyLayout):
        self.ulysses: RankGroup = groups.get_ulysses_group()
        self.ring: RankGroup = groups.get_ring_group()
        self.kernel = kernel
        self.lse_kernel = lse_kernel or default_lse_attention
        self.keys = keys
        """Where the padding sits (the sharder's per-call state)."""

    def ops(self, base: AttentionOps) -> AttentionOps:
        """``base`` with its joint attention made sequence-parallel (``base.joint`` is ignored: ``kernel`` is the
        kernel that runs after the all-to-all)."""
        return AttentionOps(joint=self.joint, cross=base.cross)

    # -- Ulysses reshards (one all-to-all each way) ----------------------------------------------------------------
    def _scatter_heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        u = self.ulysses.size
        b, s, h, d = q.shape
        # q, k, v [B, S_l, H, D] -> buffer [U, 3, B, S_l, H/U, D] (slot j: the heads member j will own)
        buf = torch.empty(u, 3, b, s, h // u, d, dtype=q.dtype, device=q.device)
        for i, x in enumerate((q, k, v)):
            buf[:, i].copy_(x.view(b, s, u, h // u, d).permute(2, 0, 1, 3, 4))
        out = self.ulysses.all_to_all(buf)  # [U (source: its sequence shard), 3, B, S_l, H/U, D]
        # -> [3, B, U * S_l, H/U, D]: the U shards in source order = this rank's contiguous chunk of the sequence
        out = out.permute(1, 2, 0, 3, 4, 5).reshape(3, b, u * s, h // u, d)
        return out[0], out[1], out[2]

    def _gather_heads(self, out: torch.Tensor) -> torch.Tensor:
        u = self.ulysses.size
        b, su, hu, d = out.shape
        s = su // u
        # [B, U * S_l, H/U, D] -> [U (destination: whose sequence shard), B, S_l, H/U, D]
        buf = out.view(b, u, s, hu, d).permute(1, 0, 2, 3, 4)
        back = self.ulysses.all_to_all(buf)  # [U (source: its head group), B, S_l, H/U, D]
        return back.permute(1, 2, 0, 3, 4).reshape(b, s, u * hu, d)  # [B, S_l, H, D]

    # -- the joint call ----------------------------------------------------------------------------------------------
    @torch.compiler.disable
    def joint(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.keys.sharded():  # a part of the model that runs whole on every rank
            return self.kernel(q, k, v, key_mask)
        local_len = k.shape[1]
        self.keys.check_local_length(local_len)
        if self.ulysses.size > 1:
            q, k, v = self._scatter_heads(q, k, v)  # [B, S_l, H, D] -> [B, U * S_l, H/U, D]
            if key_mask is not None:
                key_mask = self.ulysses.all_gather(key_mask, dim=1)  # [B, S_l] -> [B, U * S_l]
        if self.ring.size > 1:
            out = self._ring(q, k, v, key_mask, local_len)
        else:
            idx = self.keys.valid_index(self._shards(self.ring.rank), local_len, q.device)
            k, v, key_mask = _select_keys(idx, k, v, key_mask)
            out = self.kernel(q, k, v, key_mask)
        if self.ulysses.size > 1:
            out = self._gather_heads(out)  # [B, U * S_l, H/U, D] -> [B, S_l, H, D]
        return out

    def _shards(self, ring_rank: int) -> list[int]:
        """Sequence-shard indices (sp ranks) held, in order, by ring member ``ring_rank`` after the all-to-all."""
        u = self.ulysses.size
        return [ring_rank * u + j for j in range(u)]

    def _ring(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
              local_len: int) -> torch.Tensor:
        r = self.ring.size
        masks = None
        if key_mask is not None:
            masks = self.ring.stack_gather(key_mask)  # [B, S_r] -> [R, B, S_r]
        kv = torch.stack([k, v])  # [2, B, S_r, H', D]: one message per hop
        out = lse = None
        for i in range(r):
            wait = self.ring.ring_pass(kv) if i < r - 1 else None
            src = (self.ring.rank - i) % r  # the ring member this block started on
            idx = self.keys.valid_index(self._shards(src), local_len, q.device)
            if idx is None or idx.numel():
                bk, bv, bm = _select_keys(idx, kv[0], kv[1], None if masks is None else masks[src])
                block_out, block_lse = self.lse_kernel(q, bk, bv, bm)
                block_lse = block_lse.transpose(1, 2)  # [B, H, S_q] -> [B, S_q, H]
                if bm is not None:  # rows whose keys are all masked contribute nothing (kernels disagree on them)
                    seen = bm.any(dim=1)[:, None, None]
                    block_lse = block_lse.masked_fill(~seen, float("-inf"))
                    block_out = block_out.masked_fill(~seen[..., None], 0.0)
                out, lse = merge_partial(out, lse, block_out, block_lse)
            if wait is not None:
                kv = wait()
        assert out is not None, "ring attention saw no valid key (a sequence of only padding)"
        return out.to(q.dtype)
