"""GPU-only paths of ``services.gemm``: QuACK's GEMMs with each epilogue against float32, and Wan blocks with their
layers routed to QuACK, eager, compiled and under CUDA graphs, against the same blocks on cuBLAS. Tolerances: both
kernels accumulate in float32 and round the output to bf16 once (~3e-3 relative on random inputs); the bound is the
runtime's exact bound, 1e-2. Needs quack-kernels (shipped with FlashAttention-4) on a Hopper GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.gemm import QUACK_CONFIGS, quack_unavailable_reason

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEV = torch.device("cuda")
BF16 = torch.bfloat16


def _reason() -> str | None:
    return quack_unavailable_reason(DEV) if torch.cuda.is_available() else "needs a CUDA device"


needs_quack = pytest.mark.skipif(_reason() is not None, reason=str(_reason()))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@needs_quack
@pytest.mark.parametrize("config", list(QUACK_CONFIGS))
@pytest.mark.parametrize("epilogue", ["bias", "bias_gelu", "gated_residual"])
@pytest.mark.parametrize("mkn", [(4100, 1536, 4608), (1024, 512, 1024)], ids=["partial-tile", "square"])
def test_quack_epilogues_match_float32(epilogue, config, mkn) -> None:
    """Rows not a multiple of any tile (the last tile is partial), and M == N (the per-column vectors are pinned as
    row vectors: QuACK cannot infer their kind from the shape there)."""
    m, k, n = mkn
    g = torch.Generator(DEV).manual_seed(3)
    x = torch.randn(m, k, generator=g, device=DEV).to(BF16)
    w = (torch.randn(n, k, generator=g, device=DEV) * k ** -0.5).to(BF16)
    b = (torch.randn(n, generator=g, device=DEV) * 0.1).to(BF16)
    res = torch.randn(m, n, generator=g, device=DEV).to(BF16)
    gate = torch.randn(1, n, generator=g, device=DEV) * 0.1
    y = x.float() @ w.float().t() + b.float()
    if epilogue == "bias_gelu":
        ref = F.gelu(y, approximate="tanh")
    elif epilogue == "gated_residual":
        ref = res.float() + y * gate
    else:
        ref = y
    gated = epilogue == "gated_residual"
    out = torch.ops.chitu.quack_gemm(x, w, b, res if gated else None, gate if gated else None, None, epilogue, config)
    assert out.shape == (m, n) and out.dtype == BF16
    assert _rel(out, ref) < 1e-2


@needs_quack
@pytest.mark.parametrize("config", list(QUACK_CONFIGS))
def test_split_projection_with_residual_matches_float32(config) -> None:
    """Flux's single-stream output at its real widths: cuBLAS for the attention part, QuACK for the MLP part with the
    first part's output, the gate and the residual in its epilogue (a column slice of the weight as its operand)."""
    from services.gemm import linear_of_concat_gated_residual, route_linear

    g = torch.Generator(DEV).manual_seed(4)
    lin = torch.nn.Linear(3072 + 12288, 3072, device=DEV, dtype=BF16)
    attn = torch.randn(1, 1100, 3072, generator=g, device=DEV).to(BF16)
    mlp = torch.randn(1, 1100, 12288, generator=g, device=DEV).to(BF16)
    res = torch.randn(1, 1100, 3072, generator=g, device=DEV).to(BF16)
    gate = torch.randn(1, 1, 3072, generator=g, device=DEV).to(BF16)
    y = torch.cat([attn, mlp], -1).float() @ lin.weight.float().t() + lin.bias.float()
    ref = res.float() + y * gate.float()
    route_linear(lin, config)
    with torch.no_grad():
        out = linear_of_concat_gated_residual(lin, (attn, mlp), res, gate)
    assert out.shape == res.shape and out.dtype == BF16
    assert _rel(out, ref) < 1e-2


def _wan_blocks():
    from diffusers import WanTransformer3DModel

    from services.attention import LOCAL_SDPA
    from services.families.processors.wan import install
    from services.runtime import fuse_gelu_epilogues, fuse_norm_rope, fuse_norms, fuse_projections

    torch.manual_seed(0)
    model = WanTransformer3DModel(num_layers=2, num_attention_heads=12, attention_head_dim=128, in_channels=16,
                                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960).to(DEV, BF16).eval()
    fuse_projections(model)
    fuse_gelu_epilogues(model)
    fuse_norm_rope(model)
    fuse_norms(model)
    install(model, LOCAL_SDPA)
    g = torch.Generator(DEV).manual_seed(1)
    inputs = {"hidden_states": torch.randn(1, 16, 5, 32, 32, generator=g, device=DEV).to(BF16),  # 1280 tokens
              "encoder_hidden_states": torch.randn(1, 512, 4096, generator=g, device=DEV).to(BF16),
              "timestep": torch.tensor([500.0], device=DEV)}
    return model, inputs


@needs_quack
def test_wan_blocks_routed_to_quack_eager_compiled_and_graphed() -> None:
    from torch.profiler import ProfilerActivity, profile

    from services.gemm import clear_routes, routes, select_gemms, start_recording
    from services.runtime import RuntimeConfig, regional_compile, undo_regional_compile

    model, inputs = _wan_blocks()

    def forward() -> torch.Tensor:
        return model(**inputs, return_dict=False)[0].clone()

    with torch.inference_mode():
        ref = forward()  # cuBLAS
        recorder = start_recording(model)
        assert torch.equal(forward(), ref)  # recording computes with cuBLAS
        selection = select_gemms("quack", recorder, DEV, 0.01)
        epilogues = {c.shape.epilogue for c in selection.choices if c.choice != "cublas"}
        assert epilogues == {"bias", "bias_gelu", "gated_residual"}, selection.metadata()
        routed = routes(model)
        assert len(routed) == int(selection.metadata()["gemm_quack_layers"]) > 0
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            eager = forward()
        calls = sum(1 for e in prof.events() if e.name == "chitu::quack_gemm")
        assert calls == len(routed), (calls, len(routed))  # every routed layer runs once per forward, through QuACK
        assert _rel(eager, ref) < 1e-2
        for graphs in (False, True):
            regional_compile(model, RuntimeConfig(compile="on", cuda_graphs=graphs), DEV)
            try:
                for _ in range(3):
                    torch.compiler.cudagraph_mark_step_begin()
                    out = forward()
                assert _rel(out, ref) < 1e-2, graphs
            finally:
                undo_regional_compile(model)
                torch._dynamo.reset()
        clear_routes(model)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            back = forward()
        assert not routes(model) and not any(e.name == "chitu::quack_gemm" for e in prof.events())
        assert _rel(back, ref) < 1e-2  # cuBLAS is not bitwise reproducible across streams
