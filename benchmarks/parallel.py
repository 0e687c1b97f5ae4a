"""Multi-GPU denoiser benchmark: our group (CFG parallel, Ulysses, Ring, USP) against diffusers' own
``enable_parallelism`` (ContextParallelConfig ulysses / ring), side by side in the same run, on 1, 2 and 4 GPUs.

Models: the real-size Flux.1-dev transformer at 1024^2 (4096 image + 512 text tokens) and Wan2.1-T2V-1.3B at
480p x 81 frames (32760 video tokens, CFG), random weights, bf16. Both sides use the same attention kernel
(``--attention``: ours from the kernel registry, diffusers' matching backend) and the same compile setting
(``--compile``: regional ``torch.compile`` of the repeated blocks, applied to both; ``--cuda-graphs``: inductor's
CUDA-graph trees around the compiled blocks, both sides). ``--trace-collectives both`` runs each of our Ulysses
layouts twice: all-to-alls traced into the compiled blocks (the default) and kept outside them (``-untraced``);
``--ulysses-chunks 1,3`` runs them once per head-chunk count (``-c3``: exchanges overlapped with attention).

    python benchmarks/parallel.py                          # GPU: 1, 2, 4 GPUs; appends rows to benchmarks/RESULTS.md
    python benchmarks/parallel.py --device cpu --tiny      # the same code on tiny models, gloo, 1 and 2 ranks (CI)

Per configuration it measures, on every rank with a barrier before each repetition (the group's time is the
slowest rank's):

- forward: one transformer call of the cond branch (ours: ``ModelRunner.forward``, i.e. sharding hooks +
  sequence-parallel attention; diffusers: the model call with its context-parallel hooks);
- step: one denoising step (ours: ``Worker.execute_step``: every CFG branch this rank owns, the CFG all-gather,
  the scheduler; diffusers: each branch's forward, the CFG mix and the scheduler, as its pipeline loop does);
- a per-phase breakdown of one profiled forward (torch.profiler, rank 0): collectives (all-to-all, all-gather,
  p2p; kernel time, which includes waiting for the slowest peer), exposed communication (time when only
  collectives run: what overlap does not hide), attention kernels, linear (GEMM) kernels, other kernels, and idle
  (wall time with no kernel running: the host did not keep the device busy).

Speed-ups are against the same side's 1-GPU run in the same invocation. Rows (card, date, config) go to
``benchmarks/RESULTS.md`` (``--results``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FLUX_DEV = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
            "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
            "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}
FLUX_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                  "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
DIFFUSERS_BACKEND = {"sdpa": "native", "sdpa_cudnn": "_native_cudnn", "sdpa_flash": "_native_flash",
                     "sdpa_efficient": "_native_efficient", "flash_attn": "flash", "flash_attn3": "_flash_3",
                     "sage": "sage"}
"""Our kernel name -> the diffusers attention backend that runs the same kernel."""


@dataclass
class Row:
    model: str
    side: str
    config: str
    world: int
    forward_s: float = float("nan")
    step_s: float = float("nan")
    phases_ms: dict[str, float] = field(default_factory=dict)
    note: str = ""


@dataclass
class Spec:
    """One benchmarked model: its adapter, config-only (or tiny) checkpoint, how to build a fresh handle, the job."""

    name: str
    adapter: Any
    checkpoint: Path
    make_handle: Callable[[], Any]
    job: Any
    heads: int
    cfg: bool
    diffusers_call: Callable[[Any, Any, str], torch.Tensor]


# -- building the models ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _building(dtype: torch.dtype, device: torch.device):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _config_only_checkpoint(folder: Path, pipeline: str, components: dict[str, tuple[str, dict]]) -> Path:
    """A checkpoint folder with configs only (model_index.json + component configs): what the adapters read."""
    index = {"_class_name": pipeline, "_diffusers_version": "0.42.1"}
    for name, (cls, cfg) in components.items():
        index[name] = ["diffusers", cls]
        (folder / name).mkdir(parents=True, exist_ok=True)
        fname = "scheduler_config.json" if name == "scheduler" else "config.json"
        (folder / name / fname).write_text(json.dumps({"_class_name": cls, **cfg}, indent=2))
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def flux_spec(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, workdir: Path, rank: int) -> Spec:
    import diffusers

    from services.assets import build_tiny, widen_heads
    from services.families.flux import FluxAdapter
    from services.tiny.flux import flux_scheduler

    if args.tiny:
        folder = workdir / "tiny-flux-heads4"  # 4 heads: Ulysses over 2 ranks in 2 head chunks can run
        if rank == 0:
            widen_heads(build_tiny("flux", workdir / "tiny-flux"), folder, heads=4)
        dist.barrier()
        adapter = FluxAdapter(folder)

        def make_handle() -> Any:
            return adapter.load_denoiser(dtype, device)
        width = height = 64
    else:
        folder = workdir / "flux-dev-config"
        if rank == 0:
            _config_only_checkpoint(folder, "FluxPipeline", {"transformer": ("FluxTransformer2DModel", FLUX_DEV),
                                                             "scheduler": ("FlowMatchEulerDiscreteScheduler",
                                                                           FLUX_SCHEDULER)})
        dist.barrier()
        adapter = FluxAdapter(folder)

        def make_handle() -> Any:
            torch.manual_seed(0)
            with _building(dtype, device):
                transformer = diffusers.FluxTransformer2DModel(**FLUX_DEV)
            transformer.eval().requires_grad_(False)
            pipe = diffusers.FluxPipeline(scheduler=flux_scheduler(), vae=None, text_encoder=None, tokenizer=None,
                                          text_encoder_2=None, tokenizer_2=None, transformer=transformer)
            return adapter.denoiser_handle(pipe)
        width = height = 1024

    def call(handle: Any, state: Any, branch: str) -> torch.Tensor:
        t = state.timesteps[0].expand(1).to(state.latents.dtype)
        return handle.transformer(hidden_states=state.latents, timestep=t / 1000, return_dict=False,
                                  **state.branch_inputs[branch])[0]

    cfg = FLUX_DEV if not args.tiny else adapter.component_config("transformer")
    job = _job(adapter, width, height, 1, guidance=3.5, steps=28)
    return Spec("flux", adapter, folder, make_handle, job, int(cfg["num_attention_heads"]), False, call)


def wan_spec(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, workdir: Path, rank: int) -> Spec:
    import diffusers

    from services.families.wan import WanAdapter, WanDenoiser
    from services.tiny.wan import real_size_configs, tiny_configs

    configs = tiny_configs() if args.tiny else real_size_configs("wan2.1-t2v-1.3b")
    folder = workdir / ("tiny-wan-config" if args.tiny else "wan-1.3b-config")
    if rank == 0:
        _config_only_checkpoint(folder, "WanPipeline", {
            "transformer": ("WanTransformer3DModel", configs["transformer"]),
            "scheduler": ("UniPCMultistepScheduler", configs["scheduler"]),
            "vae": ("AutoencoderKLWan", configs["vae"])})
    dist.barrier()
    adapter = WanAdapter(folder)

    def make_handle() -> Any:
        torch.manual_seed(0)
        with _building(dtype, device):
            transformer = diffusers.WanTransformer3DModel(**configs["transformer"])
        transformer.eval().requires_grad_(False)
        pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                                     scheduler=diffusers.UniPCMultistepScheduler(**configs["scheduler"]))
        pipe.vae_scale_factor_temporal = adapter.vae_scale_factor_temporal
        pipe.vae_scale_factor_spatial = adapter.vae_scale_factor_spatial
        return WanDenoiser(pipe=pipe, transformer=transformer, component="transformer")

    def call(handle: Any, state: Any, branch: str) -> torch.Tensor:
        x = state.latents.to(handle.transformer.dtype)
        return handle.transformer(hidden_states=x, timestep=state.timesteps[0].expand(1), return_dict=False,
                                  **state.branch_inputs[branch])[0]

    width, height, frames = (32, 48, 9) if args.tiny else (832, 480, 81)
    job = _job(adapter, width, height, frames, guidance=5.0, steps=50)
    return Spec("wan", adapter, folder, make_handle, job, int(configs["transformer"]["num_attention_heads"]), True,
                call)


def _job(adapter: Any, width: int, height: int, frames: int, guidance: float, steps: int) -> Any:
    from denoiser_svc.types import DenoiseJob
    from services.families.base import SamplingParams

    # the conditioning shapes come from the model config: build them on a throwaway handle's config only
    handle = _ConfigOnly(adapter)
    conds, negs = adapter.warmup_conditionings(handle)
    params = SamplingParams(width=width, height=height, steps=steps, guidance_scale=guidance, seed=0, frames=frames)
    adapter.validate_params(params)
    return DenoiseJob(request_id="bench", params=params, conditionings=conds, negative_conditionings=negs,
                      start_step=0, end_step=steps)


class _ConfigOnly:
    """Stands in for a handle where ``warmup_conditionings`` reads only ``transformer.config``."""

    def __init__(self, adapter: Any):
        from types import SimpleNamespace

        self.transformer = SimpleNamespace(config=SimpleNamespace(**adapter.component_config("transformer")))


# -- measuring ------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    """Median over ``iters`` of the group's time (slowest rank) of ``fn``, after ``warmup`` calls."""
    times = []
    for i in range(warmup + iters):
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64,
                               device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if i >= warmup:
            times.append(float(elapsed.item()))
    return statistics.median(times)


