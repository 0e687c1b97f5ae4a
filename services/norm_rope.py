"""Query/key RMS norm and rotary embedding in one pass (``runtime.fuse_norm_rope``).

Flux and Wan normalise the attention queries and keys (RMS norm with a learned scale: per head in Flux, across all
heads in Wan) and then rotate interleaved pairs (0, 1), (2, 3), ... of each head by the token's rotary angles. Written
as separate ops, inductor fuses them into one kernel but reads the 2-element pairs and the reduction poorly: measured
on an H200 (2026-11-27) the Wan kernel moved 400 MB in 465 us (0.86 TB/s), Flux's single-block one ran at 1.15 TB/s.

``norm_rope`` computes ``rotate(rms_norm(x) * weight)`` with one Triton kernel on CUDA: a program takes one token (a
fixed launch config per row width, ``kernel_config``: ~3.8 TB/s on an H200), loads each token's row (all heads) once, reduces in float32, applies the scale and the rotation in float32 and
writes the row once, rounded to the input dtype once; an opaque custom op (``chitu::norm_rope``) that compiled blocks
call as it is. Without rotary tables it is the norm alone (Wan's cross-attention queries and keys). Flux's double-stream blocks normalise the text and image queries with different
weights and attend over their concatenation: ``norm_rope(text, ..., second=image, ...)`` writes both into one output,
so the concatenation costs no extra pass. Elsewhere (CPU, float32, a head dim that is not a power of two) the same
float32 math runs as torch ops.

Rotary tables are ``(cos, sin)``, one row per output token, each holding the angle of a pair twice
(``cos[..., 2i] == cos[..., 2i + 1]``: diffusers builds them with ``repeat_interleave``); a leading batch of one and a
singleton head dim (Wan's ``[1, S, 1, D]``) are accepted, in any float dtype: the kernel reads them as they are and
converts each value to float32 as it loads it (a model cast to bf16 carries bf16 tables: converting them to float32
before every call had cost an extra pass per table and per block, 0.65 ms of Wan's forward on an H200, and twice the
table bytes in the kernel). The kernel applies ``out[2i] = x[2i] cos[2i] - x[2i+1]
sin[2i]``, ``out[2i+1] = x[2i+1] cos[2i+1] + x[2i] sin[2i+1]``: diffusers' Flux formula; Wan's, which reads
``cos[0::2]`` and ``sin[1::2]``, is the same on such tables (the GPU test compares both against the models' own code).
"""

from __future__ import annotations

import functools

import torch


def _table(t: torch.Tensor, rows: int, head_dim: int) -> torch.Tensor:
    """A rotary table as a ``[rows, head_dim]`` view in its own dtype (never copied)."""
    if t.dim() == 4:  # [1, S, 1, D]
        t = t[0, :, 0]
    if t.dim() == 3:  # [1, S, D]
        t = t[0]
    if tuple(t.shape) != (rows, head_dim):
        raise ValueError(f"rotary table of shape {tuple(t.shape)} does not match {rows} tokens x head dim {head_dim}")
    if not t.is_floating_point():
        raise ValueError(f"rotary table of dtype {t.dtype}: expected a float dtype")
    return t


def _norm_params(norm: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor | None, float, bool]:
    """(weight, eps, per_head) of a diffusers ``RMSNorm`` over the head dim or a ``torch.nn.RMSNorm`` over all heads."""
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "eps", None)
    if eps is None:  # torch.nn.RMSNorm(eps=None): the input dtype's machine epsilon
        eps = torch.finfo(x.dtype).eps
    # torch.nn.RMSNorm.normalized_shape / diffusers' RMSNorm.dim: both a tuple of the normalised dims
    width = int((getattr(norm, "normalized_shape", None) or norm.dim)[-1])
    h, d = x.shape[-2:]
    if width == d:
        return weight, float(eps), True
    if width == h * d:
        return weight, float(eps), False
    raise ValueError(f"RMS norm over {width} features fits neither the head dim {d} nor all {h} heads")


