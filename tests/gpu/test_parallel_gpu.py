"""The denoiser group on GPUs (NCCL): tiny Flux and Wan checkpoints over 2 (and 4, when present) GPUs equal the
single-GPU worker. Marked ``gpu``; skipped without at least 2 CUDA devices.

    pytest -m gpu tests/gpu/test_parallel_gpu.py

Tolerances: float32 1e-4 relative (the GPU kernels pick tiles and algorithms by shape, so a shard of the sequence
does not sum in the same order as the whole; still ~1e-6 in practice), bfloat16 3e-2 (bf16 rounding of every
activation, through 3 steps). Ring attention on CUDA runs the LSE-returning aten kernels (flash in bf16,
memory-efficient in float32).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.distributed.cases import build_checkpoint, family_cases, reference, run_pool
from tests.reference import rel_err

pytestmark = pytest.mark.gpu

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.skipif(GPUS < 2, reason="needs at least 2 CUDA devices")
@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_group_on_gpus_equals_one_gpu(checkpoints_dir: Path, tmp_path: Path, dtype: str, tolerance: float) -> None:
    cases = []
    for builder in ("flux", "wan"):
        ckpt = build_checkpoint(builder, checkpoints_dir)
        cases += family_cases(builder, ckpt, checkpoints_dir / f"tiny-{builder}-heads4")
    failures, report = [], []
    for world in (2, 4):
        pool = [c for c in cases if c.world_size == world]
        if world > GPUS or not pool:
            continue
        out = run_pool(pool, world, tmp_path / f"world{world}", device="cuda", dtype=dtype)
        for case in pool:
            for job in case.jobs:
                ref = reference(case.checkpoint, job, case.component, device="cuda", dtype=dtype)
                got = torch.load(out / case.name / f"{job.request_id}.rank0.pt")
                err = rel_err(got.float(), ref.float())
                report.append(f"{case.name} ({dtype}): rel err {err:.2e}")
                if not err <= tolerance:
                    failures.append(report[-1])
    assert report, "no layout ran"
    print("\n".join(report))
    assert not failures, "\n".join(failures + report)


@pytest.mark.skipif(GPUS < 2, reason="needs at least 2 CUDA devices")
@pytest.mark.parametrize("layout", ["traced", "traced-chunks2", "untraced", "traced-quack", "ring2"])
def test_compiled_group_with_cuda_graphs_on_gpus(checkpoints_dir: Path, tmp_path: Path, layout: str) -> None:
    """Ulysses traced into the compiled blocks on NCCL, replayed as CUDA graphs (the all-to-alls inside the graphs),
    with and without head chunks, with the block layers on QuACK's GEMMs (where QuACK runs), and the untraced
    variant: each equals the single-GPU eager worker (bf16, 3e-2) and the traced ones compile to one graph per block
    (no graph break); and Ring-2 compiled (no CUDA graphs: Ring breaks the graph at attention) with the chosen
    kernel's log-sum-exp variant. One layout a test, so one can be run alone (``-k traced-quack``)."""
    from services.assets import widen_heads
    from services.gemm import quack_unavailable_reason
    from services.registry import load_adapter
    from tests.distributed.cases import Case, make_job

    # attention fixed to cuDNN: the auto timing (~20 s a worker, FA4 compiling its kernels) is not what this tests
    compiled = ["runtime.compile=on", "runtime.cuda_graphs=true", "runtime.attention_backend=sdpa_cudnn"]
    flux = build_checkpoint("flux", checkpoints_dir)
    if layout == "traced-chunks2":
        ckpt, parallel, overrides = (widen_heads(flux, checkpoints_dir / "tiny-flux-heads4", heads=4),
                                     {"ulysses_degree": 2, "ulysses_chunks": 2}, compiled)
    elif layout == "untraced":
        ckpt, parallel, overrides = flux, {"ulysses_degree": 2}, [*compiled, "parallel.trace_collectives=false"]
    elif layout == "traced-quack":  # the block layers on QuACK's GEMMs inside the graphs
        if (reason := quack_unavailable_reason(torch.device("cuda"))) is not None:
            pytest.skip(reason)
        ckpt, parallel, overrides = flux, {"ulysses_degree": 2}, [*compiled, "runtime.gemm_backend=quack"]
    elif layout == "ring2":
        ckpt, parallel, overrides = flux, {"ring_degree": 2}, [o for o in compiled if "cuda_graphs" not in o]
    else:
        ckpt, parallel, overrides = flux, {"ulysses_degree": 2}, compiled
    case = Case(layout, "flux", ckpt, "transformer", parallel, [make_job(load_adapter(ckpt), layout)], overrides)
    out = run_pool([case], 2, tmp_path / "pool", device="cuda", dtype="bfloat16")
    (job,) = case.jobs
    ref = reference(case.checkpoint, job, case.component, device="cuda", dtype="bfloat16")
    err = rel_err(torch.load(out / case.name / f"{job.request_id}.rank0.pt").float(), ref.float())
    breaks = int((out / case.name / "graph_breaks.rank0").read_text())
    facts = json.loads((out / case.name / "facts.rank0.json").read_text())
    print(f"{layout}: rel err {err:.2e}, graph breaks {breaks}, GEMMs: {facts.get('gemm_choices')}")
    graphs = layout != "ring2"
    assert facts["compiled_blocks"] and facts["compile_mode"] == ("reduce-overhead" if graphs else "default"), facts
    assert facts["attention_joint_backend"] == "sdpa_cudnn", facts  # Ring ran cuDNN's log-sum-exp variant
    if layout == "untraced":  # the all-to-alls stay outside the graphs: the blocks break there
        assert breaks > 0, "untraced Ulysses compiled without a graph break: were the collectives traced after all?"
    if layout == "traced-quack":  # every recorded shape on QuACK: none fell back to cuBLAS (error or output check)
        assert int(facts["gemm_quack_layers"]) > 0 and " -> cublas" not in facts["gemm_choices"], facts["gemm_choices"]
    assert err <= 3e-2, err
    assert not (layout.startswith("traced") and breaks), f"{breaks} graph breaks"