_COMM = ("nccl", "all_to_all", "alltoall", "allgather", "all_gather", "sendrecv", "send", "recv", "gloo",
         "c10d", "broadcast", "allreduce", "all_reduce")
_ATTN = ("flash", "fmha", "cudnn", "attention", "sdpa", "softmax")
_LINEAR = ("gemm", "matmul", "aten::mm", "aten::addmm", "aten::bmm", "xmma", "cutlass", "nvjet", "sm90", "sm80",
           "ampere", "hopper", "linear")


def _category(name: str) -> str:
    low = name.lower()
    if any(k in low for k in _COMM):
        return "comm"
    if any(k in low for k in _ATTN):
        return "attention"
    if any(k in low for k in _LINEAR):
        return "linear"
    return "other"


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start_us, end_us)`` intervals, in milliseconds."""
    busy, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            busy += (stop - max(start, end)) / 1000
            end = stop
    return busy


def phases(fn: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """Milliseconds per phase of one call of ``fn``. CUDA: kernel time by kind (``comm`` counts a collective's whole
    kernel, including the time it waits for the slowest peer); ``exposed``: time when only collective kernels run
    (the union of all kernels minus the union of the others: communication and waiting that nothing hides); idle =
    wall minus the union of all kernels. CPU: self time of leaf ops by kind (gloo collectives block, so ``exposed``
    equals ``comm``); idle = wall minus their sum."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    dist.barrier()
    _sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        wall = time.perf_counter() - t0
    out = {"comm": 0.0, "attention": 0.0, "linear": 0.0, "other": 0.0}
    if device.type == "cuda":
        every, compute = [], []
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA and ev.time_range.elapsed_us() > 0:
                kind = _category(ev.name)
                out[kind] += ev.time_range.elapsed_us() / 1000
                every.append((ev.time_range.start, ev.time_range.end))
                if kind != "comm":
                    compute.append(every[-1])
        busy = _union_ms(every)
        out["exposed"] = busy - _union_ms(compute)
        out["idle"] = max(wall * 1000 - busy, 0.0)
    else:
        for avg in prof.key_averages():
            out[_category(avg.key)] += avg.self_cpu_time_total / 1000
        out["idle"] = max(wall * 1000 - sum(out.values()), 0.0)
        out["exposed"] = out["comm"]
    return {k: round(v, 2) for k, v in out.items()}


