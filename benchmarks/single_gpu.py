"""One-GPU forward benchmark: Flux.1-dev at 1024^2 and Wan2.1-T2V-1.3B at 480p x 81 frames (random weights from the
real configs, bf16). Compares diffusers' default forward, diffusers + ``compile_repeated_blocks`` + its best
attention backend, and ours (our processors, fused QKV, each attention backend, eager and regionally compiled), and
measures the denoiser service's per-step time against the bare forward.

    python benchmarks/single_gpu.py                       # on a GPU: writes rows to benchmarks/RESULTS.md
    python benchmarks/single_gpu.py --device cpu --tiny   # the same code on tiny configs (CI runs this)

Every row: median seconds per forward, speed-up vs diffusers eager and vs the strongest diffusers configuration,
achieved TFLOP/s (linear + attention FLOPs counted on the real shapes), that as a fraction of the measured GEMM
ceiling, the fraction of the FLOP floor (linear at the GEMM ceiling + attention at the fastest exact kernel's
measured time), the relative error vs the reference forward (float32 math attention, eager, unfused), and on a GPU
the SM clock, power and active clock limiters while the row ran (``gpu_clocks``). Lossy kernels are reported
separately with their PSNR vs the exact output. ``--interleave R`` adds the headline pair timed in turns (diffusers'
strongest configuration on a copy of the model, and ours), one forward a sample and three back to back;
``--interleave-also _native_cudnn`` adds another diffusers configuration to those turns (e.g. the cuDNN attention the
issue's own baseline table used, beside FlashAttention-4 when that is the strongest).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import dataclasses
import datetime
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_clocks import ClockSampler  # noqa: E402
from services.attention import AttentionOps  # noqa: E402
from services.attention.autotune import ShapeRecorder  # noqa: E402
from services.attention.backends import AttentionSpec, BackendName, get_backend, usable_backends  # noqa: E402
from services.attention.repeated_keys import merge_repeated_keys  # noqa: E402
from services.attention.selection import select_kernels  # noqa: E402
from services.gemm import clear_routes, route_linear, routes, select_gemms, start_recording  # noqa: E402
from services.runtime import (  # noqa: E402
    RuntimeConfig,
    fuse_gelu_epilogues,
    fuse_norm_rope,
    fuse_norms,
    fuse_projections,
    parse_size,
    regional_compile,
    undo_regional_compile,
    unfuse_gelu_epilogues,
    unfuse_norm_rope,
    unfuse_norms,
)

FLUX_DEV = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
            "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
            "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}
FLUX_TINY = {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 16,
             "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32,
             "guidance_embeds": True, "axes_dims_rope": [4, 6, 6]}
WAN_1_3B = {"patch_size": [1, 2, 2], "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16,
            "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30,
            "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024}
WAN_TINY = {**WAN_1_3B, "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 4, "out_channels": 4,
            "text_dim": 32, "freq_dim": 32, "ffn_dim": 32, "num_layers": 2}
FLUX_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                  "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


@dataclass
class Row:
    model: str
    variant: str
    seconds: float
    rel_err: float = float("nan")
    lossy: bool = False
    psnr: float = float("nan")
    note: str = ""
    runs: list[float] = field(default_factory=list)


@dataclass
class Bench:
    device: torch.device
    dtype: torch.dtype
    reps: int
    deadline: float
    out_dir: Path | None
    rows: list[Row] = field(default_factory=list)
    facts: dict[str, object] = field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time_fn(self, fn: Callable[[], object], reps: int | None = None, warmup: int = 2) -> list[float]:
        reps = reps or self.reps
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(reps):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1000.0)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return times

    def save(self) -> None:
        if self.out_dir is not None:
            (self.out_dir / "single_gpu.json").write_text(json.dumps(
                {"facts": self.facts, "rows": [asdict(r) for r in self.rows]}, indent=1, default=str))

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print(f"  {row.model:5s} {row.variant:58s} {row.seconds * 1000:9.2f} ms  err={row.rel_err:.2e}"
              f"{f'  psnr={row.psnr:.1f}dB' if row.lossy else ''} {row.note}", flush=True)
        self.save()
        return row


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def psnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    mse = float(((a - ref) ** 2).mean())
    peak = float(ref.max() - ref.min())
    return float("inf") if mse == 0 else 10 * math.log10(peak * peak / mse)


def gemm_ceiling(bench: Bench) -> float:
    """Measured bf16 (fp32 on the CPU) matrix-product rate, TFLOP/s."""
    n = 8192 if bench.device.type == "cuda" else 512
    dtype = bench.dtype
    a = torch.randn(n, n, device=bench.device, dtype=dtype)
    b = torch.randn(n, n, device=bench.device, dtype=dtype)
    # ~1 s of products first: an idle card starts at a low clock (seen: 345 MHz) and the first products run slow
    t = statistics.median(bench.time_fn(lambda: a @ b, reps=20, warmup=600 if bench.device.type == "cuda" else 3))
    return 2 * n ** 3 / t / 1e12


def profile(bench: Bench, label: str, fn: Callable[[], object], args) -> None:
    """Top kernels of one forward (CUDA time), appended to OUT/profiles.txt."""
    if not args.profile or bench.device.type != "cuda" or bench.out_dir is None:
        return
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.inference_mode(), torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        bench.sync()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=60, max_name_column_width=110)
    with open(bench.out_dir / "profiles.txt", "a") as f:
        f.write(f"\n===== {label}\n{table}\n")


def count_flops(model: torch.nn.Module, forward: Callable[[], object], install: Callable, bench: Bench):
    """Linear FLOPs (hooks on every nn.Linear) and attention FLOPs (recorded shapes) of one forward."""
    linear = [0]

    def hook(mod, inp, out):
        x = inp[0]
        linear[0] += 2 * x.numel() // x.shape[-1] * mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    recorder = ShapeRecorder()
    install(model, recorder.ops())
    try:
        with torch.inference_mode():
            forward()
    finally:
        for h in handles:
            h.remove()
    attn = sum(n * 4 * s.q[0] * s.q[2] * s.q[1] * s.k[1] * s.q[3] for s, n in recorder.calls.items())
    return linear[0], attn, dict(recorder.calls)


def set_diffusers_backend(model: torch.nn.Module, name: str | None) -> None:
    from diffusers.models.attention import AttentionModuleMixin

    from services.families.processors import remove_block_forwards

    remove_block_forwards(model)  # diffusers' own block forwards too, not only its processors
    unfuse_gelu_epilogues(model)  # and its own MLPs
    unfuse_norm_rope(model)  # and its own q/k norms and rotation
    unfuse_norms(model)  # and its own residual + layer norm + modulation ops
    if "wan" in _DISPATCH:
        import diffusers.models.transformers.transformer_wan as tw

        tw.dispatch_attention_fn = _DISPATCH["wan"]
    for m in model.modules():
        if isinstance(m, AttentionModuleMixin):
            m.set_processor(m._default_processor_cls())
    if name is None:  # processors without a backend use the process-wide one: back to diffusers' default
        import diffusers.models.attention_dispatch as ad

        ad._AttentionBackendRegistry.set_active_backend(ad.AttentionBackendName.NATIVE)
    elif name == FA4_HUB:
        _diffusers_flash_attn4(model)
    else:
        model.set_attention_backend(name)


FA4_HUB = "flash_4_hub"
"""diffusers' FlashAttention-4 backend. diffusers loads it from the Hugging Face Hub (``kernels`` package), which
this machine cannot reach; the benchmark hands it the locally installed kernel instead, through the same opaque
custom op ours uses, so both sides run the same kernel with the same compile behaviour."""


def _diffusers_flash_attn4(model: torch.nn.Module) -> None:
    import diffusers.models.attention_dispatch as ad

    from services.attention.backends import _fa4_op

    def kernel(q, k, v, softmax_scale=None, causal=False):
        if causal or (softmax_scale is not None and abs(softmax_scale - q.shape[-1] ** -0.5) > 1e-6):
            raise ValueError("the benchmark's FA4 shim runs non-causal attention at the default scale only")
        return _fa4_op(q, k, v)[0]

    backend = ad.AttentionBackendName.FLASH_4_HUB
    ad._HUB_KERNELS_REGISTRY[backend].kernel_fn = kernel
    for m in model.modules():
        processor = getattr(m, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            processor._attention_backend = backend
    ad._AttentionBackendRegistry.set_active_backend(backend)


def uncompile_diffusers(model: torch.nn.Module) -> None:
    for m in model.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None


# ------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelCase:
    name: str
    model: torch.nn.Module
    forward: Callable[[], torch.Tensor]
    """One forward, diffusers' way (no step constants)."""
    our_forward: Callable[[], torch.Tensor]
    """One forward our way (the adapter's forward with its per-request constants)."""
    install: Callable[[torch.nn.Module, AttentionOps], int]
    note: str = ""
    forward_on: Callable[[torch.nn.Module], Callable[[], torch.Tensor]] | None = None
    """``forward`` on another instance of the model (the interleaved rows run diffusers on a twin)."""


