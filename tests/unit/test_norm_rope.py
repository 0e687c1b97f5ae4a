"""The fused query/key RMS norm + rotary embedding (``services.norm_rope``, ``runtime.fuse_norm_rope``) on the CPU.

On the CPU ``norm_rope`` runs its float32 math as torch ops (the Triton kernel is exercised by
``tests/gpu/test_norm_rope_gpu.py``). What is checked here: that math equals the models' own code (diffusers'
Flux RMS norms + concatenation + ``apply_rotary_emb``, which compute in float32 whatever the input: < 1e-6 relative;
Wan's ``torch.nn.RMSNorm`` across heads + its interleaved rotation, float64 throughout: < 1e-12) on float64 inputs;
and that a tiny Flux, FLUX.2-klein and Wan denoise the same with the modules marked as without (float32, < 1e-5
relative: the models round to float32 between the norm and the rotation, the fused math does not).
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb, get_1d_rotary_pos_embed
from diffusers.models.normalization import RMSNorm

from services.attention import LOCAL_SDPA
from services.families.base import SamplingParams
from services.families.processors.wan import apply_rotary_emb as wan_rotary
from services.norm_rope import _table, norm_rope
from services.registry import load_adapter
from services.runtime import fuse_norm_rope, unfuse_norm_rope
from tests.unit.test_runtime import _denoise

CPU = torch.device("cpu")
F64 = torch.float64


def _tables(rows: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = get_1d_rotary_pos_embed(dim, torch.arange(rows, dtype=F64) * 0.37, repeat_interleave_real=True,
                                       use_real=True, freqs_dtype=F64)
    return cos, sin


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def test_matches_flux_joint_attention_code() -> None:
    g = torch.Generator().manual_seed(0)
    heads, dim, n_txt, n_img = 3, 16, 5, 11
    norms = {}
    for name in ("q", "k", "added_q", "added_k"):
        norms[name] = RMSNorm(dim, eps=1e-6).to(F64)
        norms[name].weight.data = torch.rand(dim, generator=g, dtype=F64) + 0.5
    img = torch.randn(2, n_img, heads, dim, generator=g, dtype=F64)
    txt = torch.randn(2, n_txt, heads, dim, generator=g, dtype=F64)
    rope = _tables(n_txt + n_img, dim)
    ref = apply_rotary_emb(torch.cat([norms["added_q"](txt), norms["q"](img)], dim=1), rope, sequence_dim=1)
    got = norm_rope(txt, norms["added_q"], rope, second=img, second_norm=norms["q"])
    # diffusers' RMS norm and rotation compute in float32 whatever the input: float32 rounding (< 1e-6)
    assert got.shape == ref.shape and _rel(got, ref) < 1e-6
    # one part (Flux's single-stream blocks)
    single = apply_rotary_emb(norms["k"](img), _tables(n_img, dim), sequence_dim=1)
    assert _rel(norm_rope(img, norms["k"], _tables(n_img, dim)), single) < 1e-6


def test_matches_wan_self_attention_code() -> None:
    g = torch.Generator().manual_seed(1)
    heads, dim, seq = 4, 8, 13
    norm = torch.nn.RMSNorm(heads * dim, eps=1e-6).to(F64)
    norm.weight.data = torch.rand(heads * dim, generator=g, dtype=F64) + 0.5
    x = torch.randn(1, seq, heads * dim, generator=g, dtype=F64)
    cos, sin = (t[None, :, None, :] for t in _tables(seq, dim))  # Wan's [1, S, 1, D]
    ref = wan_rotary(norm(x).unflatten(2, (heads, -1)), cos, sin)
    assert _rel(norm_rope(x.unflatten(2, (heads, -1)), norm, (cos, sin)), ref) < 1e-12


def test_norm_alone_without_tables() -> None:
    """Wan's cross-attention query: the RMS norm across heads, no rotation."""
    g = torch.Generator().manual_seed(2)
    norm = torch.nn.RMSNorm(3 * 8, eps=1e-6).to(F64)
    norm.weight.data = torch.rand(3 * 8, generator=g, dtype=F64) + 0.5
    x = torch.randn(2, 5, 3 * 8, generator=g, dtype=F64)
    assert _rel(norm_rope(x.unflatten(2, (3, -1)), norm, None), norm(x).unflatten(2, (3, -1))) < 1e-12


