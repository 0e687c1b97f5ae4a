"""Residual add, layer norm and adaptive modulation in one pass (``runtime.fuse_norms``).

Every block of Wan and Flux wraps its attention and MLP in the same elementwise pattern, per token row of width D:

    h = h + gate * y                        (the branch output y added to the residual stream, gate optional)
    out = layer_norm(h) * (1 + scale) + shift   (affine layer norm or not; modulation optional)

``gate``, ``scale`` and ``shift`` come from the timestep embedding: one vector per batch element (``[B, D]`` or
``[B, 1, D]``), or one per token (Wan2.2-TI2V's ``[B, S, D]``). Written as separate ops, inductor fuses each such
chain into one reduction kernel that reads the two inputs and writes the two outputs, but ran them at ~2.2 TB/s on an
H200 (Wan: three a block, ~180 us each at 32760 x 1536). ``add_norm_modulate`` / ``norm_modulate`` compute the chain
with one Triton kernel on CUDA (a fixed launch config per row width, see ``kernel_config``; float32 math, one
rounding per output), an opaque custom op inside the compiled block graph: inductor calls it as it is (as a
``triton_op``, which inductor launches from its own generated code, the same kernel ran 1.1-2x slower on an H200:
``benchmarks/fused_kernels.py``, "compiled" rows).

Rounding follows the models: the new residual stream is rounded to its dtype and the norm reads the rounded value
(as diffusers' blocks do: they store ``h`` and normalise what they stored); the norm, the affine and the modulation
are computed in float32 and rounded once (diffusers' Flux rounds after the norm and after each modulation op in
bf16; Wan computes them in float32 like the kernel). Elsewhere (CPU, other dtypes, rows wider than the kernel
takes) the same float32 math runs as torch ops (``reference``).

``norm_modulate(text, norm, ..., second=image)`` normalises two parts into one output, text rows first (Flux's
single-stream blocks normalise the concatenation): the concatenation costs no extra pass.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

MAX_KERNEL_WIDTH = 8192
"""Widest row the kernel holds in registers (Flux and Wan blocks are 1536-5120 wide)."""


def _norm_params(norm: torch.nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None, float, int]:
    """(weight, bias, eps, width) of a ``torch.nn.LayerNorm`` (diffusers' ``FP32LayerNorm`` is one)."""
    if not isinstance(norm, torch.nn.LayerNorm) or len(norm.normalized_shape) != 1:
        raise TypeError(f"expected a LayerNorm over the last dim, got {norm}")
    return norm.weight, norm.bias, float(norm.eps), int(norm.normalized_shape[0])


def _rows(v: torch.Tensor | None, bsz: int, seq: int, width: int, name: str) -> torch.Tensor | None:
    """A per-batch (``[B, D]``, ``[B, 1, D]``) or per-token (``[B, S, D]``) vector as a ``[B, 1 or S, D]`` view."""
    if v is None:
        return None
    if v.dim() == 2:
        v = v[:, None]
    if v.dim() != 3 or v.shape[0] not in (1, bsz) or v.shape[1] not in (1, seq) or v.shape[2] != width:
        raise ValueError(f"{name} of shape {tuple(v.shape)} fits neither [B, D] nor [B, S, D] for B={bsz}, S={seq}, "
                         f"D={width}")
    return v


def reference(h: torch.Tensor, y: torch.Tensor | None, gate: torch.Tensor | None, weight: torch.Tensor | None,
              bias: torch.Tensor | None, eps: float, scale: torch.Tensor | None, shift: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's math as torch ops (float32, float64 for float64 inputs): ``(h_new, out)``; without ``y``,
    ``h_new`` is ``h``. Vectors as ``_rows`` leaves them."""
    f = torch.promote_types(h.dtype, torch.float32)
    if y is not None:
        s = h.to(f) + (y.to(f) * gate.to(f) if gate is not None else y.to(f))
        h = s.to(h.dtype)
    out = F.layer_norm(h.to(f), (h.shape[-1],), weight.to(f) if weight is not None else None,
                       bias.to(f) if bias is not None else None, eps)
    if scale is not None:
        out = out * (1 + scale.to(f))
    if shift is not None:
        out = out + shift.to(f)
    return h, out.to(h.dtype)


def _kernel_fits(*tensors: torch.Tensor | None, width: int) -> bool:
    present = [t for t in tensors if t is not None]
    return (width <= MAX_KERNEL_WIDTH and all(t.is_cuda for t in present)
            and present[0].dtype in (torch.float16, torch.bfloat16, torch.float32))


def _last_dim_dense(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def add_norm_modulate(h: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None, norm: torch.nn.Module,
                      scale: torch.Tensor | None = None, shift: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``h_new = h + gate * y`` (``h + y`` without a gate), rounded to ``h``'s dtype, and
    ``norm(h_new) * (1 + scale) + shift``; returns ``(h_new, out)``. ``h``, ``y``: ``[B, S, D]``."""
    weight, bias, eps, width = _norm_params(norm)
    bsz, seq, d = h.shape
    if d != width or y.shape != h.shape:
        raise ValueError(f"residual {tuple(h.shape)} and branch {tuple(y.shape)} must match the {width}-wide norm")
    gate, scale, shift = (_rows(v, bsz, seq, d, n) for v, n in ((gate, "gate"), (scale, "scale"), (shift, "shift")))
    if _kernel_fits(h, y, gate, scale, shift, width=d):
        if not torch.compiler.is_compiling():
            register_cuda_kernel()
        return torch.ops.chitu.add_norm_modulate(_last_dim_dense(h), _last_dim_dense(y), _last_dim_dense(gate),
                                                 weight, bias, _last_dim_dense(scale), _last_dim_dense(shift), eps)
    return reference(h, y, gate, weight, bias, eps, scale, shift)


def norm_modulate(h: torch.Tensor, norm: torch.nn.Module, scale: torch.Tensor | None = None,
                  shift: torch.Tensor | None = None, second: torch.Tensor | None = None) -> torch.Tensor:
    """``norm(h) * (1 + scale) + shift``; with ``second``, of ``cat([h, second], dim=1)`` (per-token vectors then
    cover both parts). ``h``: ``[B, S, D]``."""
    weight, bias, eps, width = _norm_params(norm)
    parts = [h] if second is None else [h, second]
    bsz, d = h.shape[0], h.shape[-1]
    seq = sum(p.shape[1] for p in parts)
    if d != width or any(p.dim() != 3 or p.shape[0] != bsz or p.shape[2] != d for p in parts):
        raise ValueError(f"inputs {[tuple(p.shape) for p in parts]} do not fit the {width}-wide norm")
    scale, shift = (_rows(v, bsz, seq, d, n) for v, n in ((scale, "scale"), (shift, "shift")))
    if _kernel_fits(*parts, scale, shift, width=d):
        if not torch.compiler.is_compiling():
            register_cuda_kernel()
        return torch.ops.chitu.norm_modulate(_last_dim_dense(h), _last_dim_dense(second), weight, bias,
                                             _last_dim_dense(scale), _last_dim_dense(shift), eps)
    x = parts[0] if second is None else torch.cat(parts, dim=1)
    return reference(x, None, None, weight, bias, eps, scale, shift)[1]


KERNEL_CONFIGS = ((1, 4), (1, 8), (2, 4), (2, 8), (4, 4), (4, 8), (4, 16), (8, 8), (8, 16))
"""(rows a program, warps) launch configs ``benchmarks/fused_kernels.py`` times against inductor's fusion."""


def kernel_config(width: int) -> tuple[int, int]:
    """The launch config for a row width: one row a program, 4 warps (8 past 4096 elements). Measured on an H200
    (2026-11-27, all nine configs at Wan's 32760 x 1536 and Flux's 4096-4608 x 3072, every variant): the fastest or
    within 0.5 % of it (Triton's autotuner picked 1 or 2 rows x 4 warps everywhere). A fixed config rather than
    autotuning at start-up: the reduction order depends on the warps, so a timing-dependent choice could change the
    rounding, and so the output of a seeded request, from one start to the next."""
    return (1, 4) if width <= 4096 else (1, 8)


@functools.cache
def register_cuda_kernel():
    """Registers the Triton kernel as ``chitu::add_norm_modulate`` and ``chitu::norm_modulate`` (once; Triton is
    imported only for CUDA). Returns the launcher (``benchmarks/fused_kernels.py`` sweeps its configs)."""
    import triton
    import triton.language as tl

    def kernel(h_ptr, y_ptr, g_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr, hout_ptr, out_ptr, rows, seq, row_off, width, eps,
               h_sb, h_ss, y_sb, y_ss, g_sb, g_ss, sc_sb, sc_ss, sh_sb, sh_ss, o_sb, o_ss,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr,
               HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
        r = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # long videos pass 2**31 elements
        b = r // seq
        s = r % seq
        d = tl.arange(0, BLOCK_D)
        mask = (r < rows)[:, None] & (d < width)[None, :]
        col = d[None, :]
        out_rows = (b * o_sb + (s + row_off) * o_ss)[:, None]
        x = tl.load(h_ptr + (b * h_sb + s * h_ss)[:, None] + col, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            y = tl.load(y_ptr + (b * y_sb + s * y_ss)[:, None] + col, mask=mask, other=0.0).to(tl.float32)
            if HAS_GATE:
                y = y * tl.load(g_ptr + (b * g_sb + s * g_ss)[:, None] + col, mask=mask, other=0.0).to(tl.float32)
            stored = (x + y).to(hout_ptr.dtype.element_ty)
            tl.store(hout_ptr + out_rows + col, stored, mask=mask)
            x = stored.to(tl.float32)  # the norm reads the residual stream as stored
        mean = tl.sum(x, axis=1) / width
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / width + eps)
        o = xc * rstd[:, None]
        if HAS_W:
            o = o * tl.load(w_ptr + d, mask=d < width, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            o = o + tl.load(b_ptr + d, mask=d < width, other=0.0).to(tl.float32)[None, :]
        if HAS_SCALE:
            o = o * (1.0 + tl.load(sc_ptr + (b * sc_sb + s * sc_ss)[:, None] + col, mask=mask,
                                   other=0.0).to(tl.float32))
        if HAS_SHIFT:
            o = o + tl.load(sh_ptr + (b * sh_sb + s * sh_ss)[:, None] + col, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + out_rows + col, o.to(out_ptr.dtype.element_ty), mask=mask)

    jitted = triton.jit(kernel)

    def vec_strides(v: torch.Tensor | None) -> tuple[int, int]:
        # a batch or token dim of size 1 is broadcast (stride 0)
        if v is None:
            return 0, 0
        return (v.stride(0) if v.shape[0] > 1 else 0), (v.stride(1) if v.shape[1] > 1 else 0)

    def launch(h: torch.Tensor, y: torch.Tensor | None, gate: torch.Tensor | None, weight: torch.Tensor | None,
               bias: torch.Tensor | None, scale: torch.Tensor | None, shift: torch.Tensor | None, eps: float,
               hout: torch.Tensor | None, out: torch.Tensor, row_off: int = 0,
               config: tuple[int, int] | None = None) -> None:
        bsz, seq, width = h.shape
        rows = bsz * seq
        y_s = (y.stride(0), y.stride(1)) if y is not None else (0, 0)
        block_m, warps = config or kernel_config(width)
        jitted[(triton.cdiv(rows, block_m),)](
            h, y if y is not None else h, gate if gate is not None else h, weight if weight is not None else h,
            bias if bias is not None else h, scale if scale is not None else h, shift if shift is not None else h,
            hout if hout is not None else out, out, rows, seq, row_off, width, eps,
            h.stride(0), h.stride(1), *y_s, *vec_strides(gate), *vec_strides(scale), *vec_strides(shift),
            out.stride(0), out.stride(1),
            BLOCK_D=triton.next_power_of_2(width), HAS_RES=y is not None, HAS_GATE=gate is not None,
            HAS_W=weight is not None, HAS_B=bias is not None, HAS_SCALE=scale is not None,
            HAS_SHIFT=shift is not None, BLOCK_M=block_m, num_warps=warps)

    def part_vec(v: torch.Tensor | None, start: int, n: int) -> torch.Tensor | None:
        return v if v is None or v.shape[1] == 1 else v[:, start:start + n]

    @torch.library.custom_op("chitu::add_norm_modulate", mutates_args=())
    def add_op(h: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor | None,
               bias: torch.Tensor | None, scale: torch.Tensor | None, shift: torch.Tensor | None,
               eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        hout = torch.empty(h.shape, dtype=h.dtype, device=h.device)
        out = torch.empty(h.shape, dtype=h.dtype, device=h.device)
        launch(h, y, gate, weight, bias, scale, shift, eps, hout, out)
        return hout, out

    @add_op.register_fake
    def _(h, y, gate, weight, bias, scale, shift, eps):
        return torch.empty(h.shape, dtype=h.dtype, device=h.device), torch.empty(h.shape, dtype=h.dtype,
                                                                                 device=h.device)

    @torch.library.custom_op("chitu::norm_modulate", mutates_args=())
    def norm_op(h: torch.Tensor, second: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
                scale: torch.Tensor | None, shift: torch.Tensor | None, eps: float) -> torch.Tensor:
        n = h.shape[1]
        rows = n + (second.shape[1] if second is not None else 0)
        out = torch.empty((h.shape[0], rows, h.shape[2]), dtype=h.dtype, device=h.device)
        launch(h, None, None, weight, bias, part_vec(scale, 0, n), part_vec(shift, 0, n), eps, None, out)
        if second is not None:
            launch(second, None, None, weight, bias, part_vec(scale, n, rows - n), part_vec(shift, n, rows - n), eps,
                   None, out, row_off=n)
        return out

    @norm_op.register_fake
    def _(h, second, weight, bias, scale, shift, eps):
        rows = h.shape[1] + (second.shape[1] if second is not None else 0)
        return torch.empty((h.shape[0], rows, h.shape[2]), dtype=h.dtype, device=h.device)

    return launch
