"""``services.gemm`` on the CPU: the warm-up records every block layer's GEMM shape and epilogue, the selection
keeps them on cuBLAS with the reason stated (QuACK needs a Hopper GPU; ``tests/gpu/test_gemm_gpu.py`` covers it
there), ``quack`` where it cannot run is a config error, and the routed entry points compute exactly what the plain
ops compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from denoiser_svc.config import DenoiserServiceConfig
from denoiser_svc.worker import Worker
from services.config import ConfigError, ModelConfig
from services.gemm import (
    GemmRecorder,
    candidate_linears,
    clear_routes,
    linear_gated_residual,
    linear_gelu_tanh,
    route_linear,
    routes,
    select_gemms,
    start_recording,
)
from services.runtime import RuntimeConfig

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def wan_worker(tiny_wan) -> Worker:
    cfg = DenoiserServiceConfig(model=ModelConfig(checkpoint=str(tiny_wan), device="cpu", dtype="bfloat16"),
                                runtime=RuntimeConfig(compile="off"))
    worker = Worker(cfg)
    worker.init_device()
    worker.load_model()
    worker.compile_or_warm_up_model(worker.warmup_job())
    return worker


def test_worker_records_the_block_gemms_and_keeps_cublas_on_cpu(wan_worker) -> None:
    facts = wan_worker.runtime_facts
    assert facts["gemm_backend"] == "auto" and facts["gemm_quack_layers"] == "0"
    assert "CUDA device" in facts["gemm_quack_unavailable"]
    choices = facts["gemm_choices"]
    # Wan's blocks: fused QKV and the other projections (bias), the FFN up-projection (bias_gelu), the FFN output
    # with its gated residual
    for epilogue in ("bias [", "bias_gelu [", "gated_residual ["):
        assert epilogue in choices, choices
    assert "-> quack" not in choices
    model = wan_worker.transformer_of(wan_worker.runner.model)
    assert not routes(model)
    assert all("forward" not in vars(m) for m in candidate_linears(model))  # back on nn.Linear's own forward


def test_quack_where_it_cannot_run_is_a_config_error(wan_worker) -> None:
    model = wan_worker.transformer_of(wan_worker.runner.model)
    recorder = start_recording(model)
    try:
        with pytest.raises(ConfigError, match="gemm_backend=quack: QuACK GEMMs need a CUDA device"):
            select_gemms("quack", recorder, CPU, 0.01)
    finally:
        clear_routes(model)
    with pytest.raises(ConfigError, match="gemm_backend"):
        RuntimeConfig(gemm_backend="cutlass").validate()
    with pytest.raises(ConfigError, match="gemm_min_gain"):
        RuntimeConfig(gemm_min_gain=-1).validate()


def test_entry_points_compute_the_plain_ops() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 40)
    x, res = torch.randn(2, 7, 24), torch.randn(2, 7, 40)
    gate = torch.randn(1, 1, 40)
    expected_residual = (res.float() + F.linear(x, lin.weight, lin.bias).float() * gate).type_as(res)
    for routed in (False, True):  # a CPU tensor never takes the QuACK route, even on a routed layer
        route_linear(lin, "quack_pp128x192" if routed else None)
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
        assert torch.equal(linear_gelu_tanh(x, lin), F.gelu(F.linear(x, lin.weight, lin.bias), approximate="tanh"))
        assert torch.equal(linear_gated_residual(x, lin, res, gate), expected_residual)
    route_linear(lin, None)
    assert "forward" not in vars(lin) and "chitu_gemm" not in vars(lin)


def test_recorder_notes_each_layer_once_per_shape() -> None:
    lin = torch.nn.Linear(16, 8)
    recorder = GemmRecorder()
    route_linear(lin, recorder)
    for _ in range(3):
        lin(torch.randn(1, 300, 16))
    linear_gelu_tanh(torch.randn(1, 300, 16), lin)
    assert {(s.m, s.k, s.n, s.epilogue): len(v) for s, v in recorder.layers.items()} == {
        (300, 16, 8, "bias"): 1, (300, 16, 8, "bias_gelu"): 1}


def test_removing_our_forwards_drops_the_gemm_routes() -> None:
    """diffusers' own forward on a model we routed runs every layer on cuBLAS (the benchmarks' baselines)."""
    from services.families.processors import remove_block_forwards

    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 8))
    route_linear(model[0], "quack_pp128x192")
    assert routes(model) == [(model[0], "quack_pp128x192")]
    assert remove_block_forwards(model) == 1
    assert not routes(model) and "forward" not in vars(model[0])


def test_feed_forward_residual_is_the_residual_of_the_module() -> None:
    """diffusers' FeedForward (GELU projection, dropout, Linear) and any other module: ``residual + gate * ff(x)``
    in float32, rounded once, whether or not the output Linear is routed."""
    from diffusers.models.attention import FeedForward

    from services.gemm import feed_forward_residual

    torch.manual_seed(1)
    x, res, gate = torch.randn(1, 9, 16), torch.randn(1, 9, 16), torch.randn(1, 1, 16)
    for ff in (FeedForward(16, dim_out=16, mult=2, activation_fn="gelu-approximate").eval(),
               torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.SiLU())):
        expected = (res.float() + ff(x).float() * gate).type_as(res)
        for route in (None, GemmRecorder()):
            if hasattr(ff, "net"):
                route_linear(ff.net[-1], route)
            assert torch.equal(feed_forward_residual(ff, x, res, gate), expected)
        if hasattr(ff, "net"):
            shapes = {(s.m, s.k, s.n, s.epilogue) for s in route.layers}
            assert shapes == {(9, 32, 16, "gated_residual")}, shapes  # recorded as the fused shape, once
            route_linear(ff.net[-1], None)


def test_split_projection_with_its_residual() -> None:
    """Flux's single-stream output: ``residual + gate * linear(cat(parts))`` in float32, rounded once; recorded as
    the MLP part's GEMM (K = its width) with the split residual epilogue."""
    from services.gemm import linear_of_concat_gated_residual

    torch.manual_seed(2)
    lin = torch.nn.Linear(8 + 24, 16)
    attn, mlp = torch.randn(1, 5, 8), torch.randn(1, 5, 24)
    res, gate = torch.randn(1, 5, 16), torch.randn(1, 1, 16)
    expected = (res.float() + lin(torch.cat([attn, mlp], -1)).float() * gate).type_as(res)
    recorder = GemmRecorder()
    for route in (None, recorder, "quack_pp128x192"):  # a CPU tensor never takes the QuACK route
        route_linear(lin, route)
        got = linear_of_concat_gated_residual(lin, (attn, mlp), res, gate)
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)
    route_linear(lin, None)
    assert {(s.m, s.k, s.n, s.epilogue) for s in recorder.layers} == {(5, 24, 16, "split_gated_residual")}
