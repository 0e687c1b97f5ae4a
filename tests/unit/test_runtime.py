"""RuntimeConfig and what the worker does with it (fused projections, regional compilation, kernel choice, lean
steps), on the CPU with the tiny Flux checkpoint in float32.

Tolerances: fused QKV runs one GEMM instead of three over the same dot products; float32 results differ only in
summation order (< 1e-5 relative). The dynamo-traced blocks (``aot_eager``: no code generation, same aten ops) and
the step constants compute exactly what eager does, so those comparisons are bit-exact; the step tables (one GEMM over
all steps instead of one GEMV per step) agree to float32 rounding (< 1e-5 relative); so does the fused MLP on the
CPU (the same GELU; the split output projection sums the same products in two GEMMs).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from denoiser_svc.config import DenoiserServiceConfig
from denoiser_svc.worker import Worker
from services.attention import LOCAL_SDPA
from services.config import ConfigError, ModelConfig, load_config
from services.families.base import SamplingParams
from services.gemm import linear_gelu_tanh, linear_of_concat
from services.registry import load_adapter
from services.runtime import (
    RuntimeConfig,
    fuse_gelu_epilogues,
    fuse_projections,
    regional_compile,
    repeated_blocks,
    undo_regional_compile,
    unfuse_gelu_epilogues,
)
from tests.step_constant_helpers import count_calls
from tests.workers import start_worker

CPU = torch.device("cpu")
PARAMS = SamplingParams(width=64, height=48, steps=3, guidance_scale=3.5, seed=3)


def _denoise(adapter, model, conds, params=PARAMS) -> torch.Tensor:
    state = adapter.prepare(model, params, conds, {}, None, 0, params.steps)
    with torch.inference_mode():
        for i in range(params.steps):
            state.latents = adapter.scheduler_step(state, adapter.forward(model, state, state.latents, i, "cond"), i)
    return state.latents


@pytest.fixture(scope="module")
def flux(tiny_flux):
    adapter = load_adapter(tiny_flux)
    conds = adapter.warmup_conditionings(adapter.load_denoiser(torch.float32, CPU))[0]
    return adapter, conds


def test_config_validation_names_the_field(tmp_path: Path, tiny_flux) -> None:
    base = [f"model.checkpoint={tiny_flux}"]
    cfg = load_config(DenoiserServiceConfig, overrides=[*base, "runtime.attention_backend=sdpa_cudnn",
                                                        "runtime.compile=on", "runtime.compile_mode=max-autotune"])
    assert cfg.runtime.attention_backend == "sdpa_cudnn" and cfg.runtime.inductor_mode(torch.device("cuda")) == \
        "max-autotune-no-cudagraphs"
    with pytest.raises(ConfigError, match=r"runtime.attention_backend: unknown attention backend 'fast'.*sdpa_cudnn"):
        load_config(DenoiserServiceConfig, overrides=[*base, "runtime.attention_backend=fast"])
    with pytest.raises(ConfigError, match="runtime.cuda_graphs needs runtime.compile"):
        load_config(DenoiserServiceConfig, overrides=[*base, "runtime.cuda_graphs=true", "runtime.compile=off"])
    assert load_config(DenoiserServiceConfig, overrides=[*base, "runtime.compile=off"]).runtime.compile == "off"
    with pytest.raises(ConfigError, match="runtime.compile_mode must be one of"):
        load_config(DenoiserServiceConfig, overrides=[*base, "runtime.compile_mode=fastest"])
    assert not RuntimeConfig().compile_enabled(CPU) and RuntimeConfig().compile_enabled(torch.device("cuda"))
    assert RuntimeConfig(cuda_graphs=True).inductor_mode(torch.device("cuda")) == "reduce-overhead"


def test_fused_projections_are_views_and_match(flux) -> None:
    adapter, conds = flux
    model = adapter.load_denoiser(torch.float32, CPU)
    ref = _denoise(adapter, model, conds)
    assert fuse_projections(model.transformer) == 3
    attn = model.transformer.transformer_blocks[0].attn
    assert attn.fused_projections
    assert attn.to_k.weight.data_ptr() == attn.to_qkv.weight.data_ptr() + attn.to_q.weight.numel() * 4
    assert attn.add_v_proj.weight.untyped_storage().data_ptr() == attn.to_added_qkv.weight.untyped_storage().data_ptr()
    fused = _denoise(adapter, model, conds)
    assert float((fused - ref).norm() / ref.norm()) < 1e-5
    assert fuse_projections(model.transformer) == 3  # idempotent


def test_fused_mlp_helpers_compute_the_unfused_ops() -> None:
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(24, 40).double()
    x = torch.randn(2, 7, 24, generator=g, dtype=torch.float64)
    ref = torch.nn.functional.gelu(lin(x), approximate="tanh")
    assert torch.allclose(linear_gelu_tanh(x, lin), ref, rtol=0, atol=1e-12)
    assert (torch.nn.functional.gelu(lin(x)) - ref).abs().max() > 1e-6  # erf GELU differs: the test can tell them apart
    out = torch.nn.Linear(24 + 40, 16).double()
    a, m = x, torch.randn(2, 7, 40, generator=g, dtype=torch.float64)
    assert torch.allclose(linear_of_concat(out, (a, m)), out(torch.cat([a, m], -1)), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="do not cover the 64 input features"):
        linear_of_concat(out, (a, a))


def test_fused_mlp_matches_and_skips_the_concatenation(flux) -> None:
    adapter, conds = flux
    model = adapter.load_denoiser(torch.float32, CPU)
    adapter.install_attention(model, LOCAL_SDPA)
    t = model.transformer
    singles = list(t.single_transformer_blocks)
    calls: list[str] = []
    hooks = [b.proj_out.register_forward_hook(lambda *a: calls.append("proj_out")) for b in singles]
    hooks += [b.act_mlp.register_forward_hook(lambda *a: calls.append("act_mlp")) for b in singles]
    try:
        ref = _denoise(adapter, model, conds)
        assert calls.count("proj_out") == calls.count("act_mlp") == PARAMS.steps * len(singles)
        # each double block's image and text feed-forwards + each single block's MLP
        assert fuse_gelu_epilogues(t) == 2 * len(t.transformer_blocks) + len(singles)
        assert fuse_gelu_epilogues(t) == 2 * len(t.transformer_blocks) + len(singles)  # idempotent
        calls.clear()
        fused = _denoise(adapter, model, conds)
        assert calls == []  # the single blocks no longer run the GELU module nor proj_out on a concatenation
        assert float((fused - ref).norm() / ref.norm()) < 1e-5
        unfuse_gelu_epilogues(t)
        assert not any("forward" in vars(m) for m in t.modules() if type(m).__name__ == "GELU")
        assert torch.equal(_denoise(adapter, model, conds), ref)
    finally:
        for h in hooks:
            h.remove()


def test_regional_compile_traces_the_blocks_and_keeps_hooks(flux) -> None:
    adapter, conds = flux
    model = adapter.load_denoiser(torch.float32, CPU)
    ref = _denoise(adapter, model, conds)
    torch._dynamo.reset()
    counts = regional_compile(model.transformer, RuntimeConfig(compile="on", compile_backend="aot_eager"), CPU)
    assert counts == {"FluxTransformerBlock": 1, "FluxSingleTransformerBlock": 2}
    calls = []
    block = repeated_blocks(model.transformer)[-1]
    handle = block.register_forward_hook(lambda mod, args, out: calls.append(1))  # a FlexCache-style hook
    try:
        assert torch.equal(_denoise(adapter, model, conds), ref)
    finally:
        handle.remove()
    assert len(calls) == PARAMS.steps
    undo_regional_compile(model.transformer)
    assert "forward" not in vars(block)


def test_step_constants_are_computed_once_per_request(flux) -> None:
    adapter, conds = flux
    model = adapter.load_denoiser(torch.float32, CPU)
    table = model.step_table
    wrapped = {"rope": model.step_constants["rope"], "context": model.step_constants["context"], "temb": table.embed,
               **{f"modulation{i}": p for i, p in enumerate(table.projections)}}
    t = model.transformer
    assert len(table.projections) == 2 * len(t.transformer_blocks) + len(t.single_transformer_blocks) + 1
    calls = count_calls(wrapped)
    lean = _denoise(adapter, model, conds)
    assert set(calls.values()) == {1}, calls  # in prepare, not in the 3 forwards
    del model.step_constants, model.step_table  # the plain path: diffusers computes them in every forward
    plain = _denoise(adapter, model, conds)
    assert set(calls.values()) == {1 + PARAMS.steps}, calls
    # rope and context are the same computation: bit-identical; the tables' rows come from one GEMM over all steps
    # instead of one GEMV per step: float32 rounding only
    assert float((lean - plain).norm() / plain.norm()) < 1e-5


def test_step_rows_hand_the_blocks_one_layout_every_step(flux) -> None:
    """Each step serves the tables' rows in the same buffers (pointer, offset, strides, shape), holding step i's
    row. Rows sliced out of the tables moved their storage offset every step, and CUDA graph trees recorded a new
    graph per step (a 490 ms Flux step against a 128 ms forward on an H200); the layout check below fails on that
    code. Compiled, with dynamic shapes off and recompiles made errors, later steps and a second request reuse the
    first step's graphs and give the same latents."""
    adapter, conds = flux
    model = adapter.load_denoiser(torch.float32, CPU)
    layouts: list[list[tuple]] = []
    table = model.step_table
    modules = [table.embed, *table.projections]
    for constant in modules:
        original = constant.use

        def recording(value, _original=original):
            layouts[-1].append((value.data_ptr(), value.storage_offset(), value.stride(), value.shape))
            return _original(value)

        constant.use = recording
    state = adapter.prepare(model, PARAMS, conds, {}, None, 0, PARAMS.steps)
    with torch.inference_mode():
        for i in range(PARAMS.steps):
            layouts.append([])
            adapter.forward(model, state, state.latents, i, "cond")
            rows = state.extras["step_tables"]["cond"]
            for (_, tab), buf in zip(rows.tables, rows.buffers, strict=True):
                assert torch.equal(buf[0], tab[i])  # the served row is step i's row
    assert len(layouts[0]) == len(modules) and all(layout == layouts[0] for layout in layouts)

    regional_compile(model.transformer, RuntimeConfig(compile="on", compile_backend="aot_eager"), CPU)
    try:
        state = adapter.prepare(model, PARAMS, conds, {}, None, 0, PARAMS.steps)
        with torch.inference_mode():
            for i in range(PARAMS.steps):
                strict = torch._dynamo.config.patch(automatic_dynamic_shapes=False, error_on_recompile=i > 0)
                with strict:  # step 0 compiles every block layout; later steps must reuse those graphs
                    out = adapter.forward(model, state, state.latents, i, "cond")
                state.latents = adapter.scheduler_step(state, out, i)
        first = state.latents
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False, error_on_recompile=True):
            again = _denoise(adapter, model, conds)  # a new request: new tables, new buffers, same graphs
    finally:
        undo_regional_compile(model.transformer)
        torch._dynamo.reset()
    assert torch.equal(first, again)