@pytest.mark.skipif(GPUS < 2, reason="needs at least 2 CUDA devices")
def test_served_cuda_graph_group_serves_and_exits_on_sigterm(checkpoints_dir: Path, tmp_path: Path) -> None:
    """``chitu serve denoiser`` as a 2-GPU Ulysses group, compiled with CUDA graphs (the NCCL all-to-alls inside the
    graphs): a request equals the single-GPU worker (bf16, 3e-2), and SIGTERM to the whole process group ends every
    rank with exit code 0 within a minute (the benchmark's groups hung in their teardown after CUDA-graph runs; a
    serving group must not: Kubernetes would wait out the pod's grace period)."""
    import os
    import signal
    import subprocess
    import time

    from services.registry import load_adapter
    from tests.distributed.cases import make_job
    from tests.distributed.test_group_service import DenoiserProcess, denoise, info, to_request

    ckpt = build_checkpoint("flux", checkpoints_dir)
    job = make_job(load_adapter(ckpt), "served-graphs")
    group = DenoiserProcess(tmp_path / "group", ckpt, {
        "model": {"checkpoint": str(ckpt), "device": "cuda", "dtype": "bfloat16"},
        "parallel": {"ulysses_degree": 2}, "runtime": {"compile": "on", "cuda_graphs": True},
        "server": {"grace_seconds": 30}})
    try:
        address = group.wait_ready(timeout=400)
        worker_pid = int(info(address)["worker_pids"])
        got = denoise(address, to_request(job, ckpt.name), timeout=180)
        err = rel_err(got.float(), reference(ckpt, job, device="cuda", dtype="bfloat16").float())
        print(f"served 2-GPU CUDA-graph group: rel err {err:.2e}")
        assert err <= 3e-2, err
        t0 = time.monotonic()
        os.killpg(group.proc.pid, signal.SIGTERM)
        try:
            code = group.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the group did not exit within 90 s of SIGTERM:\n{group.tail()}") from None
        print(f"exit code {code} after {time.monotonic() - t0:.1f} s; the log's end:\n{group.tail(2500)}")
        assert code == 0, group.tail()
        for _ in range(100):  # the worker rank exited after rank 0's shutdown
            try:
                os.kill(worker_pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"worker rank {worker_pid} still running\n{group.tail()}")
    finally:
        group.stop()
