"""Cross-attention whose last keys repeat, computed over one merged key (exact; ``runtime.merge_repeated_keys``).

WanPipeline pads every UMT5 prompt embedding to 512 tokens with zero rows, and every row-wise map between the
embeddings and the attention (the text projection, the key/value projections, the key RMS norm) sends those identical
rows to identical key/value pairs. A prompt of L tokens therefore attends over L distinct keys and 512 - L copies of one
more. n copies of a key/value pair ``(k, v)`` add ``n exp(q.k) v`` to the softmax's numerator and ``n exp(q.k)`` to its
denominator: exactly what one pair with the logit ``q.k + ln n`` adds. So the attention over ``keep = L + 1`` keys, the
last one's logit raised by ``ln n``, equals the attention over all 512: the same function, summed in another order.

- ``trailing_repeats(k, v)``: per batch item, how many final rows are equal (bit for bit, key and value both) to the
  last one, as ``keep`` (keys to attend: the distinct prefix plus one representative) and ``log_count`` (``ln n``,
  float32). Computed on the device, inside compiled graphs, with no host synchronisation; a prompt with no padding
  gets ``keep = S_k`` and ``log_count = 0``, i.e. plain attention.
- ``merged_attention(q, k, v, keep, log_count)``: on CUDA (fp16/bf16, head dim a power of two up to 256) a Triton
  flash-attention kernel whose key loop stops at ``keep`` (read from the device) and that adds ``ln n`` to the last
  key's logit in float32, an opaque custom op (``chitu::merged_attention``) under ``torch.compile``; tensor shapes
  never change with the prompt, so compiled blocks and CUDA graphs do not recompile per prompt length. Elsewhere the
  same bias goes to SDPA in float32 (a bf16 mask would round ``ln 400 = 5.99`` by up to 0.016, i.e. move the merged
  key's weight by ~1.6 %, far above the kernels' rounding).
- ``merge_repeated_keys(cross)``: an ``AttentionOps.cross`` that runs the above (calls with a key mask go to ``cross``
  unchanged).

What it is worth, measured on an H200 (2026-11-28, ``benchmarks/attention_kernels.py --merged``, Wan2.1-1.3B's
cross-attention, 32760 queries x 12 heads x 128): cuDNN over all 512 keys 0.193 ms a call; this kernel 0.135 ms for a
120-token prompt, 0.336 ms for a 512-token one (Triton's flash attention runs at ~310 TFLOP/s where cuDNN's reaches
~535); the detection pass 0.043 ms eager. Whole compiled forwards: -0.4 ms (120 tokens) and +3 to +8 ms (512
tokens) of ~450 ms. The time of a call does not fall with the keys as far as the FLOPs do: reading the queries and
writing the output (200 MB) stays. So ``runtime.merge_repeated_keys`` is off by default; a faster kernel
(FlashAttention-4 with ``seqused_k`` and a ``score_mod`` adding the bias) would change that. The keys are checked,
not assumed: any prompt embedding (padded or not, by any encoder) gets exactly its own attention.
"""

from __future__ import annotations

import functools
import math

import torch

from services.attention import AttentionFn

LOG2E = 1.4426950408889634


def trailing_repeats(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep [B] int32, log_count [B] float32)`` for ``k``, ``v`` ``[B, S_k, H, D]``: the last ``n`` rows are equal
    to the last row in both ``k`` and ``v``; ``keep = S_k - n + 1``, ``log_count = ln n``."""
    s_k = k.shape[1]
    same = (k == k[:, -1:]).flatten(2).all(-1) & (v == v[:, -1:]).flatten(2).all(-1)  # [B, S_k]
    index = torch.arange(s_k, device=k.device)
    last_distinct = torch.where(same, -1, index).amax(dim=1)  # -1 when every row repeats the last
    keep = (last_distinct + 2).to(torch.int32)
    log_count = (s_k - 1 - last_distinct).to(torch.float32).log()
    return keep, log_count


def key_bias(keep: torch.Tensor, log_count: torch.Tensor, s_k: int) -> torch.Tensor:
    """The merge as an additive float32 bias ``[B, S_k]``: 0 before the representative, ``ln n`` on it (index
    ``keep - 1``), ``-inf`` after it."""
    index = torch.arange(s_k, device=keep.device)[None, :]
    last = (keep.to(torch.int64) - 1)[:, None]
    bias = torch.where(index == last, log_count[:, None], torch.zeros((), device=keep.device))
    return bias.masked_fill(index > last, float("-inf"))


def merged_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                               log_count: torch.Tensor) -> torch.Tensor:
    """The kernel's function in float32 torch ops (SDPA with the float32 bias of ``key_bias``); ``[B, S, H, D]``."""
    bias = key_bias(keep, log_count, k.shape[1])[:, None, None, :]
    qf, kf, vf = (t.transpose(1, 2).float() for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, attn_mask=bias)
    return out.transpose(1, 2).to(q.dtype)