LAYOUT_KINDS = ("single", "ulysses", "ring", "usp", "cfg")


def layout_kind(name: str) -> str:
    """The kind of a configuration name: ``single``, ``ulysses`` (``ulysses4``, ``-c3``, ``-untraced``), ``ring``,
    ``usp`` (``ulysses2xring2``) or ``cfg`` (``cfg2``, ``cfg2xulysses2``)."""
    if name.startswith("cfg"):
        return "cfg"
    if "xring" in name:
        return "usp"
    return next(kind for kind in ("single", "ulysses", "ring") if name.startswith(kind))


# -- our group ------------------------------------------------------------------------------------------------------
def our_layouts(spec: Spec, world: int, trace: str = "on", chunks: tuple[int, ...] = (1,)
                ) -> list[tuple[str, dict[str, Any]]]:
    """Our configurations at ``world`` ranks; every pure-Ulysses one once per traced/untraced variant (``trace``)
    and per head-chunk count in ``chunks`` that divides the heads (named ``-c<chunks>``)."""
    if world == 1:
        return [("single", {})]
    out: list[tuple[str, dict[str, Any]]] = []

    def ulysses(name: str, layout: dict[str, Any]) -> None:
        for c in chunks:
            if spec.heads % (layout["ulysses_degree"] * c):
                continue
            suffix = f"-c{c}" if c > 1 else ""
            chunked = {**layout, "ulysses_chunks": c} if c > 1 else layout
            if trace in ("on", "both"):
                out.append((name + suffix, chunked))
            if trace in ("off", "both"):
                out.append((f"{name}{suffix}-untraced", {**chunked, "trace_collectives": "false"}))

    if spec.heads % world == 0:
        ulysses(f"ulysses{world}", {"ulysses_degree": world})
    out.append((f"ring{world}", {"ring_degree": world}))
    if world >= 4 and spec.heads % (world // 2) == 0:
        out.append((f"ulysses{world // 2}xring2", {"ulysses_degree": world // 2, "ring_degree": 2}))
    if spec.cfg:
        half = world // 2
        if half == 1:
            out.append(("cfg2", {"cfg_degree": 2}))
        elif spec.heads % half == 0:
            ulysses(f"cfg2xulysses{half}", {"cfg_degree": 2, "ulysses_degree": half})
    return out


def _measure_ours(row: Row, worker: Any, spec: Spec, device: torch.device, args) -> Row:
    worker.add_request(spec.job)
    state = worker.states[spec.job.request_id]
    steps = iter(range(spec.job.end_step))

    def forward() -> None:
        mark_graph_step(args)
        with torch.inference_mode():
            worker.runner.forward(state, 0, "cond")

    row.forward_s = timed(forward, device, args.warmup, args.iters)
    row.step_s = timed(lambda: worker.execute_step(spec.job.request_id, next(steps)).wait(), device, 1, args.steps)
    row.phases_ms = phases(forward, device)
    return row


def run_ours(spec: Spec, handle: Any, world: int, rank: int, device: torch.device, args) -> list[Row]:
    from denoiser_svc.config import DenoiserServiceConfig
    from denoiser_svc.parallel.groups import ParallelGroups
    from denoiser_svc.worker import Worker
    from services.attention.selection import select_kernels
    from services.config import load_config
    from services.runtime import regional_compile

    rows = []
    for name, layout in our_layouts(spec, world, args.trace_collectives, args.ulysses_chunks):
        if layout_kind(name) not in args.layout_kinds:
            continue
        overrides = [f"model.checkpoint={spec.checkpoint}", f"model.device={device.type}", f"model.dtype={args.dtype}",
                     "warmup=false", f"runtime.attention_backend={args.attention}", f"runtime.compile={args.compile}",
                     f"runtime.cuda_graphs={str(args.cuda_graphs).lower()}",
                     *(f"parallel.{k}={v}" for k, v in layout.items())]
        config = load_config(DenoiserServiceConfig, overrides=overrides)
        groups = ParallelGroups.build(config.parallel, rank, dist.get_backend()) if world > 1 else None
        worker = Worker(config, groups=groups)
        worker.init_device()
        worker.device = device
        try:
            worker.load_model(model=handle)
            worker.kernels = select_kernels(config.runtime, {}, device, needs_lse=worker.needs_lse_kernels())
            worker.adapter.install_attention(handle, worker.attention_ops())
            if config.runtime.compile_enabled(device):
                regional_compile(worker.transformer_of(handle), config.runtime, device)
            row = Row(spec.name, "ours", name, world)
            with compile_scope(row, args):
                rows.append(_measure_ours(row, worker, spec, device, args))
        except Exception as exc:  # noqa: BLE001 - one failing configuration is reported, the run goes on
            rows.append(Row(spec.name, "ours", name, world, note=f"failed: {type(exc).__name__}: {exc}"[:300]))
            traceback.print_exc()
        finally:
            worker.abort_request(spec.job.request_id)
            if worker.sharder is not None:
                worker.sharder.remove()
        if rank == 0:
            print(f"[{spec.name}] ours {name} x{world}: {rows[-1]}", flush=True)
    return rows


# -- diffusers' enable_parallelism ------------------------------------------------------------------------------------
def restore_diffusers_processors(transformer: torch.nn.Module, backend: str) -> None:
    from diffusers.models.attention import AttentionModuleMixin

    from services.families.processors import remove_block_forwards
    from services.runtime import undo_regional_compile, unfuse_gelu_epilogues

    undo_regional_compile(transformer)  # ours may have compiled this model's blocks
    remove_block_forwards(transformer)  # diffusers' own block forwards too, not only its processors
    unfuse_gelu_epilogues(transformer)  # and its own MLPs (ours run the GELU in the GEMM epilogue)
    for module in transformer.modules():
        if isinstance(module, AttentionModuleMixin):
            module.set_processor(module._default_processor_cls())
    transformer.set_attention_backend(backend)


def run_diffusers(spec: Spec, models: list[Any], world: int, rank: int, device: torch.device, args) -> list[Row]:
    """``models[0]``: the handle ours ran on (reused for the first configuration, then replaced by fresh ones)."""
    from diffusers import ContextParallelConfig

    from services.runtime import RuntimeConfig, fuse_projections, regional_compile

    backend = DIFFUSERS_BACKEND.get(args.attention, "native")
    configs: list[tuple[str, dict[str, int] | None]] = [("single", None)] if world == 1 else []
    if world > 1:
        if spec.heads % world == 0:
            configs.append((f"ulysses{world}", {"ulysses_degree": world}))
        configs.append((f"ring{world}", {"ring_degree": world}))
    configs = [(name, cp) for name, cp in configs if layout_kind(name) in args.layout_kinds]
    rows = []
    for i, (name, cp) in enumerate(configs):
        row = Row(spec.name, "diffusers", name, world)
        if cp and "ring_degree" in cp and backend == "native":
            row.note = "n/a: diffusers' ring needs a backend that returns the LSE (cuDNN/flash, CUDA only)"
            rows.append(row)
            continue
        try:
            if i > 0:  # enable_parallelism cannot be undone: a fresh model per configuration
                handle = transformer = models[0] = None  # drop every reference before building the next
                _free(device)
                models[0] = spec.make_handle()
                fuse_projections(models[0].transformer)  # ours fuses Q/K/V by default: the same on both sides
            handle = models[0]
            transformer = handle.transformer
            restore_diffusers_processors(transformer, backend)
            if cp is not None:
                if device.type == "cpu":
                    # diffusers 0.42.1 picks the rank's device as rank % torch.accelerator.device_count(), which is
                    # 0 without an accelerator; the CPU smoke run only exercises the code path
                    torch.accelerator.device_count = lambda: 1
                transformer.enable_parallelism(config=ContextParallelConfig(**cp))
            if args.compile == "on":
                regional_compile(transformer, RuntimeConfig(compile="on", cuda_graphs=args.cuda_graphs), device)
            with compile_scope(row, args):
                _measure_diffusers(row, handle, spec, device, args)
        except Exception as exc:  # noqa: BLE001
            row.note = f"failed: {type(exc).__name__}: {exc}"[:300]
            traceback.print_exc()
        rows.append(row)
        if rank == 0:
            print(f"[{spec.name}] diffusers {name} x{world}: {row}", flush=True)
    return rows


def _measure_diffusers(row: Row, handle: Any, spec: Spec, device: torch.device, args) -> Row:
    """Forward and step as diffusers' pipeline loop runs them: each branch's forward, the CFG mix, the scheduler."""
    job = spec.job
    with torch.inference_mode():
        state = spec.adapter.prepare(handle, job.params, job.conditionings, job.negative_conditionings, None, 0,
                                     job.end_step)
    branches = ("cond", "uncond") if state.do_cfg else ("cond",)
    steps = iter(range(job.end_step))

    def forward() -> None:
        mark_graph_step(args)
        with torch.inference_mode():
            spec.diffusers_call(handle, state, "cond")

    def step() -> None:
        k = next(steps)
        mark_graph_step(args)
        with torch.inference_mode():
            preds = {b: spec.diffusers_call(handle, state, b) for b in branches}
            noise = spec.adapter.combine(state, preds["cond"], preds["uncond"]) if state.do_cfg else preds["cond"]
            state.latents = spec.adapter.scheduler_step(state, noise, k)

    row.forward_s = timed(forward, device, args.warmup, args.iters)
    row.step_s = timed(step, device, 1, args.steps)
    row.phases_ms = phases(forward, device)
    return row


@contextlib.contextmanager
def compile_scope(row: Row, args: argparse.Namespace) -> Iterator[None]:
    """One configuration's compilation: dynamo's caches start empty (graphs of earlier configurations would count
    against its per-function recompile limit, past which later configurations silently run eager), and the graph
    breaks it hits go into the row's note."""
    if args.compile != "on":
        yield
        return
    from services.runtime import graph_breaks

    torch._dynamo.reset()
    before = graph_breaks()
    yield
    row.note = f"{graph_breaks() - before} graph breaks"


def mark_graph_step(args: argparse.Namespace) -> None:
    """With CUDA graphs, a new step begins: the previous call's graph outputs may be overwritten (as the worker
    does at each step)."""
    if args.cuda_graphs and args.device == "cuda":
        torch.compiler.cudagraph_mark_step_begin()


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- one group of `world` processes ----------------------------------------------------------------------------------
def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600), **kwargs)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    rows: list[Row] = []
    workdir = Path(args.workdir)
    for model in args.models.split(","):
        build = {"flux": flux_spec, "wan": wan_spec}[model]
        spec = build(args, device, dtype, workdir, rank)
        models = [spec.make_handle()]
        rows += run_ours(spec, models[0], world, rank, device, args)
        rows += run_diffusers(spec, models, world, rank, device, args)
        models.clear()
        _free(device)
    if rank == 0:
        Path(out).write_text(json.dumps([asdict(r) for r in rows]))
    dist.barrier()
    dist.destroy_process_group()


def launch(world: int, args: argparse.Namespace) -> list[Row]:
    import multiprocessing

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(args.workdir) / f"rows-{world}.json"
    # CUDA needs fresh processes; on the CPU forked ranks skip re-importing the stack
    ctx = multiprocessing.get_context("spawn" if args.device == "cuda" else "fork")
    procs = [ctx.Process(target=rank_main, args=(r, world, port, args, str(out))) for r in range(world)]
    for p in procs:
        p.start()
    # rank 0 writes every row before the group's final barrier; a group that then hangs in its teardown (seen on 2x
    # H200 after CUDA-graph runs: no rank returned from the barrier / NCCL destroy) must not cost the other worlds
    written = None
    while any(p.is_alive() for p in procs):
        if written is None and out.is_file():
            written = time.monotonic()
        if written is not None and time.monotonic() - written > args.teardown_s:
            stuck = [r for r, p in enumerate(procs) if p.is_alive()]
            print(f"-- the {world}-rank group wrote its rows but ranks {stuck} did not exit within "
                  f"{args.teardown_s:.0f} s: killed", flush=True)
            for p in procs:
                if p.is_alive():
                    p.kill()
            break
        time.sleep(0.5)
    for p in procs:
        p.join()
    codes = [p.exitcode for p in procs]
    if not out.is_file() or (written is None and any(codes)):
        raise RuntimeError(f"the {world}-rank group failed (exit codes {codes})")
    return [Row(**r) for r in json.loads(out.read_text())]


# -- report ------------------------------------------------------------------------------------------------------------
def speedups(rows: list[Row]) -> dict[tuple[str, str, str, int], tuple[float, float]]:
    base = {(r.model, r.side): r for r in rows if r.world == 1}
    out = {}
    for r in rows:
        b = base.get((r.model, r.side))
        if b is not None:
            out[(r.model, r.side, r.config, r.world)] = (b.forward_s / r.forward_s, b.step_s / r.step_s)
    return out


def table(rows: list[Row], card: str, args: argparse.Namespace) -> list[str]:
    sp = speedups(rows)
    lines = ["| model | side | config | GPUs | forward (ms) | vs 1 GPU | step (ms) | vs 1 GPU | "
             "comm / exposed comm / attention / linear / other / idle (ms, one forward, rank 0) | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fs, ss = sp.get((r.model, r.side, r.config, r.world), (float("nan"), float("nan")))
        ph = " / ".join(f"{r.phases_ms.get(k, float('nan')):.1f}"
                        for k in ("comm", "exposed", "attention", "linear", "other", "idle"))
        lines.append(f"| {r.model} | {r.side} | {r.config} | {r.world} | {r.forward_s * 1e3:.1f} | {fs:.2f}x | "
                     f"{r.step_s * 1e3:.1f} | {ss:.2f}x | {ph} | {r.note} |")
    return lines


def write_results(path: Path, lines: list[str], card: str, args: argparse.Namespace) -> None:
    head = (f"\n## Multi-GPU (issue 4): {datetime.date.today().isoformat()}, {card}, torch {torch.__version__}, "
            f"attention {args.attention}, compile {args.compile}{', CUDA graphs' if args.cuda_graphs else ''}"
            f"{', tiny' if args.tiny else ''}\n\n"
            f"`python benchmarks/parallel.py {' '.join(sys.argv[1:])}`. Forward: one cond transformer call; step: "
            f"one denoising step (every CFG branch, mix, scheduler); medians of the slowest rank; speed-ups vs the "
            f"same side's 1-GPU row.\n\n")
    if not path.exists():
        path.write_text("# Benchmark results\n")
    with path.open("a") as f:
        f.write(head + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny model configs (CPU smoke run)")
    p.add_argument("--gpus", default=None, help="world sizes, comma-separated (default 1,2,4 on CUDA, 1,2 on CPU)")
    p.add_argument("--models", default="flux,wan")
    p.add_argument("--attention", default=None, help="kernel on both sides (default sdpa_cudnn on CUDA, sdpa on CPU)")
    p.add_argument("--compile", choices=["off", "on"], default="off")
    p.add_argument("--cuda-graphs", action="store_true", help="CUDA-graph trees around the compiled blocks (both sides)")
    p.add_argument("--trace-collectives", choices=["on", "off", "both"], default="on",
                   help="our Ulysses all-to-alls traced into the compiled blocks, kept outside, or both variants")
    p.add_argument("--ulysses-chunks", default="1",
                   help="head-chunk counts to run each of our Ulysses layouts with, comma-separated (e.g. 1,3)")
    p.add_argument("--layouts", default=",".join(LAYOUT_KINDS),
                   help=f"kinds of configuration to run, comma-separated, from {list(LAYOUT_KINDS)} (1-GPU rows: single)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None, help="timed forwards per configuration")
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"))
    p.add_argument("--teardown-s", type=float, default=60.0,
                   help="seconds a group may take to exit after rank 0 wrote its rows, then its ranks are killed")
    args = p.parse_args(argv)
    args.ulysses_chunks = tuple(int(c) for c in args.ulysses_chunks.split(","))
    args.layout_kinds = {k for k in args.layouts.split(",") if k}
    if args.layout_kinds - set(LAYOUT_KINDS):
        p.error(f"--layouts: unknown {sorted(args.layout_kinds - set(LAYOUT_KINDS))}; known: {list(LAYOUT_KINDS)}")
    if args.cuda_graphs and args.compile != "on":
        p.error("--cuda-graphs needs --compile on (the graphs wrap the compiled blocks)")
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device; use --device cpu --tiny")
    args.gpus = args.gpus or ("1,2,4" if cuda else "1,2")
    args.attention = args.attention or ("sdpa_cudnn" if cuda else "sdpa")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    args.iters = args.iters if args.iters is not None else (8 if cuda else 2)
    args.steps = args.steps if args.steps is not None else (4 if cuda else 2)
    worlds = [int(w) for w in args.gpus.split(",")]
    if cuda and max(worlds) > torch.cuda.device_count():
        p.error(f"--gpus {args.gpus} but only {torch.cuda.device_count()} GPUs")
    card = torch.cuda.get_device_name(0) if cuda else f"cpu ({os.cpu_count()} cores)"
    if not cuda:  # forked CPU ranks inherit what is imported here (diffusers imports its models lazily)
        import diffusers

        import denoiser_svc.worker  # noqa: F401
        import services.registry  # noqa: F401

        for name in ("FluxPipeline", "FluxTransformer2DModel", "WanPipeline", "WanTransformer3DModel"):
            getattr(diffusers, name)
    t0 = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="chitu-bench-parallel-") as tmp:
        args.workdir = tmp
        partial = Path(args.results).with_suffix(".partial.md")
        for world in worlds:
            rows += launch(world, args)
            print(f"-- {world} rank(s) done at {time.perf_counter() - t0:.0f} s", flush=True)
            # what is measured so far survives a run cut short by a time limit
            partial.write_text(f"partial: {card}, {' '.join(sys.argv[1:])}\n\n" + "\n".join(table(rows, card, args))
                               + "\n")
    partial.unlink(missing_ok=True)
    lines = table(rows, card, args)
    print("\n".join(lines))
    write_results(Path(args.results), lines, card, args)
    print(f"rows appended to {args.results}; total {time.perf_counter() - t0:.0f} s")
    failed = [r for r in rows if r.note.startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
