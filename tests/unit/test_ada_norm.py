"""Residual + layer norm + modulation in one pass (``services.ada_norm``, ``runtime.fuse_norms``) on the CPU.

On the CPU the functions run their float32 math as torch ops (the Triton kernel is exercised by
``tests/gpu/test_ada_norm_gpu.py``). Checked here: that math equals the models' own ops on float64 inputs (Wan's
residual/norm/modulation chain: < 1e-6, its ``FP32LayerNorm`` computes in float32 whatever the input; Flux's
AdaLayerNormZero, float64 throughout: < 1e-12), shapes that do
not fit are named, and a tiny Flux and Wan denoise the same with the blocks marked as without (float32, < 1e-5
relative: the models round to float32 between the norm and the modulation, the fused math does not), with the
family's block forwards really taking the fused path (the models' own norm modules are not called).
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.normalization import AdaLayerNormZero, FP32LayerNorm

from services.ada_norm import add_norm_modulate, norm_modulate
from services.attention import LOCAL_SDPA
from services.families.base import SamplingParams
from services.registry import load_adapter
from services.runtime import fuse_norms, unfuse_norms
from tests.unit.test_norm_rope import assert_fusion_matches

F64 = torch.float64


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def test_matches_wan_block_ops() -> None:
    g = torch.Generator().manual_seed(0)
    b, s, d = 2, 7, 24
    h, y = (torch.randn(b, s, d, generator=g, dtype=F64) for _ in range(2))
    mods = torch.randn(b, 6, d, generator=g, dtype=F64).chunk(6, dim=1)  # [B, 1, D] views, like Wan's
    shift, scale, gate = mods[:3]
    plain, affine = FP32LayerNorm(d, 1e-6, elementwise_affine=False), FP32LayerNorm(d, 1e-6, elementwise_affine=True)
    affine.weight.data = torch.rand(d, generator=g) + 0.5
    affine.bias.data = torch.randn(d, generator=g)
    affine = affine.to(F64)

    # FP32LayerNorm rounds its float64 input to float32: float32 rounding (< 1e-6)
    ref = plain(h) * (1 + scale) + shift
    assert _rel(norm_modulate(h, plain, scale, shift), ref) < 1e-6
    h_new, out = add_norm_modulate(h, y, gate, affine)
    assert _rel(h_new, h + y * gate) < 1e-12 and _rel(out, affine(h + y * gate)) < 1e-6
    # no gate, modulation on the sum (Wan's cross-attention residual + norm3)
    h_new, out = add_norm_modulate(h, y, None, plain, scale, shift)
    assert _rel(out, plain(h + y) * (1 + scale) + shift) < 1e-6
    # one modulation per token (Wan2.2-TI2V)
    per_token = torch.randn(b, s, d, generator=g, dtype=F64)
    assert _rel(norm_modulate(h, plain, per_token, None), plain(h) * (1 + per_token)) < 1e-6


def test_matches_flux_ada_layer_norm_zero_and_concatenation() -> None:
    g = torch.Generator().manual_seed(1)
    d = 16
    ada = AdaLayerNormZero(d).to(F64)
    temb = torch.randn(2, d, generator=g, dtype=F64)
    txt, img = torch.randn(2, 3, d, generator=g, dtype=F64), torch.randn(2, 9, d, generator=g, dtype=F64)
    ref, *_ = ada(img, emb=temb)
    shift, scale = ada.linear(ada.silu(temb)).chunk(6, dim=1)[:2]  # [B, D] views with a batch stride of 6 D
    assert _rel(norm_modulate(img, ada.norm, scale, shift), ref) < 1e-12
    both = torch.cat([txt, img], dim=1)
    ref, *_ = ada(both, emb=temb)
    assert _rel(norm_modulate(txt, ada.norm, scale, shift, second=img), ref) < 1e-12


def test_rejects_shapes_that_do_not_fit() -> None:
    norm = torch.nn.LayerNorm(8).to(F64)
    h = torch.randn(2, 5, 8, dtype=F64)
    with pytest.raises(ValueError, match=r"fits neither \[B, D\] nor \[B, S, D\] for B=2, S=5, D=8"):
        norm_modulate(h, norm, torch.zeros(2, 4, 8, dtype=F64))
    with pytest.raises(ValueError, match="must match the 8-wide norm"):
        add_norm_modulate(h, torch.zeros(2, 4, 8, dtype=F64), None, norm)
    with pytest.raises(TypeError, match="expected a LayerNorm"):
        norm_modulate(h, torch.nn.RMSNorm(8))


@pytest.mark.parametrize(("family", "params", "blocks"), [
    ("tiny_flux", SamplingParams(width=64, height=48, steps=2, guidance_scale=3.5, seed=3),
     ("transformer_blocks", "single_transformer_blocks")),
    ("tiny_wan", SamplingParams(width=64, height=48, frames=5, steps=2, guidance_scale=1.0, seed=3), ("blocks",)),
])
def test_fused_denoise_matches_unfused(family, params, blocks, request) -> None:
    adapter = load_adapter(request.getfixturevalue(family))
    model = adapter.load_denoiser(torch.float32, torch.device("cpu"))
    conds = adapter.warmup_conditionings(model)[0]
    adapter.install_attention(model, LOCAL_SDPA)
    t = model.transformer
    marked = [blk for name in blocks for blk in getattr(t, name)]
    # the models' own layer-norm modules run only on the unfused path
    norms = [m for blk in marked for m in blk.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert_fusion_matches(adapter, model, conds, params, fuse_norms, unfuse_norms, norms, len(marked))


def test_families_without_fusable_blocks_are_not_counted(request) -> None:
    """The worker reports ``fused_norm_blocks``: FLUX.2 and the other families keep their own block forwards."""
    for family in ("tiny_flux2_klein", "tiny_qwen_image", "tiny_z_image"):
        model = load_adapter(request.getfixturevalue(family)).load_denoiser(torch.float32, torch.device("cpu"))
        assert fuse_norms(model.transformer) == 0
