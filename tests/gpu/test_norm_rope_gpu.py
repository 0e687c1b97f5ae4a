"""The Triton query/key RMS norm + rotary kernel (``services.norm_rope``) on the GPU, at the real models' shapes.

Tolerances: the kernel and ``norm_rope_reference`` compute in float32 and round once to bf16, in a different order:
they differ by at most one bf16 step on some elements (< 3e-3 relative over a tensor). Against the models' own bf16
code (which rounds after the norm and again after the rotation) the bound is the exact-path bound, 1e-2.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb, get_1d_rotary_pos_embed
from diffusers.models.normalization import RMSNorm

from services.families.processors.wan import apply_rotary_emb as wan_rotary
from services.norm_rope import norm_rope, norm_rope_reference, register_cuda_kernel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEV = torch.device("cuda")
BF16 = torch.bfloat16


def _tables(rows: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = get_1d_rotary_pos_embed(dim, torch.arange(rows, dtype=torch.float64) * 0.61,
                                       repeat_interleave_real=True, use_real=True, freqs_dtype=torch.float64)
    return cos.float().to(DEV), sin.float().to(DEV)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _qkv_view(tokens: int, heads: int, dim: int, seed: int) -> torch.Tensor:
    """A query as the fused QKV GEMM leaves it: every token's row strided by 3 x heads x dim."""
    g = torch.Generator(DEV).manual_seed(seed)
    fused = torch.randn(1, tokens, 3 * heads * dim, generator=g, device=DEV, dtype=BF16) * 3
    return fused[..., : heads * dim].unflatten(-1, (heads, dim))


def _rms(width: int, cls, seed: int):
    norm = (RMSNorm(width, eps=1e-6) if cls is RMSNorm else torch.nn.RMSNorm(width, eps=1e-6)).to(DEV, BF16)
    norm.weight.data = torch.rand(width, generator=torch.Generator(DEV).manual_seed(seed), device=DEV).to(BF16) + 0.5
    return norm


def test_wan_shape_matches_reference_and_wan_code() -> None:
    register_cuda_kernel()
    q = _qkv_view(32760, 12, 128, seed=0)
    norm = _rms(12 * 128, torch.nn.RMSNorm, seed=1)
    cos, sin = _tables(32760, 128)
    rope = (cos[None, :, None], sin[None, :, None])  # Wan's [1, S, 1, D]
    got = norm_rope(q, norm, rope)
    assert got.is_contiguous() and got.dtype == BF16
    ref = norm_rope_reference(q, norm.weight, 1e-6, False, cos, sin)
    assert _rel(got, ref) < 3e-3
    assert _rel(got, wan_rotary(norm(q.flatten(2)).unflatten(2, (12, -1)), *rope)) < 1e-2


def test_wan_cross_attention_norm_without_rotation() -> None:
    q = _qkv_view(32760, 12, 128, seed=10)
    norm = _rms(12 * 128, torch.nn.RMSNorm, seed=11)
    got = norm_rope(q, norm, None)
    assert _rel(got, norm_rope_reference(q, norm.weight, 1e-6, False, None, None)) < 3e-3
    assert _rel(got, norm(q.flatten(2)).unflatten(2, (12, -1))) < 1e-2  # Wan's own op


@pytest.mark.parametrize("n_txt,n_img", [(0, 4608), (512, 4096), (512, 1024)])
def test_flux_shapes_match_reference_and_flux_code(n_txt, n_img) -> None:
    img = _qkv_view(n_img, 24, 128, seed=2)
    norm = _rms(128, RMSNorm, seed=3)
    cos, sin = _tables(n_txt + n_img, 128)
    if n_txt:
        txt = _qkv_view(n_txt, 24, 128, seed=4)
        added = _rms(128, RMSNorm, seed=5)
        got = norm_rope(txt, added, (cos, sin), second=img, second_norm=norm)
        ref = torch.cat([norm_rope_reference(txt, added.weight, 1e-6, True, cos[:n_txt], sin[:n_txt]),
                         norm_rope_reference(img, norm.weight, 1e-6, True, cos[n_txt:], sin[n_txt:])], dim=1)
        model = apply_rotary_emb(torch.cat([added(txt), norm(img)], dim=1), (cos, sin), sequence_dim=1)
    else:
        got = norm_rope(img, norm, (cos, sin))
        ref = norm_rope_reference(img, norm.weight, 1e-6, True, cos, sin)
        model = apply_rotary_emb(norm(img), (cos, sin), sequence_dim=1)
    assert got.shape == (1, n_txt + n_img, 24, 128)
    assert _rel(got, ref) < 3e-3
    assert _rel(got, model) < 1e-2


def test_compiled_callers_keep_the_kernel_in_their_graph() -> None:
    register_cuda_kernel()
    img, txt = _qkv_view(1024, 24, 128, seed=6), _qkv_view(256, 24, 128, seed=7)
    norm, added = _rms(128, RMSNorm, seed=8), _rms(128, RMSNorm, seed=9)
    rope = _tables(1280, 128)

    def block(txt, img):
        return norm_rope(txt * 1.0, added, rope, second=img, second_norm=norm) * 2.0

    compiled = torch.compile(block, fullgraph=True)
    with torch.inference_mode():  # as the worker runs it (the op has no backward)
        got, ref = compiled(txt, img), block(txt, img)
    # inductor builds the same kernel with its own compile options (FMA contraction): measured on an H200, 95 of
    # 3.9M elements one bf16 step apart, relative error ~1e-4; anything beyond rounding would be far above 1e-3
    assert (got != ref).float().mean() < 1e-3
    assert _rel(got, ref) < 1e-3


def test_bf16_tables_read_as_they_are() -> None:
    """A bf16 model's rotary tables go to the kernel without a float32 copy: one kernel runs, no conversion kernel
    before it; the kernel converts each value as it loads it, so the output is the float32 tables' output up to
    rounding (the two dtype specialisations are compiled separately; on an H200 they are not bit-identical, which the
    CPU interpreter's run is)."""
    from torch.profiler import ProfilerActivity, profile

    register_cuda_kernel()
    q = _qkv_view(32760, 12, 128, seed=5)
    norm = _rms(12 * 128, torch.nn.RMSNorm, seed=6)
    cos, sin = (t.to(BF16)[None, :, None] for t in _tables(32760, 128))
    with torch.inference_mode():
        ref = norm_rope(q, norm, (cos.float(), sin.float()))
        norm_rope(q, norm, (cos, sin))
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            got = norm_rope(q, norm, (cos, sin))
            torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1, kernels
    assert (got != ref).float().mean() < 1e-3
    assert _rel(got, ref) < 1e-3
