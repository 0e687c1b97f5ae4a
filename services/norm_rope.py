"""Query/key RMS norm and rotary embedding in one pass (``runtime.fuse_norm_rope``).

Flux and Wan normalise the attention queries and keys (RMS norm with a learned scale: per head in Flux, across all
heads in Wan) and then rotate interleaved pairs (0, 1), (2, 3), ... of each head by the token's rotary angles. Written
as separate ops, inductor fuses them into one kernel but reads the 2-element pairs and the reduction poorly: measured
on an H200 (2026-11-27) the Wan kernel moved 400 MB in 465 us (0.86 TB/s), Flux's single-block one ran at 1.15 TB/s.

``norm_rope`` computes ``rotate(rms_norm(x) * weight)`` with one Triton kernel on CUDA: a program per token loads the
token's row (all heads) once, reduces in float32, applies the scale and the rotation in float32 and writes the row once,
rounded to the input dtype once. Flux's double-stream blocks normalise the text and image queries with different
weights and attend over their concatenation: ``norm_rope(text, ..., second=image, ...)`` writes both into one output,
so the concatenation costs no extra pass. Elsewhere (CPU, float32, a head dim that is not a power of two) the same
float32 math runs as torch ops.

Rotary tables are ``(cos, sin)``, one row per output token, each holding the angle of a pair twice
(``cos[..., 2i] == cos[..., 2i + 1]``: diffusers builds them with ``repeat_interleave``); a leading batch of one and a
singleton head dim (Wan's ``[1, S, 1, D]``) are accepted. The kernel applies ``out[2i] = x[2i] cos[2i] - x[2i+1]
sin[2i]``, ``out[2i+1] = x[2i+1] cos[2i+1] + x[2i] sin[2i+1]``: diffusers' Flux formula; Wan's, which reads
``cos[0::2]`` and ``sin[1::2]``, is the same on such tables (the GPU test compares both against the models' own code).
"""

from __future__ import annotations

import functools

import torch


def _table(t: torch.Tensor, rows: int, head_dim: int) -> torch.Tensor:
    """A rotary table as a ``[rows, head_dim]`` view, at least float32 (a float32 table is not copied)."""
    if t.dim() == 4:  # [1, S, 1, D]
        t = t[0, :, 0]
    if t.dim() == 3:  # [1, S, D]
        t = t[0]
    if tuple(t.shape) != (rows, head_dim):
        raise ValueError(f"rotary table of shape {tuple(t.shape)} does not match {rows} tokens x head dim {head_dim}")
    return t.to(torch.promote_types(t.dtype, torch.float32))


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
                        cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The kernel's math as torch ops, in float32 (float64 for float64 inputs); ``x`` ``[B, S, H, D]``, tables
    ``[S, D]``."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    if per_head:
        var = xf.pow(2).mean(-1, keepdim=True)
    else:
        var = xf.pow(2).mean((-2, -1), keepdim=True)
    y = xf * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(y.dtype).view(y.shape[-1] if per_head else y.shape[-2:])
    e, o = y.unflatten(-1, (-1, 2)).unbind(-1)
    ce, co = cos[:, None].to(y.dtype).unflatten(-1, (-1, 2)).unbind(-1)
    se, so = sin[:, None].to(y.dtype).unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([e * ce - o * se, o * co + e * so], dim=-1).flatten(-2).to(x.dtype)


def norm_rope(x: torch.Tensor, norm: torch.nn.Module, rotary: tuple[torch.Tensor, torch.Tensor],
              second: torch.Tensor | None = None, second_norm: torch.nn.Module | None = None) -> torch.Tensor:
    """``rotate(norm(x))`` for ``x`` ``[B, S, H, D]``; with ``second``, ``rotate(cat([norm(x), second_norm(second)],
    dim=1))`` (the rotary tables then cover both). See the module doc."""
    weight, eps, per_head = _norm_params(norm, x)
    parts = [(x, weight)]
    if second is not None:
        w2, eps2, per_head2 = _norm_params(second_norm, second)
        if (eps2, per_head2) != (eps, per_head):
            raise ValueError("both parts of a concatenated norm_rope need the same kind of RMS norm")
        parts.append((second, w2))
    rows = sum(p.shape[1] for p, _ in parts)
    cos, sin = (_table(t, rows, x.shape[-1]) for t in rotary)
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
        outs.append(norm_rope_reference(part, w, eps, per_head, cos[start:start + n], sin[start:start + n]))
        start += n
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


@functools.cache
def register_cuda_kernel():
    """Registers the Triton kernel as the ``chitu::norm_rope`` op (once; Triton is imported only for CUDA)."""
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, seq, row_off, x_sb, x_ss, out_sb, out_ss, t_ss, t_sd, eps,
               H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, PER_HEAD: tl.constexpr,
               HAS_W: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)  # offsets of long videos (x batch) pass 2**31
        b = pid // seq
        s = pid % seq
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, D)[None, :]
        mask = (h < H) & (d < D)
        x = tl.load(x_ptr + b * x_sb + s * x_ss + h * D + d, mask=mask, other=0.0).to(tl.float32)
        if PER_HEAD:
            rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
        else:
            rstd = tl.rsqrt(tl.sum(tl.sum(x * x, axis=1), axis=0) / (H * D) + eps)
        y = x * rstd
        if HAS_W:
            if PER_HEAD:
                w = tl.load(w_ptr + d).to(tl.float32)
            else:
                w = tl.load(w_ptr + h * D + d, mask=mask, other=0.0).to(tl.float32)
            y = y * w
        row = s + row_off
        c = tl.load(cos_ptr + row * t_ss + d * t_sd)
        sn = tl.load(sin_ptr + row * t_ss + d * t_sd)
        ye, yo = tl.split(tl.reshape(y, (BLOCK_H, D // 2, 2)))
        ce, co = tl.split(tl.reshape(c, (1, D // 2, 2)))
        se, so = tl.split(tl.reshape(sn, (1, D // 2, 2)))
        out = tl.reshape(tl.join(ye * ce - yo * se, yo * co + ye * so), (BLOCK_H, D))
        tl.store(out_ptr + b * out_sb + row * out_ss + h * D + d, out.to(out_ptr.dtype.element_ty), mask=mask)

    def launch(part: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
               out: torch.Tensor, row_off: int, eps: float, per_head: bool) -> None:
        bsz, seq, heads, dim = part.shape
        if part.stride(-1) != 1 or part.stride(-2) != dim:  # every token's heads must be one contiguous row
            part = part.contiguous()
        wrap_triton(kernel)[(bsz * seq,)](
            part, weight if weight is not None else part, cos, sin, out, seq, row_off, part.stride(0),
            part.stride(1), out.stride(0), out.stride(1), cos.stride(0), cos.stride(1), eps, H=heads, D=dim,
            BLOCK_H=triton.next_power_of_2(heads), PER_HEAD=per_head, HAS_W=weight is not None,
            num_warps=4 if heads * dim <= 2048 else 8)

    @triton_op("chitu::norm_rope", mutates_args={})
    def op(x: torch.Tensor, weight: torch.Tensor | None, second: torch.Tensor | None,
           second_weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, eps: float,
           per_head: bool) -> torch.Tensor:
        bsz, seq, heads, dim = x.shape
        rows = seq + (second.shape[1] if second is not None else 0)
        out = x.new_empty((bsz, rows, heads, dim))
        launch(x, weight, cos, sin, out, 0, eps, per_head)
        if second is not None:
            launch(second, second_weight, cos, sin, out, seq, eps, per_head)
        return out

    return op