def kernel_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the Triton kernel takes these tensors (else ``merged_attention`` runs the reference)."""
    d = q.shape[-1]
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype and v.dtype == q.dtype
            and 16 <= d <= 256 and d & (d - 1) == 0 and tuple(v.shape) == tuple(k.shape))


def merged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                     log_count: torch.Tensor, config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Attention of ``q`` over the first ``keep[b]`` keys of ``k``/``v`` (``[B, S, H, D]``), the last of them with
    ``log_count[b]`` added to its logit; softmax scale ``1 / sqrt(D)``. ``config``: the kernel's (BLOCK_M, BLOCK_N,
    warps, stages), by default ``kernel_config``. See the module doc."""
    if kernel_fits(q, k, v):
        if not torch.compiler.is_compiling():
            register_cuda_kernel()  # a compiled caller registered it before compiling (the wrapper does)
        return torch.ops.chitu.merged_attention(q, k, v, keep, log_count, list(config or kernel_config(q.shape[-1])))
    return merged_attention_reference(q, k, v, keep, log_count)


def merge_repeated_keys(cross: AttentionFn, config: tuple[int, int, int, int] | None = None) -> AttentionFn:
    """``cross`` with repeated trailing keys merged (``runtime.merge_repeated_keys``); calls with a key mask run
    ``cross`` itself. ``config``: the Triton kernel's launch config (default ``kernel_config``)."""

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  key_mask: torch.Tensor | None = None) -> torch.Tensor:
        if key_mask is not None:
            return cross(q, k, v, key_mask)
        keep, log_count = trailing_repeats(k, v)
        return merged_attention(q, k, v, keep, log_count, config)

    if torch.cuda.is_available():
        register_cuda_kernel()
    attention.merges_repeated_keys = True  # type: ignore[attr-defined]
    return attention


def kernel_config(head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, stages): fixed per head dim, so the rounding does not change between starts. Head dim
    128: the fastest of 36 configs over a 512- and a 120-token prompt together at Wan's shape (32760 queries x 12
    heads) on an H200 (``attention_kernels.py --merged``, 2026-11-28: 0.336 / 0.135 ms, against 0.390 / 0.184 ms for
    the 128 x 64, 8-warp tile usual in flash-attention kernels). The others are checked on the GPU, not tuned."""
    if head_dim <= 64:
        return 128, 64, 4, 3
    if head_dim <= 128:
        return 64, 32, 4, 3
    return 64, 32, 4, 2


@functools.cache
def register_cuda_kernel():
    """Registers the Triton kernel as ``chitu::merged_attention`` (once; Triton is imported only for CUDA). Returns
    the launcher (``benchmarks/attention_kernels.py --merged`` sweeps its configs)."""
    import triton
    import triton.language as tl

    def kernel(q_ptr, k_ptr, v_ptr, o_ptr, keep_ptr, logn_ptr, seq_q, heads,
               q_sb, q_ss, q_sh, k_sb, k_ss, k_sh, v_sb, v_ss, v_sh, o_sb, o_ss, o_sh, qk_scale,
               D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // heads).to(tl.int64)
        h = (bh % heads).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, D)
        n = tl.arange(0, BLOCK_N)
        row_live = rows < seq_q
        q = tl.load(q_ptr + b * q_sb + h * q_sh + rows.to(tl.int64)[:, None] * q_ss + d[None, :],
                    mask=row_live[:, None], other=0.0)
        keep = tl.load(keep_ptr + b)
        tail = tl.load(logn_ptr + b) * 1.4426950408889634  # ln n in the kernel's base-2 logits
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        k_ptrs = k_ptr + b * k_sb + h * k_sh + n.to(tl.int64)[:, None] * k_ss + d[None, :]
        v_ptrs = v_ptr + b * v_sb + h * v_sh + n.to(tl.int64)[:, None] * v_ss + d[None, :]
        # the key tiles before the one holding the representative (index keep - 1): no mask, no bias
        last_tile = (keep - 1) // BLOCK_N * BLOCK_N
        for start in range(0, last_tile, BLOCK_N):
            k = tl.load(k_ptrs + start * k_ss)
            s = tl.dot(q, tl.trans(k))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            p = tl.exp2(s * qk_scale - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptrs + start * v_ss)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        # the last tile: keys past the representative masked, ln n added to its logit
        cols = last_tile + n
        live = cols < keep
        k = tl.load(k_ptrs + last_tile * k_ss, mask=live[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale + tl.where(cols == keep - 1, tail, 0.0)[None, :]
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs + last_tile * v_ss, mask=live[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        out = acc / l_i[:, None]
        tl.store(o_ptr + b * o_sb + h * o_sh + rows.to(tl.int64)[:, None] * o_ss + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=row_live[:, None])

    jitted = triton.jit(kernel)

    def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, log_count: torch.Tensor,
               out: torch.Tensor, config: tuple[int, int, int, int] | None = None) -> None:
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        bsz, seq_q, heads, dim = q.shape
        block_m, block_n, warps, stages = config or kernel_config(dim)
        jitted[(triton.cdiv(seq_q, block_m), bsz * heads)](
            q, k, v, out, keep, log_count, seq_q, heads, q.stride(0), q.stride(1), q.stride(2), k.stride(0),
            k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
            out.stride(2), LOG2E / math.sqrt(dim), D=dim, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
            num_stages=stages)

    @torch.library.custom_op("chitu::merged_attention", mutates_args=())
    def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, log_count: torch.Tensor,
           config: list[int]) -> torch.Tensor:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        launch(q, k, v, keep.to(torch.int32), log_count.to(torch.float32), out, tuple(config))
        return out

    @op.register_fake
    def _(q, k, v, keep, log_count, config):
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)

    return launch
