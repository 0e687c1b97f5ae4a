"""The Triton residual + layer norm + modulation kernel (``services.ada_norm``) on the GPU, at the real models' shapes.

Tolerances: the kernel and ``reference`` compute in float32 and round once to bf16; the new residual stream is the
same rounding of the same float32 sum (bit-equal but for FMA contraction: < 1e-3 relative), the normalised output
differs by at most a bf16 step on some elements (< 3e-3 relative over a tensor). Against the models' own bf16 ops
(Flux rounds after the norm and after each modulation op) the bound is the exact-path bound, 1e-2.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.normalization import AdaLayerNormZero, FP32LayerNorm

from services.ada_norm import add_norm_modulate, norm_modulate, reference, register_cuda_kernel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEV = torch.device("cuda")
BF16 = torch.bfloat16


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _randn(*shape: int, seed: int, dtype=BF16) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator(DEV).manual_seed(seed), device=DEV).to(dtype)


@pytest.mark.parametrize("tokens", [32760, 8190])
def test_wan_block_chain_matches_reference_and_wan_ops(tokens) -> None:
    register_cuda_kernel()
    d = 1536
    h, y = _randn(1, tokens, d, seed=0), _randn(1, tokens, d, seed=1) * 2
    shift, scale, gate = (_randn(1, 6, d, seed=2, dtype=torch.float32) * 0.3).chunk(6, dim=1)[:3]
    plain = FP32LayerNorm(d, 1e-6, elementwise_affine=False).to(DEV, BF16)
    affine = FP32LayerNorm(d, 1e-6, elementwise_affine=True).to(DEV, BF16)
    affine.weight.data, affine.bias.data = _randn(d, seed=3) * 0.2 + 1, _randn(d, seed=4) * 0.1

    got = norm_modulate(h, plain, scale, shift)
    assert got.dtype == BF16 and got.is_contiguous()
    assert _rel(got, reference(h, None, None, None, None, 1e-6, scale, shift)[1]) < 3e-3
    assert _rel(got, (plain(h.float()) * (1 + scale) + shift).to(BF16)) < 1e-2  # Wan's own ops

    h_new, out = add_norm_modulate(h, y, gate, affine)
    ref_h, ref_out = reference(h, y, gate, affine.weight, affine.bias, 1e-6, None, None)
    assert _rel(h_new, ref_h) < 1e-3 and _rel(out, ref_out) < 3e-3
    wan_h = (h.float() + y * gate).to(BF16)
    assert _rel(h_new, wan_h) < 1e-3 and _rel(out, affine(wan_h.float()).to(BF16)) < 1e-2

    h_new, out = add_norm_modulate(h, y, None, plain, scale, shift)
    assert _rel(out, reference(h, y, None, None, None, 1e-6, scale, shift)[1]) < 3e-3


@pytest.mark.parametrize("n_txt,n_img", [(512, 4096), (0, 4608)])
def test_flux_shapes_match_reference_and_flux_ops(n_txt, n_img) -> None:
    d = 3072
    ada = AdaLayerNormZero(d).to(DEV, BF16)
    temb = _randn(1, d, seed=5)
    img, y = _randn(1, n_img, d, seed=6), _randn(1, n_img, d, seed=7)
    shift, scale, gate = ada.linear(ada.silu(temb)).chunk(6, dim=1)[:3]
    if n_txt:
        got = norm_modulate(img, ada.norm, scale, shift)
        assert _rel(got, ada(img, emb=temb)[0]) < 1e-2
        h_new, out = add_norm_modulate(img, y, gate, ada.norm, scale, shift)
        flux_h = img + gate.unsqueeze(1) * y
        assert _rel(h_new, flux_h) < 1e-2
        assert _rel(out, ada.norm(flux_h) * (1 + scale[:, None]) + shift[:, None]) < 1e-2
        ref_h, ref_out = reference(img, y, gate, None, None, 1e-6, scale, shift)
        assert _rel(h_new, ref_h) < 1e-3 and _rel(out, ref_out) < 3e-3
    else:  # single-stream: text and image normalised into one tensor
        txt = _randn(1, 512, d, seed=8)
        got = norm_modulate(txt, ada.norm, scale, shift, second=img)
        assert got.shape == (1, 512 + n_img, d)
        both = torch.cat([txt, img], dim=1)
        assert _rel(got, reference(both, None, None, None, None, 1e-6, scale, shift)[1]) < 3e-3
        assert _rel(got, ada(both, emb=temb)[0]) < 1e-2


def test_per_token_modulation_and_batch() -> None:
    d = 1536
    h, y = _randn(2, 999, d, seed=9), _randn(2, 999, d, seed=10)
    per_token = _randn(2, 999, d, seed=11, dtype=torch.float32) * 0.2
    per_batch = _randn(2, 1, d, seed=12, dtype=torch.float32)
    norm = FP32LayerNorm(d, 1e-6, elementwise_affine=False).to(DEV, BF16)
    h_new, out = add_norm_modulate(h, y, per_batch, norm, per_token, per_batch)
    ref_h, ref_out = reference(h, y, per_batch, None, None, 1e-6, per_token, per_batch)
    assert _rel(h_new, ref_h) < 1e-3 and _rel(out, ref_out) < 3e-3


def test_compiled_callers_keep_the_kernel_in_their_graph() -> None:
    register_cuda_kernel()
    d = 1536
    norm = FP32LayerNorm(d, 1e-6, elementwise_affine=True).to(DEV, BF16)
    h, y = _randn(1, 4096, d, seed=13), _randn(1, 4096, d, seed=14)
    gate, scale, shift = (_randn(1, 3, d, seed=15, dtype=torch.float32) * 0.3).chunk(3, dim=1)

    def block(h, y):
        h2, out = add_norm_modulate(h * 1.0, y, gate, norm)
        return h2, norm_modulate(out * 2.0, norm, scale, shift)

    compiled = torch.compile(block, fullgraph=True)
    with torch.inference_mode():
        got, ref = compiled(h, y), block(h, y)
    for a, b in zip(got, ref, strict=True):
        assert _rel(a, b) < 1e-3


def test_compiled_tiny_wan_worker_matches_eager(tiny_wan) -> None:
    """The Wan block forward with the fused norms, compiled (and with CUDA graphs), vs the eager unfused worker."""
    from services.runtime import RuntimeConfig
    from tests.gpu.test_attention_gpu import run_worker

    def run(runtime: RuntimeConfig) -> tuple[torch.Tensor, dict]:
        return run_worker(tiny_wan, runtime, steps=3)

    eager, _ = run(RuntimeConfig(attention_backend="sdpa", fuse_qkv=False, fuse_mlp=False, fuse_norm_rope=False,
                                 fuse_norms=False, compile="off", gemm_backend="cublas"))
    for rt in (RuntimeConfig(), RuntimeConfig(cuda_graphs=True)):
        ours, facts = run(rt)
        assert int(facts["fused_norm_blocks"]) > 0 and facts["compiled_blocks"]
        err = float((ours - eager).norm() / eager.norm())
        assert err < 2e-2, (rt, err)