def flux_case(bench: Bench, tiny: bool, workdir: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from services.families.flux import FluxAdapter
    from services.families.processors.flux import install

    cfg = FLUX_TINY if tiny else FLUX_DEV
    size, text_len = (64, 16) if tiny else (1024, 512)
    ckpt = write_flux_checkpoint(workdir / "flux-config-only", cfg, size, text_len)
    torch.manual_seed(0)
    with torch.device(bench.device):
        transformer = FluxTransformer2DModel(**cfg).to(bench.dtype).eval().requires_grad_(False)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=None, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    adapter = FluxAdapter(ckpt)
    pipe = adapter.denoiser_handle(pipe)
    from services.families.base import SamplingParams

    params = SamplingParams(width=size, height=size, steps=28, guidance_scale=3.5, seed=0)
    conds, _ = adapter.warmup_conditionings(pipe)
    state = adapter.prepare(pipe, params, conds, {}, None, 0, params.steps)
    inputs = state.branch_inputs["cond"]
    t = state.timesteps[3].expand(1).to(bench.dtype) / 1000

    def forward_on(module: torch.nn.Module) -> Callable[[], torch.Tensor]:
        return lambda: module(hidden_states=state.latents, timestep=t, return_dict=False, **inputs)[0]

    def our_forward():
        return adapter.forward(pipe, state, state.latents, 3, "cond")

    case = ModelCase("flux", transformer, forward_on(transformer), our_forward, install, forward_on=forward_on)
    return case, (adapter, pipe, ckpt, conds, params)


def write_flux_checkpoint(folder: Path, cfg: dict, size: int, text_len: int) -> Path:
    """A config-only Flux checkpoint folder (the worker reads configs; the weights come from memory)."""
    (folder / "transformer").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "_diffusers_version": "0.42.1",
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}))
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", **cfg}))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", **FLUX_SCHEDULER}))
    (folder / "chitu.json").write_text(json.dumps({"width": size, "height": size, "steps": 28, "guidance_scale": 3.5,
                                                   "max_size": 2048}))
    (folder / "tokenizer_2").mkdir(exist_ok=True)
    (folder / "tokenizer_2" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": text_len}))
    return folder


def wan_case(bench: Bench, tiny: bool, prompt_tokens: int = 0):
    from diffusers import WanTransformer3DModel

    cfg = WAN_TINY if tiny else WAN_1_3B
    frames, h, w = (2, 8, 8) if tiny else (21, 60, 104)  # 480x832 x 81 frames -> 21 x 60 x 104 latents
    text_len = 16 if tiny else 512
    torch.manual_seed(0)
    with torch.device(bench.device):
        transformer = WanTransformer3DModel(**cfg).to(bench.dtype).eval().requires_grad_(False)
    gen = torch.Generator(bench.device).manual_seed(1)
    x = torch.randn(1, cfg["in_channels"], frames, h, w, generator=gen, device=bench.device, dtype=bench.dtype)
    text = torch.randn(1, text_len, cfg["text_dim"], generator=gen, device=bench.device, dtype=bench.dtype)
    if 0 < prompt_tokens < text_len:  # a prompt as WanPipeline encodes it: zero rows after its tokens
        text[:, prompt_tokens:] = 0
    t = torch.full((1,), 500.0, device=bench.device)

    def forward_on(module: torch.nn.Module) -> Callable[[], torch.Tensor]:
        return lambda: module(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]

    forward = forward_on(transformer)

    note = ""
    try:
        from services.families.processors.wan import install
    except ImportError:  # our Wan processors not in the tree: route diffusers' processors through our kernel
        install, note = _install_through_dispatch, "ours via diffusers' attention dispatch (no Wan processors yet)"
    return ModelCase("wan", transformer, forward, forward, install, note, forward_on=forward_on)


_DISPATCH: dict[str, Callable] = {}


def _install_through_dispatch(model: torch.nn.Module, ops: AttentionOps) -> int:
    """Fallback for a family without our processors: diffusers' processors, attention through ``ops.joint``
    (patched into the Wan module for this benchmark process only; ``set_diffusers_backend`` restores it)."""
    import diffusers.models.transformers.transformer_wan as tw

    _DISPATCH.setdefault("wan", tw.dispatch_attention_fn)

    def dispatch(query, key, value, attn_mask=None, **_):
        return ops.joint(query, key, value, None)

    tw.dispatch_attention_fn = dispatch
    return 0


# ------------------------------------------------------------------------------------------------------------------


def run_case(bench: Bench, case: ModelCase, lossy_ok: bool, extra: tuple | None, args) -> None:
    m = case.model
    print(f"\n== {case.name} {case.note}", flush=True)
    # diffusers' side of the interleaved rows: an untouched copy of the model, compiled its way at the end
    twins = [copy.deepcopy(m) for _ in range(1 + len(also_backends(args)))] if args.interleave else []
    if case.name == "wan" and not args.tiny:
        bench.reps = args.wan_reps
    lin, attn, shapes = count_flops(m, case.forward, case.install, bench)
    bench.facts[f"{case.name}_linear_tflop"] = lin / 1e12
    bench.facts[f"{case.name}_attention_tflop"] = attn / 1e12
    bench.facts[f"{case.name}_attention_shapes"] = {s.describe(): n for s, n in shapes.items()}
    print(f"  linear {lin / 1e12:.2f} TFLOP, attention {attn / 1e12:.2f} TFLOP; shapes "
          f"{bench.facts[f'{case.name}_attention_shapes']}", flush=True)

    # reference: float32 math attention, eager, unfused (our processors)
    math_backend = get_backend(BackendName.SDPA_MATH, AttentionSpec.for_device(bench.device, bench.dtype, 128))
    case.install(m, AttentionOps(joint=math_backend.fn, cross=math_backend.fn))
    with torch.inference_mode():
        ref = case.forward().float()
    print(f"  reference finite={bool(torch.isfinite(ref).all())} std={float(ref.std()):.3g}", flush=True)

    def timed(variant: str, fn: Callable[[], torch.Tensor], lossy: bool = False, note: str = "", exact=None,
              reps: int | None = None) -> Row | None:
        if bench.left() < 20:
            print(f"  skip {variant}: time budget", flush=True)
            return None
        try:
            with torch.inference_mode():
                out = fn().float()
                with ClockSampler(bench.device.index or 0) as clocks:
                    runs = bench.time_fn(fn, reps=reps)
        except Exception as exc:  # noqa: BLE001 - report and go on with the other variants
            print(f"  {variant} failed: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
            return None
        if clocks.samples:  # the card clocks down under its power cap: which clock each row ran at
            note = f"{note} [{clocks.brief()}]".strip()
        row = Row(case.name, variant, statistics.median(runs), rel_err(out, ref), lossy, note=note, runs=runs)
        if lossy and exact is not None:
            row.psnr = psnr(out, exact)
        return bench.add(row)

    # -- diffusers -------------------------------------------------------------------------------------------------
    set_diffusers_backend(m, None)
    timed("diffusers eager (native SDPA)", case.forward)
    best_name, best_t = None, float("inf")
    diffusers_backends = ("_native_cudnn", "_native_flash", "_native_efficient")
    if BackendName.FLASH_ATTN4 in {b.name for b in usable_backends(AttentionSpec.for_device(bench.device, bench.dtype,
                                                                                            128))}:
        diffusers_backends += (FA4_HUB,)
    for name in diffusers_backends if bench.device.type == "cuda" else ():
        try:
            set_diffusers_backend(m, name)
            row = timed(f"diffusers eager {name}", case.forward)
        except Exception as exc:  # noqa: BLE001
            print(f"  diffusers {name} failed: {type(exc).__name__}: {exc}", flush=True)
            continue
        if row and row.seconds < best_t:
            best_name, best_t = name, row.seconds
    set_diffusers_backend(m, best_name)
    torch._dynamo.reset()
    m.compile_repeated_blocks(fullgraph=False, backend=args.compile_backend)
    t0 = time.perf_counter()
    with torch.inference_mode():
        case.forward()
    bench.sync()
    timed(f"diffusers compile_repeated_blocks + {best_name or 'native'}", case.forward,
          note=f"(compile+first call {time.perf_counter() - t0:.0f}s)")
    profile(bench, f"{case.name} diffusers compiled {best_name}", case.forward, args)
    uncompile_diffusers(m)
    set_diffusers_backend(m, None)
    torch._dynamo.reset()

    # -- ours: auto selection on the recorded shapes, then each backend eager ---------------------------------------
    rt = RuntimeConfig(allow_lossy=False)
    sel = select_kernels(rt, shapes, bench.device)
    bench.facts[f"{case.name}_auto"] = sel.metadata()
    for k, v in sel.metadata().items():
        print(f"  auto {k}: {v}", flush=True)
    auto_joint = sel.get("joint")
    if bench.device.type == "cuda" and sel.report is not None:
        best_attn_s = sum(mm.ms_per_forward for mm in sel.report.measurements
                          if mm.ok and not mm.lossy and mm.backend == auto_joint.name and mm.kind == "joint")
        best_attn_s += sum(mm.ms_per_forward for mm in sel.report.measurements
                           if mm.ok and not mm.lossy and mm.kind == "cross" and mm.backend == sel.get("cross").name)
        bench.facts[f"{case.name}_attention_floor_s"] = best_attn_s / 1000
    plain_ops = AttentionOps(joint=auto_joint.fn, cross=sel.get("cross").fn)
    # --merge: ours with runtime.merge_repeated_keys on (the cross-attention merges repeated trailing keys)
    ops = plain_ops if not args.merge else AttentionOps(
        joint=plain_ops.joint, cross=merge_repeated_keys(plain_ops.cross, args.merged_config))
    def compiled_without(what: str) -> None:
        """Ours compiled before a fusion is applied: the fusion's effect, as one more row."""
        if wants(args, "unfused", what):
            compiled_row(bench, case, m, ops, f"ours compiled default {auto_joint.name.value} unfused {what}", timed,
                         args)

    compiled_without("QKV")
    fused = fuse_projections(m) if args.fuse else 0
    bench.facts[f"{case.name}_fused_modules"] = fused
    compiled_without("MLP")  # fused QKV, the MLP's GELU not yet in the GEMM epilogue
    bench.facts[f"{case.name}_fused_mlp_modules"] = fuse_gelu_epilogues(m) if args.fuse else 0
    compiled_without("norm+rope")  # fused QKV and MLP; q/k norm + rotation as inductor fuses the model's ops
    bench.facts[f"{case.name}_fused_norm_rope_modules"] = fuse_norm_rope(m) if args.fuse else 0
    compiled_without("norms")  # everything above; residual + layer norm + modulation as inductor fuses the ops
    bench.facts[f"{case.name}_fused_norm_blocks"] = fuse_norms(m) if args.fuse else 0
    if args.fuse:  # GEMM kernels per layer shape (services.gemm), recorded on one eager forward as the worker does
        case.install(m, ops)
        recorder = start_recording(m)
        with torch.inference_mode():
            case.our_forward()
        gemms = select_gemms(args.gemm, recorder, bench.device, RuntimeConfig().gemm_min_gain)
        bench.facts[f"{case.name}_gemms"] = gemms.metadata()
        for choice in gemms.choices:
            print(f"  gemm {choice.describe()}", flush=True)
    for what in ABLATIONS:
        mode = "default" if args.compile_backend == "inductor" else args.compile_backend
        compiled_ablated(bench, case, m, ops, what, f"ours compiled {mode} {auto_joint.name.value}", timed, args)
    if args.merge and wants(args, "ablate", "merge") and case.name == "wan":  # the cross-attention kernel auto chose
        compiled_row(bench, case, m, plain_ops, f"ours compiled default {auto_joint.name.value} without merge "
                     f"(cross-attention on {sel.get('cross').name.value}, every other fusion on)", timed, args)
    case.install(m, ops)
    with torch.inference_mode():
        exact_out = case.our_forward().float()  # the exact output lossy kernels are compared with (PSNR)
    usable = usable_backends(AttentionSpec.for_device(bench.device, bench.dtype, next(iter(shapes)).q[-1]))
    for backend in usable if "eager" in args.compare else []:
        if backend.name == BackendName.SDPA_MATH and (bench.device.type == "cuda" and case.name == "wan"):
            continue  # the reference kernel; ~10 s a forward at 32760 tokens
        case.install(m, AttentionOps(joint=backend.fn, cross=backend.fn))
        timed(f"ours eager {backend.name.value}{' fused' if fused else ''}", case.our_forward,
              lossy=backend.constraints.lossy, exact=exact_out,
              reps=3 if backend.name in ("sdpa_math", "sdpa_efficient") else None)
    # -- ours compiled ----------------------------------------------------------------------------------------------
    by_label = {"default": ("default", False), "reduce-overhead": ("default", True),
                "max-autotune-no-cudagraphs": ("max-autotune", False), "max-autotune": ("max-autotune", True)}
    modes = [by_label[x] for x in args.modes.split(",")] if not args.quick else [("default", False)]
    if bench.device.type != "cuda":
        modes = [("default", False)]
    best_ours = None
    for mode, graphs in modes:
        crt = RuntimeConfig(compile="on", compile_mode=mode, cuda_graphs=graphs, compile_backend=args.compile_backend)
        case.install(m, ops)
        torch._dynamo.reset()
        regional_compile(m, crt, bench.device)
        t0 = time.perf_counter()
        fn = graph_steps(case.our_forward) if graphs else case.our_forward
        try:
            with torch.inference_mode():
                fn()
            bench.sync()
            label = crt.inductor_mode(bench.device) or "default" if args.compile_backend == "inductor" else \
                args.compile_backend
            row = timed(f"ours compiled {label} {auto_joint.name.value}", fn,
                        note=f"(compile+first call {time.perf_counter() - t0:.0f}s)")
            if mode == "default" and not graphs:
                profile(bench, f"{case.name} ours compiled default {auto_joint.name.value}", fn, args)
        except Exception as exc:  # noqa: BLE001
            print(f"  compile {mode} graphs={graphs} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            row = None
        undo_regional_compile(m)
        if row and (best_ours is None or row.seconds < best_ours[0].seconds):
            best_ours = (row, crt)
    if twins and best_ours is not None and bench.left() > 60:
        names = interleaved_backends(best_name, args)
        interleaved(bench, case, twins[:len(names)], names, ops, best_ours[1], ref, args)
    twins = []
    # lossy compiled (reported separately)
    sage = [b for b in usable if b.constraints.lossy]
    if sage and bench.left() > 90 and not args.quick:
        case.install(m, AttentionOps(joint=sage[0].fn, cross=sage[0].fn))
        torch._dynamo.reset()
        regional_compile(m, RuntimeConfig(compile="on", compile_backend=args.compile_backend), bench.device)
        with torch.inference_mode():
            case.our_forward()
        timed(f"ours compiled default {sage[0].name.value} (lossy)", case.our_forward, lossy=True, exact=exact_out)
        undo_regional_compile(m)
    torch._dynamo.reset()
    if extra is not None and best_ours is not None and bench.left() > 60:
        service_steps(bench, case, extra, best_ours[1], args)


def interleaved(bench: Bench, case: ModelCase, twins: list[torch.nn.Module], names: list[str | None],
                ops: AttentionOps, crt: RuntimeConfig, ref: torch.Tensor, args) -> None:
    """The headline rows measured in turns: diffusers with each attention backend of ``names`` (its strongest first,
    then those of ``--interleave-also``; one twin each) and ours (the fastest compiled row), all compiled and
    resident, timed in turns for ``args.interleave`` rounds (the order rotates each round). The rows above run one
    after the other, minutes apart, while the card's power limiter moves its clock (``gpu_clocks``): timed in turns
    every side sees the same clock."""
    sides: list[tuple[str, Callable[[], torch.Tensor]]] = []
    for twin, name in zip(twins, names, strict=True):
        set_diffusers_backend(twin, name)
        twin.compile_repeated_blocks(fullgraph=False, backend=args.compile_backend)
        sides.append((f"diffusers compile_repeated_blocks + {name or 'native'}", case.forward_on(twin)))
    case.install(case.model, ops)
    regional_compile(case.model, crt, bench.device)
    label = (crt.inductor_mode(bench.device) or "default") if args.compile_backend == "inductor" else \
        args.compile_backend
    ours_label = f"ours compiled {label} (graphs={crt.cuda_graphs})"
    sides.append((ours_label, graph_steps(case.our_forward) if crt.cuda_graphs else case.our_forward))
    runs: dict[tuple[str, str], list[float]] = {(side, how): [] for side, _ in sides for how in ("single", "loop")}
    outs = {}
    try:
        with torch.inference_mode():
            for name, fn in sides:
                outs[name] = fn().float()
            with ClockSampler(bench.device.index or 0) as clocks:
                for r in range(args.interleave):
                    for name, fn in sides[r % len(sides):] + sides[:r % len(sides)]:
                        runs[name, "single"] += bench.time_fn(fn, reps=3, warmup=1)
                        runs[name, "loop"] += bench.time_fn(lambda fn=fn: _repeat(fn, LOOP), reps=1, warmup=0)
    finally:
        undo_regional_compile(case.model)
        for twin in twins:
            uncompile_diffusers(twin)
    for how, what in (("single", "one forward a sample"), ("loop", f"{LOOP} forwards back to back a sample")):
        per = {name: statistics.median(runs[name, how]) / (LOOP if how == "loop" else 1) for name, _ in sides}
        ratios = "; ".join(f"ours / {name.removeprefix('diffusers compile_repeated_blocks + ')} "
                           f"{per[name] / per[ours_label]:.3f}x" for name, _ in sides[:-1])
        note = f"{args.interleave} rounds, {what}; {ratios} [{clocks.brief()}]"
        tag = "interleaved" if how == "single" else "interleaved, back to back"
        for name, _ in sides:
            bench.add(Row(case.name, f"{tag}: {name}", per[name], rel_err(outs[name], ref), note=note,
                          runs=runs[name, how]))


def also_backends(args) -> list[str]:
    """``--interleave-also``: further diffusers attention backends timed in the interleaved rounds."""
    return [n for n in args.interleave_also.split(",") if n]


def interleaved_backends(best_name: str | None, args) -> list[str | None]:
    """diffusers' backends in the interleaved rounds: the strongest (None: its default), then ``--interleave-also``'s
    others."""
    return [best_name] + [n for n in also_backends(args) if n != (best_name or "native")]


def graph_steps(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``fn`` as one step of CUDA-graph replays (each call marks a new step, so the previous outputs may be reused)."""
    def step() -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return fn()

    return step


def _repeat(fn: Callable[[], object], n: int) -> None:
    """``fn`` n times, keeping no output (a CUDA-graph replay may reuse an earlier output's memory)."""
    for _ in range(n):
        fn()


LOOP = 3
"""Forwards a sample in the back-to-back interleaved rows: as in a denoising loop, where the host queues the next
forward while the device runs this one (the single-forward rows also time the host's launch of the first kernels)."""


def _qkv_flags(model: torch.nn.Module, on: bool) -> None:
    """Our fused Q/K/V projections off (the separate projections are views of the fused weight, so they compute the
    same thing as separate GEMMs) or back on."""
    for module in model.modules():
        if hasattr(module, "to_qkv") or hasattr(module, "to_kv"):
            module.fused_projections = on


def _gemms_to_cublas(model: torch.nn.Module) -> None:
    """Every layer back on cuBLAS; the QuACK routes kept on the model for ``_gemms_back``."""
    model._chitu_saved_routes = routes(model)
    clear_routes(model)


def _gemms_back(model: torch.nn.Module) -> None:
    for linear, choice in vars(model).pop("_chitu_saved_routes", []):
        route_linear(linear, choice)


ABLATIONS = {
    "QKV": (lambda m: _qkv_flags(m, False), lambda m: _qkv_flags(m, True)),
    "MLP": (unfuse_gelu_epilogues, fuse_gelu_epilogues),
    "norm+rope": (unfuse_norm_rope, fuse_norm_rope),
    "norms": (unfuse_norms, fuse_norms),
    "GEMM": (_gemms_to_cublas, _gemms_back),
}
"""Each fusion, undone and redone: ``--compare ablate`` times ours compiled with every fusion but one."""


def compiled_ablated(bench: Bench, case: ModelCase, model: torch.nn.Module, ops, what: str, label: str, timed,
                     args) -> None:
    """Ours compiled with every fusion except ``what`` (``--compare ablate`` or ``ablate-<what>``): what that one
    fusion is worth on top of the others, where the ``unfused`` rows measure each on top of the ones before it."""
    if not wants(args, "ablate", what):
        return
    undo, redo = ABLATIONS[what]
    undo(model)
    try:
        compiled_row(bench, case, model, ops, f"{label} without {what} (every other fusion on)", timed, args)
    finally:
        redo(model)


def wants(args, kind: str, what: str) -> bool:
    """``--compare`` asks for the ``kind`` row (unfused, ablate) of fusion ``what``: ``kind`` or ``kind-what``."""
    wanted = args.compare.split(",")
    return args.fuse and (kind in wanted or f"{kind}-{what}" in wanted)


def compiled_row(bench: Bench, case: ModelCase, model: torch.nn.Module, ops, label: str, timed, args) -> None:
    """One row: ours compiled (inductor's default mode) with the fusions as they stand, warmed up, then timed."""
    case.install(model, ops)
    torch._dynamo.reset()
    regional_compile(model, RuntimeConfig(compile="on", compile_backend=args.compile_backend), bench.device)
    with torch.inference_mode():
        case.our_forward()
    timed(label, case.our_forward)
    undo_regional_compile(model)


def service_steps(bench: Bench, case: ModelCase, extra: tuple, rt: RuntimeConfig, args) -> None:
    """End-to-end per-step time of the denoiser service (engine -> executor thread -> worker -> runner) vs the bare
    forward of the same compiled model."""
    from denoiser_svc.config import DenoiserServiceConfig, EngineConfig
    from denoiser_svc.engine import DenoiserEngine
    from denoiser_svc.executor import UniProcExecutor
    from denoiser_svc.types import DenoiseJob, StepEvent
    from denoiser_svc.worker import Worker
    from services.config import ModelConfig

    adapter, pipe, ckpt, conds, params = extra
    sizes = [x for x in args.warmup_sizes.split(",") if x]
    rt = dataclasses.replace(rt, warmup_sizes=sizes)
    cfg = DenoiserServiceConfig(model=ModelConfig(checkpoint=str(ckpt), device=str(bench.device),
                                                  dtype="bfloat16" if bench.dtype == torch.bfloat16 else "float32"),
                                runtime=rt)
    worker = Worker(cfg)
    worker.init_device()
    worker.load_model(model=pipe)
    torch._dynamo.reset()
    t0 = time.perf_counter()
    worker.compile_or_warm_up_model(worker.warmup_job())
    print(f"  service start-up (auto + compile + warm-up) {time.perf_counter() - t0:.1f}s: "
          f"{ {k: v for k, v in worker.runtime_facts.items() if 'timings' not in k} }", flush=True)
    bench.facts["service_runtime_facts"] = worker.runtime_facts
    steps = args.service_steps

    async def run() -> list[tuple[int, float, list[float], dict[str, int]]]:
        """Per job: its steps, wall seconds (submit to last event), each step's device seconds and what compiled or
        recorded during it (dynamo/inductor counters). A first job of ``steps`` warms the engine and executor up
        (untimed), then jobs of ``steps`` and ``2 * steps`` twice."""
        from torch._dynamo.utils import counters

        def snapshot() -> dict[str, int]:
            return {f"{group}.{key}": value for group in ("stats", "inductor")
                    for key, value in counters[group].items()}

        executor = UniProcExecutor(cfg)
        executor.worker = worker
        executor._healthy = True
        engine = DenoiserEngine(EngineConfig(), executor)
        await engine.start()
        jobs = []
        runs = [(n, {}) for n in (steps, steps, 2 * steps, steps, 2 * steps)]
        for size in sizes:  # after the timed pairs: one job at each warmed-up size
            w, h, f = parse_size(size, "--warmup-sizes")
            runs.append((steps, {"width": w, "height": h, "frames": f}))
        for i, (n, shape) in enumerate(runs):
            job = DenoiseJob(f"bench-{i}-{n}", params=type(params)(**{**asdict(params), "steps": n, **shape}),
                             conditionings=conds, start_step=0, end_step=n)
            device_s, before = [], snapshot()
            t0 = time.perf_counter()
            async for event in engine.submit(job):
                if isinstance(event, StepEvent):
                    device_s.append(event.seconds)
            wall = time.perf_counter() - t0
            after = snapshot()
            changed = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
            jobs.append((n, wall, device_s, changed))
            if shape:
                print(f"  service job at warmed-up size {shape}: first step {device_s[0] * 1000:.1f} ms, median of "
                      f"the rest {statistics.median(device_s[1:]) * 1000:.2f} ms; compiled/recorded during it: "
                      f"{changed or 'nothing'}", flush=True)
        await engine.stop()
        executor.thread.shutdown()
        return jobs[1:len(jobs) - len(sizes)]

    state = worker.runner.prepare(DenoiseJob("bare", params=params, conditionings=conds, start_step=0, end_step=2))

    def bare_forward() -> float:
        """Seconds a forward, LOOP forwards back to back a sample (as the service's steps run)."""
        with torch.inference_mode():
            return statistics.median(bench.time_fn(lambda: _repeat(lambda: adapter.forward(
                pipe, state, state.latents, 1, "cond"), LOOP))) / LOOP

    # bare forward before and after the service run (the card's clock drifts by a few % over minutes)
    bare_before = bare_forward()
    jobs = asyncio.run(run())
    bare_after = bare_forward()
    bare = (bare_before + bare_after) / 2
    bench.facts["bare_forward_before_after_s"] = [bare_before, bare_after]
    for n, wall, device_s, changed in jobs:
        print(f"  service job of {n} steps: wall {wall:.3f} s, step device seconds first {device_s[0] * 1000:.1f} ms, "
              f"median of the rest {statistics.median(device_s[1:]) * 1000:.2f} ms; compiled/recorded during it: "
              f"{changed or 'nothing'}", flush=True)
    # per pair, the extra steps of the longer job: request set-up, hand-back and any per-job cost cancel out
    pairs = [(jobs[i][1], jobs[i + 1][1]) for i in (0, 2)]
    wall_per_step = statistics.median((long - short) / steps for short, long in pairs)
    per_job = statistics.median(short - steps * wall_per_step for short, _ in pairs)
    device_per_step = statistics.median(s for _, _, device_s, _ in jobs for s in device_s[1:])
    ratio = wall_per_step / bare
    bench.facts["service_jobs"] = [{"steps": n, "wall_s": wall, "step_device_s": device_s, "counters": changed}
                                   for n, wall, device_s, changed in jobs]
    bench.facts["service_wall_per_step_s"] = wall_per_step
    bench.facts["service_per_job_overhead_s"] = per_job
    bench.facts["service_device_per_step_s"] = device_per_step
    bench.facts["bare_forward_s"] = bare
    bench.facts["service_over_bare"] = ratio
    print(f"  service: jobs of {steps} / {2 * steps} steps took {pairs[0][0]:.3f} / {pairs[0][1]:.3f} and "
          f"{pairs[1][0]:.3f} / {pairs[1][1]:.3f} s: wall {wall_per_step * 1000:.2f} ms/step (device "
          f"{device_per_step * 1000:.2f}), {per_job * 1000:.0f} ms a job besides its steps; bare forward "
          f"{bare_before * 1000:.2f} / {bare_after * 1000:.2f} ms before/after -> ratio {ratio:.4f}", flush=True)
    bench.add(Row(case.name, f"service per step (jobs of {steps} and {2 * steps} steps, engine+executor+worker)",
                  wall_per_step, note=f"bare forward {bare * 1000:.2f} ms ({LOOP} back to back); ratio {ratio:.4f}; "
                                      f"{per_job * 1000:.0f} ms a job besides its steps"))


# ------------------------------------------------------------------------------------------------------------------


def summary(bench: Bench) -> list[str]:
    lines = []
    ceiling = bench.facts.get("gemm_ceiling_tflops", float("nan"))
    for model in dict.fromkeys(r.model for r in bench.rows):
        rows = [r for r in bench.rows if r.model == model and not r.variant.startswith("service")]
        base = next((r.seconds for r in rows if r.variant.startswith("diffusers eager (native")), float("nan"))
        diff = [r.seconds for r in rows if r.variant.startswith("diffusers") and not r.lossy]
        strongest = min(diff) if diff else float("nan")
        flops = (bench.facts.get(f"{model}_linear_tflop", 0) + bench.facts.get(f"{model}_attention_tflop", 0)) * 1e12
        floor = bench.facts.get(f"{model}_linear_tflop", 0) * 1e12 / (ceiling * 1e12) + \
            bench.facts.get(f"{model}_attention_floor_s", float("nan"))
        bench.facts[f"{model}_floor_s"] = floor
        lines.append(f"\n{model}: floor {floor * 1000:.1f} ms (linear {bench.facts.get(f'{model}_linear_tflop', 0):.1f}"
                     f" TFLOP at {ceiling:.0f} TFLOP/s + attention at the fastest exact kernel)")
        lines.append("| variant | median ms | vs diffusers eager | vs strongest diffusers | TFLOP/s | of GEMM ceiling | "
                     "of floor | rel err vs math ref | PSNR (lossy) |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for r in sorted(rows, key=lambda r: (r.lossy, r.variant.startswith("ours"), -r.seconds)):
            tf = flops / r.seconds / 1e12
            lines.append(f"| {r.variant}{' (lossy)' if r.lossy and 'lossy' not in r.variant else ''} | "
                         f"{r.seconds * 1000:.1f} | {base / r.seconds:.3f}x | {strongest / r.seconds:.3f}x | {tf:.0f} | "
                         f"{tf / ceiling:.1%} | {floor / r.seconds:.1%} | {r.rel_err:.2e} | "
                         f"{f'{r.psnr:.1f} dB' if r.lossy else ''} |")
        for r in bench.rows:
            if r.model == model and r.variant.startswith("service"):
                lines.append(f"\n{model} {r.variant}: {r.seconds * 1000:.2f} ms/step; {r.note}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke run; CI)")
    ap.add_argument("--models", default="flux,wan")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=520, help="skip remaining variants after this many seconds")
    ap.add_argument("--quick", action="store_true", help="only the default compile mode")
    ap.add_argument("--no-fuse", dest="fuse", action="store_false", help="ours without fused QKV projections and MLPs")
    ap.add_argument("--service-steps", type=int, default=12)
    ap.add_argument("--warmup-sizes", default="", help="comma-separated WxH[xF] for the service worker's "
                    "runtime.warmup_sizes; after the timed jobs one job runs at each (its first step must not compile)")
    ap.add_argument("--profile", action="store_true", help="write the top kernels of compiled forwards to OUT")
    ap.add_argument("--compare", default="eager,unfused", help="extra rows: eager (ours eager per backend), "
                    "unfused (ours compiled without fused QKV, then fused QKV without the fused MLP, then without the fused "
                    "q/k norm + rotation, then without the fused residual + norms), or one of them: unfused-QKV, "
                    "unfused-MLP, unfused-norm+rope, unfused-norms; ablate (ours compiled with every fusion but one, "
                    "for each) or ablate-QKV, ablate-MLP, ablate-norm+rope, ablate-norms, ablate-GEMM, ablate-merge "
                    "(Wan with --merge: the cross-attention without merging repeated keys)")
    ap.add_argument("--interleave", type=int, default=0, help="rounds of the interleaved pair: diffusers' strongest "
                    "configuration (on a copy of the model) and ours timed in turns (0: off)")
    ap.add_argument("--interleave-also", default="", help="comma-separated diffusers attention backends (e.g. "
                    "_native_cudnn) also compiled and timed in the interleaved rounds, each on its own copy of the "
                    "model: ours against diffusers' strongest and against these, at one clock")
    ap.add_argument("--wan-reps", type=int, default=5)
    ap.add_argument("--wan-prompt-tokens", type=int, default=0, help="Wan's text: this many random rows, then zero "
                    "rows up to 512 (as WanPipeline pads a prompt); 0: 512 random rows (no padding)")
    ap.add_argument("--merge", action="store_true", help="ours merging repeated cross-attention keys "
                    "(runtime.merge_repeated_keys: true; off by default, as in the runtime)")
    ap.add_argument("--merged-config", default="", help="the merged-key kernel's BLOCK_M,BLOCK_N,warps,stages "
                    "(default: services.attention.repeated_keys.kernel_config)")
    ap.add_argument("--gemm", default="auto", choices=("auto", "cublas", "quack"),
                    help="runtime.gemm_backend for ours (services.gemm)")
    ap.add_argument("--modes", default="default,reduce-overhead,max-autotune-no-cudagraphs",
                    help="inductor modes of ours compiled, in order")
    ap.add_argument("--compile-backend", default="", help="torch.compile backend (default: inductor on CUDA, "
                    "aot_eager on the CPU, which traces without a C++ toolchain)")
    ap.add_argument("--results", default=None, help="markdown file the rows are appended to ('' = none; default: "
                    "benchmarks/RESULTS.md on a GPU, none for --tiny, whose numbers mean nothing)")
    ap.add_argument("--out", default="", help="folder for single_gpu.json")
    args = ap.parse_args(argv)
    if args.results is None:
        args.results = "" if args.tiny else str(Path(__file__).with_name("RESULTS.md"))
    args.merged_config = tuple(int(x) for x in args.merged_config.split(",")) if args.merged_config else None
    device = torch.device(args.device)
    args.compile_backend = args.compile_backend or ("inductor" if device.type == "cuda" else "aot_eager")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    bench = Bench(device, dtype, args.reps if not args.tiny else 3, time.perf_counter() + args.budget_s, out_dir)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    bench.facts.update(card=card, torch=torch.__version__, date=datetime.date.today().isoformat(), tiny=args.tiny)
    bench.facts["gemm_ceiling_tflops"] = gemm_ceiling(bench)
    print(f"{card}; torch {torch.__version__}; GEMM ceiling {bench.facts['gemm_ceiling_tflops']:.0f} TFLOP/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name not in ("flux", "wan"):
                raise SystemExit(f"unknown model {name!r}; choose from flux, wan")
            try:
                if name == "flux":
                    case, extra = flux_case(bench, args.tiny, Path(tmp))
                else:
                    case, extra = wan_case(bench, args.tiny, args.wan_prompt_tokens), None
                run_case(bench, case, False, extra, args)
            except Exception:  # noqa: BLE001 - the other model still runs; the failure is in the log
                if args.tiny:
                    raise
                traceback.print_exc()
            case = extra = None
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()
    lines = summary(bench)
    bench.save()
    header = (f"\n## {bench.facts['date']} · {card} · torch {torch.__version__}"
              f"{' · tiny CPU smoke run' if args.tiny else ''}\n\nGEMM ceiling (bf16 8192^3, measured): "
              f"{bench.facts['gemm_ceiling_tflops']:.0f} TFLOP/s.")
    text = header + "\n" + "\n".join(lines) + "\n"
    print(text, flush=True)
    if args.results:
        with open(args.results, "a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