def norm_rope_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float, per_head: bool,
                        cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
    """The kernel's math as torch ops, in float32 (float64 for float64 inputs); ``x`` ``[B, S, H, D]``, tables
    ``[S, D]`` (None: the norm alone)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    if per_head:
        var = xf.pow(2).mean(-1, keepdim=True)
    else:
        var = xf.pow(2).mean((-2, -1), keepdim=True)
    y = xf * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(y.dtype).view(y.shape[-1] if per_head else y.shape[-2:])
    if cos is None:
        return y.to(x.dtype)
    e, o = y.unflatten(-1, (-1, 2)).unbind(-1)
    ce, co = cos[:, None].to(y.dtype).unflatten(-1, (-1, 2)).unbind(-1)
    se, so = sin[:, None].to(y.dtype).unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([e * ce - o * se, o * co + e * so], dim=-1).flatten(-2).to(x.dtype)


def norm_rope(x: torch.Tensor, norm: torch.nn.Module, rotary: tuple[torch.Tensor, torch.Tensor] | None,
              second: torch.Tensor | None = None, second_norm: torch.nn.Module | None = None) -> torch.Tensor:
    """``rotate(norm(x))`` for ``x`` ``[B, S, H, D]``; with ``second``, ``rotate(cat([norm(x), second_norm(second)],
    dim=1))`` (the rotary tables then cover both); ``rotary=None``: the norm alone (Wan's cross-attention query).
    See the module doc."""
    weight, eps, per_head = _norm_params(norm, x)
    parts = [(x, weight)]
    if second is not None:
        w2, eps2, per_head2 = _norm_params(second_norm, second)
        if (eps2, per_head2) != (eps, per_head):
            raise ValueError("both parts of a concatenated norm_rope need the same kind of RMS norm")
        parts.append((second, w2))
    rows = sum(p.shape[1] for p, _ in parts)
    cos, sin = (_table(t, rows, x.shape[-1]) for t in rotary) if rotary is not None else (None, None)
    dim = x.shape[-1]
    kernel_fits = dim >= 2 and dim & (dim - 1) == 0  # the kernel's head-dim range is a power of two
    if kernel_fits and x.is_cuda and all(p.is_cuda for p, _ in parts) and x.dtype in (torch.float16, torch.bfloat16):
        if not torch.compiler.is_compiling():
            register_cuda_kernel()  # a compiled caller registered it before compiling (``fuse_norm_rope``)
        return torch.ops.chitu.norm_rope(x, weight, second, parts[1][1] if second is not None else None, cos, sin,
                                         eps, per_head)
    outs, start = [], 0
    for part, w in parts:
        n = part.shape[1]
        tables = (cos[start:start + n], sin[start:start + n]) if cos is not None else (None, None)
        outs.append(norm_rope_reference(part, w, eps, per_head, *tables))
        start += n
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


KERNEL_CONFIGS = ((1, 2), (1, 4), (1, 8), (2, 4), (2, 8), (4, 4), (4, 8), (8, 8))
"""(tokens a program, warps) launch configs ``benchmarks/fused_kernels.py`` times against inductor's fusion."""


def kernel_config(tile: int) -> tuple[int, int]:
    """The launch config for a token's tile of ``tile`` = padded heads x head dim elements: one token a program, a warp
    per 1024 elements (2 to 8). Measured on an H200 (2026-11-27; Wan 16 x 128 padded: 1 x 2 warps 62 us, the fastest
    within 0.2 %; Flux 32 x 128: 1 x 4 warps 16.4 us, the fastest). Fixed rather than autotuned so that the rounding
    (the reduction order depends on the warps) does not change from one start to the next."""
    return 1, min(8, max(2, tile // 1024))


@functools.cache
def register_cuda_kernel():
    """Registers the Triton kernel as the ``chitu::norm_rope`` op (once; Triton is imported only for CUDA). Returns
    the launcher (``benchmarks/fused_kernels.py`` sweeps its configs)."""
    import triton
    import triton.language as tl

    def kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, rows, seq, row_off, x_sb, x_ss, out_sb, out_ss, t_ss, t_sd,
               eps, H: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
               PER_HEAD: tl.constexpr, HAS_W: tl.constexpr, HAS_ROPE: tl.constexpr):
        r = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # long videos pass 2**31 elements
        b = r // seq
        s = r % seq
        live = (r < rows)[:, None, None]
        h = tl.arange(0, BLOCK_H)[None, :, None]
        d = tl.arange(0, D)[None, None, :]
        mask = live & (h < H) & (d < D)
        x = tl.load(x_ptr + (b * x_sb + s * x_ss)[:, None, None] + h * D + d, mask=mask, other=0.0).to(tl.float32)
        if PER_HEAD:
            rstd = tl.rsqrt(tl.sum(x * x, axis=2) / D + eps)[:, :, None]
        else:
            rstd = tl.rsqrt(tl.sum(tl.sum(x * x, axis=2), axis=1) / (H * D) + eps)[:, None, None]
        y = x * rstd
        if HAS_W:
            if PER_HEAD:
                w = tl.load(w_ptr + d).to(tl.float32)
            else:
                w = tl.load(w_ptr + h * D + d, mask=(h < H) & (d < D), other=0.0).to(tl.float32)
            y = y * w
        if HAS_ROPE:
            row = (s + row_off)[:, None, None]
            c = tl.load(cos_ptr + row * t_ss + d * t_sd, mask=live & (d < D), other=0.0).to(tl.float32)
            sn = tl.load(sin_ptr + row * t_ss + d * t_sd, mask=live & (d < D), other=0.0).to(tl.float32)
            ye, yo = tl.split(tl.reshape(y, (BLOCK_M, BLOCK_H, D // 2, 2)))
            ce, co = tl.split(tl.reshape(c, (BLOCK_M, 1, D // 2, 2)))
            se, so = tl.split(tl.reshape(sn, (BLOCK_M, 1, D // 2, 2)))
            out = tl.reshape(tl.join(ye * ce - yo * se, yo * co + ye * so), (BLOCK_M, BLOCK_H, D))
        else:
            out = y
        tl.store(out_ptr + (b * out_sb + (s + row_off) * out_ss)[:, None, None] + h * D + d,
                 out.to(out_ptr.dtype.element_ty), mask=mask)

    jitted = triton.jit(kernel)

    def launch(part: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor | None, sin: torch.Tensor | None,
               out: torch.Tensor, row_off: int, eps: float, per_head: bool,
               config: tuple[int, int] | None = None) -> None:
        bsz, seq, heads, dim = part.shape
        if part.stride(-1) != 1 or part.stride(-2) != dim:  # every token's heads must be one contiguous row
            part = part.contiguous()
        rows = bsz * seq
        block_m, warps = config or kernel_config(triton.next_power_of_2(heads) * dim)
        jitted[(triton.cdiv(rows, block_m),)](
            part, weight if weight is not None else part, cos if cos is not None else part,
            sin if sin is not None else part, out, rows, seq, row_off, part.stride(0), part.stride(1), out.stride(0),
            out.stride(1), cos.stride(0) if cos is not None else 0, cos.stride(1) if cos is not None else 0, eps,
            H=heads, D=dim, BLOCK_H=triton.next_power_of_2(heads), PER_HEAD=per_head, HAS_W=weight is not None,
            HAS_ROPE=cos is not None, BLOCK_M=block_m, num_warps=warps)

    @torch.library.custom_op("chitu::norm_rope", mutates_args=())
    def op(x: torch.Tensor, weight: torch.Tensor | None, second: torch.Tensor | None,
           second_weight: torch.Tensor | None, cos: torch.Tensor | None, sin: torch.Tensor | None, eps: float,
           per_head: bool) -> torch.Tensor:
        bsz, seq, heads, dim = x.shape
        rows = seq + (second.shape[1] if second is not None else 0)
        out = x.new_empty((bsz, rows, heads, dim))
        launch(x, weight, cos, sin, out, 0, eps, per_head)
        if second is not None:
            launch(second, second_weight, cos, sin, out, seq, eps, per_head)
        return out

    @op.register_fake
    def _(x, weight, second, second_weight, cos, sin, eps, per_head):
        bsz, seq, heads, dim = x.shape
        return x.new_empty((bsz, seq + (second.shape[1] if second is not None else 0), heads, dim))

    return launch