def _worker(tiny_flux, runtime: RuntimeConfig) -> Worker:
    return start_worker(tiny_flux, runtime)


def _run(worker: Worker, conds) -> torch.Tensor:
    from denoiser_svc.types import DenoiseJob

    job = DenoiseJob("r", params=PARAMS, conditionings=conds, start_step=0, end_step=PARAMS.steps)
    worker.add_request(job)
    for step in range(PARAMS.steps):
        worker.execute_step("r", step).wait()
    done = worker.finish_request("r")
    return getattr(done, "latents", done)


@pytest.mark.parametrize("runtime", [RuntimeConfig(), RuntimeConfig(attention_backend="sdpa_math", fuse_qkv=False,
                                                                                 fuse_mlp=False),
                                     RuntimeConfig(compile="on", compile_backend="aot_eager")],
                         ids=["auto", "math-unfused", "auto-compiled"])
def test_worker_applies_the_runtime_config(tiny_flux, flux, runtime: RuntimeConfig) -> None:
    adapter, conds = flux
    reference = _denoise(adapter, _plain(adapter), conds)
    torch._dynamo.reset()
    worker = _worker(tiny_flux, runtime)
    facts = worker.runtime_facts
    # a fixed backend must be the one used; auto picks among the CPU's exact kernels
    expected = {"sdpa_math"} if runtime.attention_backend == "sdpa_math" else {"sdpa", "sdpa_math"}
    assert facts["attention_joint_backend"] in expected
    assert facts["attention_source"] == ("auto" if runtime.attention_backend == "auto" else "config")
    if runtime.attention_backend == "auto":  # auto timed the shapes the warm-up recorded
        assert facts["attention_shapes"].startswith("joint B=1 Sq="), facts
    assert ("compiled_blocks" in facts) == (runtime.compile == "on")
    # the warm-up counts the graph breaks of the compiled blocks: none in a single process
    assert facts.get("compile_graph_breaks", "absent") == ("0" if runtime.compile == "on" else "absent")
    assert facts.get("fused_attention_modules", "0") == ("3" if runtime.fuse_qkv else "0")
    assert facts.get("fused_mlp_modules", "0") == ("4" if runtime.fuse_mlp else "0")
    ours = _run(worker, conds)
    assert float((ours - reference).norm() / reference.norm()) < 1e-5