def test_rejects_norms_and_tables_that_do_not_fit() -> None:
    x = torch.randn(1, 6, 2, 8, dtype=F64)
    with pytest.raises(ValueError, match="fits neither the head dim 8 nor all 2 heads"):
        norm_rope(x, torch.nn.RMSNorm(12).to(F64), _tables(6, 8))
    with pytest.raises(ValueError, match="does not match 6 tokens"):
        norm_rope(x, torch.nn.RMSNorm(8).to(F64), _tables(5, 8))


@pytest.mark.parametrize(("family", "params"), [
    ("tiny_flux", SamplingParams(width=64, height=48, steps=2, guidance_scale=3.5, seed=3)),
    ("tiny_wan", SamplingParams(width=64, height=48, frames=5, steps=2, guidance_scale=1.0, seed=3)),
    ("tiny_flux2_klein", SamplingParams(width=64, height=48, steps=2, guidance_scale=1.0, seed=3)),
])
def test_fused_denoise_matches_unfused(family, params, request) -> None:
    adapter = load_adapter(request.getfixturevalue(family))
    model = adapter.load_denoiser(torch.float32, CPU)
    conds = adapter.warmup_conditionings(model)[0]
    adapter.install_attention(model, LOCAL_SDPA)
    t = model.transformer
    attention = [m for m in t.modules() if hasattr(m, "norm_q") and hasattr(m, "norm_k")]
    # every query norm is fused (Wan's cross-attention: the norm without a rotation)
    assert_fusion_matches(adapter, model, conds, params, fuse_norm_rope, unfuse_norm_rope,
                          [m.norm_q for m in attention], len(attention))


def assert_fusion_matches(adapter, model, conds, params, fuse, unfuse, watched: list[torch.nn.Module],
                          count: int) -> None:
    """``fuse(transformer)`` marks ``count`` (> 0) modules; the fused denoise matches the unfused one (float32,
    < 1e-5) and never calls the ``watched`` modules (the model's own ops the fusion replaces); ``unfuse`` gives the
    unfused result back bit for bit and calls them again."""
    t = model.transformer
    ref = _denoise(adapter, model, conds, params)
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in watched]
    try:
        assert fuse(t) == count > 0
        fused = _denoise(adapter, model, conds, params)
        assert not calls
        assert _rel(fused, ref) < 1e-5
        unfuse(t)
        assert torch.equal(_denoise(adapter, model, conds, params), ref)
        assert calls
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("family", ["tiny_qwen_image", "tiny_z_image"])
def test_families_whose_processors_do_not_read_the_mark_are_not_counted(family, request) -> None:
    """The worker reports ``fused_norm_rope_modules``: only modules whose processor uses the fused kernel count."""
    adapter = load_adapter(request.getfixturevalue(family))
    model = adapter.load_denoiser(torch.float32, CPU)
    t = model.transformer
    assert any(hasattr(m, "norm_q") for m in t.modules())  # they do have q/k RMS norms
    assert fuse_norm_rope(t) == 0


def test_tables_pass_in_their_own_dtype() -> None:
    """A bf16 model carries bf16 rotary tables: they reach the kernel as they are, views without a float32 copy per
    call (the kernel converts as it loads; the GPU test checks its output is bit-identical)."""
    cos = _tables(9, 8)[0].to(torch.bfloat16)[None, :, None, :]  # Wan's [1, S, 1, D]
    view = _table(cos, 9, 8)
    assert view.dtype == torch.bfloat16 and view.data_ptr() == cos.data_ptr() and view.shape == (9, 8)
    with pytest.raises(ValueError, match="float dtype"):
        _table(torch.ones(9, 8, dtype=torch.int32), 9, 8)
