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

Compilation: with ``parallel.trace_collectives`` (the default) a Ulysses-only group (ring degree 1) runs its
all-to-alls as functional collectives that ``torch.compile`` traces, so a compiled block is one graph from its input
projections through the all-to-alls and the kernel to its output projection: inductor fuses the re-shard copies into
the neighbouring kernels and CUDA graphs can replay the whole block instead of launching its collectives from the
host. The host-side layout (lengths, which keys are padding) is read from the sharder's immutable ``UlyssesView``,
rebuilt eagerly at each split, on which the compiled graph is guarded. Ring and USP layouts (point-to-point K/V
passing) keep their communication outside the graph (``torch.compiler.disable``); a joint call made before the split
is the local kernel, traced too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from services.attention import AttentionFn, AttentionOps

if TYPE_CHECKING:
    from denoiser_svc.parallel.groups import ParallelGroups, RankGroup
    from denoiser_svc.parallel.sharding import SequenceSharder

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


def _ready(out: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A ``finish`` for a result computed at once (nothing to overlap)."""
    return lambda: out


def _select_keys(idx: torch.Tensor | None, *xs: torch.Tensor | None) -> list[torch.Tensor | None]:
    if idx is None:
        return list(xs)
    return [None if x is None else x.index_select(1, idx) for x in xs]


class SequenceParallelAttention:
    """``AttentionOps.joint`` over the sequence-parallel group (Ulysses, Ring or both); ``cross`` stays local."""

    def __init__(self, groups: ParallelGroups, kernel: AttentionFn, lse_kernel: LseFn | None,
                 keys: SequenceSharder, trace_collectives: bool = True, chunks: int = 1):
        self.ulysses: RankGroup = groups.get_ulysses_group()
        self.ring: RankGroup = groups.get_ring_group()
        self.kernel = kernel
        self.lse_kernel = lse_kernel or default_lse_attention
        self.keys = keys
        """Where the padding sits (the sharder's per-call state)."""
        self.traced = trace_collectives and self.ring.size == 1 and self.ulysses.size > 1
        """Ulysses through traceable functional collectives (see the module doc); fixed for the wrapper's life."""
        self.chunks = chunks if self.ulysses.size > 1 else 1
        """Head chunks whose Ulysses exchanges overlap the attention of the previous chunk (``_ulysses``)."""

    def ops(self, base: AttentionOps) -> AttentionOps:
        """``base`` with its joint attention made sequence-parallel (``base.joint`` is ignored: ``kernel`` is the
        kernel that runs after the all-to-all)."""
        return AttentionOps(joint=self.joint, cross=base.cross, joint_start=self.joint_start)

    # -- Ulysses: one all-to-all each way per head chunk, pipelined ---------------------------------------------------
    def _start_all_to_all(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        return self.ulysses.all_to_all_async(x, traced=self.traced)

    def _ulysses_start(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                       attend: Callable[..., torch.Tensor]) -> Callable[[], torch.Tensor]:
        """Start ``attend(q, k, v, key_mask)`` on this rank's heads of the gathered sequence, Ulysses around it:
        ``[B, S_l, H, D] -> [B, U * S_l, H/U, D] -> attend -> [B, S_l, H, D]``.

        With ``chunks`` C > 1 the heads go in C groups: every group's all-to-all starts first (they queue on the
        communication stream), then group i is attended while group i+1 is still in flight, and group i's output
        goes back while group i+1 is attended; only the first input and the last output exchange stay exposed.
        Head h of the model is head ``h % (H/C/U)`` of rank ``(h // (H/C/U)) % U`` in chunk ``h // (H/C)``; each
        chunk is exact on its own, so the result does not depend on C. The input exchanges start here; the returned
        ``finish`` waits for them, attends and brings the output back (work run in between overlaps the exchanges)."""
        u, c = self.ulysses.size, self.chunks
        b, s, h, d = q.shape
        hu = h // (c * u)  # heads per rank per chunk
        # q, k, v [B, S_l, H, D] -> [C, U, 3, B, S_l, H/(C U), D]: chunk j, slot m = the heads member m will own
        buf = torch.stack([x.reshape(b, s, c, u, hu, d) for x in (q, k, v)]).permute(3, 4, 0, 1, 2, 5, 6).contiguous()
        sent = [self._start_all_to_all(buf[j]) for j in range(c)]
        if key_mask is not None:
            key_mask = self._gather_mask(key_mask)  # [B, S_l] -> [B, U * S_l]

        def finish_all() -> torch.Tensor:
            back = []
            for finish in sent:
                # [U (source: its sequence shard), 3, B, S_l, hu, D] -> [3, B, U * S_l, hu, D]: the U shards in
                # source order = this rank's contiguous chunk of the sequence
                got = finish().permute(1, 2, 0, 3, 4, 5).reshape(3, b, u * s, hu, d)
                out = attend(got[0], got[1], got[2], key_mask)  # [B, U * S_l, hu, D]
                # -> [U (destination: whose sequence shard), B, S_l, hu, D]
                back.append(self._start_all_to_all(out.reshape(b, u, s, hu, d).permute(1, 0, 2, 3, 4)))
            # each [U (source: its head group), B, S_l, hu, D] -> [B, S_l, U * hu, D]; chunks in head order
            outs = [finish().permute(1, 2, 0, 3, 4).reshape(b, s, u * hu, d) for finish in back]
            return outs[0] if c == 1 else torch.cat(outs, dim=2)

        return finish_all

    def _gather_mask(self, key_mask: torch.Tensor) -> torch.Tensor:
        if self.traced:
            return self.ulysses.all_gather_traced(key_mask, dim=1)
        return self.ulysses.all_gather(key_mask, dim=1)

    def _local(self, valid: torch.Tensor | None) -> Callable[..., torch.Tensor]:
        """The kernel on the gathered sequence, padded keys dropped (``valid``: positions of the real keys)."""

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
            k, v, key_mask = _select_keys(valid, k, v, key_mask)
            return self.kernel(q, k, v, key_mask)

        return attend

    # -- the joint call ----------------------------------------------------------------------------------------------
    def joint(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.joint_start(q, k, v, key_mask)()

    def joint_start(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_mask: torch.Tensor | None = None) -> Callable[[], torch.Tensor]:
        """``joint`` in two phases (``AttentionOps.start``): the input exchange starts now."""
        view = self.keys.view if self.traced else None
        if view is None:
            return self._start_outside_graph(q, k, v, key_mask)
        if not view.sharded:  # a part of the model that runs whole on every rank, ahead of the split
            return _ready(self.kernel(q, k, v, key_mask))
        # traced Ulysses: every step traceable (functional all-to-alls, padding dropped by the view's index)
        if k.shape[1] != view.local_len:
            raise RuntimeError(f"joint attention got {k.shape[1]} local keys, but the plan's layout "
                               f"{self.keys.plan.joint_layout} gives {view.local_len} on each rank")
        return self._ulysses_start(q, k, v, key_mask, self._local(view.valid))

    @torch.compiler.disable
    def _start_outside_graph(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             key_mask: torch.Tensor | None = None) -> Callable[[], torch.Tensor]:
        """The eager collectives (c10d, or Ring's point-to-point passes), behind graph breaks: ``finish`` is
        ``torch.compiler.disable``d too."""
        if not self.keys.sharded():  # a part of the model that runs whole on every rank
            return _ready(self.kernel(q, k, v, key_mask))
        local_len = k.shape[1]
        self.keys.check_local_length(local_len)
        if self.ring.size > 1:
            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None):
                return self._ring(q, k, v, key_mask, local_len)
        else:
            attend = self._local(self.keys.valid_index(self._shards(0), local_len, q.device))
        if self.ulysses.size == 1:
            return _ready(attend(q, k, v, key_mask))
        return torch.compiler.disable(self._ulysses_start(q, k, v, key_mask, attend))

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