def _plain(adapter):
    model = adapter.load_denoiser(torch.float32, CPU)
    adapter.install_attention(model, LOCAL_SDPA)
    return model


def test_describe_reports_the_choice(tiny_flux) -> None:
    from denoiser_svc.executor import UniProcExecutor

    cfg = DenoiserServiceConfig(model=ModelConfig(checkpoint=str(tiny_flux), device="cpu", dtype="float32"))
    executor = UniProcExecutor(cfg)
    executor.worker = _worker(tiny_flux, cfg.runtime)
    meta = executor.describe()
    assert meta["attention_source"] == "auto" and "attention_joint_timings" in meta
    assert "sdpa_cudnn=unusable: runs on cuda only" in meta["attention_joint_timings"]


@pytest.mark.slow
def test_single_gpu_benchmark_tiny_cpu_mode(tmp_path: Path) -> None:
    """The benchmark's own code path (diffusers variants, ours per backend, compiled, the service per-step run) on
    tiny configs; the numbers are meaningless on a CPU, the rows and the markdown must be there."""
    root = Path(__file__).resolve().parents[2]
    results = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "single_gpu.py"), "--device", "cpu", "--tiny",
                           "--compare", "eager,unfused,ablate-QKV,ablate-norms", "--interleave", "2",
                           "--interleave-also", "_native_math",
                           "--results", str(results),
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = results.read_text()
    for row in ("diffusers eager (native SDPA)", "diffusers compile_repeated_blocks", "ours eager sdpa fused",
                "ours eager sdpa_math fused", "ours compiled aot_eager", "service per step",
                "unfused QKV", "unfused MLP", "unfused norm+rope", "unfused norms",
                "without QKV (every other fusion on)", "without norms (every other fusion on)",
                "interleaved: diffusers compile_repeated_blocks", "interleaved: ours compiled",
                "interleaved, back to back: ours compiled"):
        assert row in text, row
    assert text.count("| variant |") == 2  # flux and wan tables
    # --interleave-also: a second diffusers configuration in the turns, its ratio in the note (both models)
    assert text.count("| interleaved: diffusers compile_repeated_blocks + _native_math |") == 2, text
    # every interleaved row's note (3 sides x 2 ways x 2 models) names both ratios
    assert proc.stdout.count("ours / _native_math ") == 12, proc.stdout[-3000:]
    assert proc.stdout.count("ours / native ") == 12, proc.stdout[-3000:]
    assert text.count("| interleaved: diffusers compile_repeated_blocks + ") == 4, text
