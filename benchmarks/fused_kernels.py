"""The hand-written elementwise kernels against inductor's fusion of the same ops, at the real models' shapes, on one
GPU: the residual + layer norm + modulation kernel (``services.ada_norm``) and the q/k RMS norm + rotary kernel
(``services.norm_rope``), each over a sweep of its launch configs (rows a program x warps), in microseconds a call
and achieved TB/s (bytes that must move: every input read once, every output written once).

The baseline for each row is the model's own ops (diffusers' Wan / Flux block code for that step) compiled by
``torch.compile`` (default mode): what a regionally compiled diffusers block runs. ``kernel_config`` in each module
holds the configs this benchmark found fastest.

    python benchmarks/fused_kernels.py [--reps 30] [--only ada,rope,compiled]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services import ada_norm, norm_rope  # noqa: E402
from services.attention.autotune import _timer  # noqa: E402

DEV = torch.device("cuda")
BF16 = torch.bfloat16
CALLS = 10  # calls a timed sample (short kernels: one event pair per call would time the launch gaps)


HOST_COVER_CYCLES = 60_000_000
"""~30 ms of ``torch.cuda._sleep`` queued before each sample: the launcher of a Triton kernel called from Python
costs tens of microseconds of host time a call, more than these kernels run;
inside a compiled block inductor launches them and the host runs ahead of the device. Measured on an H200: with ~1 ms
of cover, CALLS calls of our kernels timed the host (0.1-0.9 ms a call)."""


def _us(fn: Callable[[], object], reps: int) -> float:
    """Median device microseconds a call over samples of CALLS back-to-back calls."""

    def many():
        for _ in range(CALLS):
            fn()

    for _ in range(3):
        many()
    timer = _timer(DEV, HOST_COVER_CYCLES)
    return statistics.median(timer(many) for _ in range(reps)) * 1000 / CALLS


def _randn(*shape, dtype=BF16, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator(DEV).manual_seed(seed), device=DEV).to(dtype)


def _report(name: str, nbytes: int, baseline_us: float, rows: list[tuple[str, float]]) -> None:
    print(f"| {name} | inductor (model ops, compiled) | {baseline_us:.1f} | {nbytes / baseline_us / 1e6:.2f} | 1.00x |")
    best = min(rows, key=lambda r: r[1])
    for label, us in rows:
        mark = " **best**" if (label, us) == best else ""
        print(f"| {name} | {label}{mark} | {us:.1f} | {nbytes / us / 1e6:.2f} | {baseline_us / us:.2f}x |", flush=True)


def ada_cases():
    """name -> (inductor fn, our launch for a config (None: the default), bytes, configs) for each block step."""
    launch = ada_norm.register_cuda_kernel()
    out = {}
    # Wan2.1-1.3B at 480p x 81f: 32760 tokens x 1536, float32 modulation vectors [B, 1, D]
    s, d = 32760, 1536
    h, y = _randn(1, s, d, seed=1), _randn(1, s, d, seed=2)
    shift, scale, gate = (_randn(1, 6, d, dtype=torch.float32, seed=3) * 0.3).chunk(6, dim=1)[:3]
    w, b = _randn(d, seed=4), _randn(d, seed=5)
    tensor = s * d * 2

    def wan_norm1(h=h, d=d):
        return (F.layer_norm(h.float(), (d,), eps=1e-6) * (1 + scale) + shift).type_as(h)

    def wan_norm2(h=h, y=y, d=d):
        h2 = (h.float() + y * gate).type_as(h)
        return h2, F.layer_norm(h2.float(), (d,), w.float(), b.float(), 1e-6).type_as(h)

    def wan_norm3(h=h, y=y, d=d):
        h2 = h + y
        return h2, (F.layer_norm(h2.float(), (d,), eps=1e-6) * (1 + scale) + shift).type_as(h)

    hout, o = torch.empty_like(h), torch.empty_like(h)
    cfgs = ada_norm.KERNEL_CONFIGS
    out["wan norm1 + modulation"] = (wan_norm1, lambda c: launch(h, None, None, None, None, scale, shift, 1e-6, None,
                                                                 o, config=c), 2 * tensor, cfgs)
    out["wan gated residual + norm2 (affine)"] = (
        wan_norm2, lambda c: launch(h, y, gate, w, b, None, None, 1e-6, hout, o, config=c), 4 * tensor, cfgs)
    out["wan residual + norm3 + modulation"] = (
        wan_norm3, lambda c: launch(h, y, None, None, None, scale, shift, 1e-6, hout, o, config=c), 4 * tensor, cfgs)

    # Flux.1-dev at 1024^2: 4096 image + 512 text tokens x 3072, bf16 modulation vectors [B, D] (stride 6 D)
    n_img, n_txt, fd = 4096, 512, 3072
    img, yi, txt = _randn(1, n_img, fd, seed=6), _randn(1, n_img, fd, seed=7), _randn(1, n_txt, fd, seed=8)
    fshift, fscale, fgate = _randn(1, 6 * fd, seed=9).chunk(6, dim=1)[:3]
    fi_h, fi_o = torch.empty_like(img), torch.empty_like(img)
    fs_o = torch.empty(1, n_txt + n_img, fd, device=DEV, dtype=BF16)

    def flux_norm2(h=img, y=yi):
        h2 = h + fgate.unsqueeze(1) * y
        return h2, F.layer_norm(h2, (fd,), eps=1e-6) * (1 + fscale[:, None]) + fshift[:, None]

    def flux_single_norm(t=txt, i=img):
        return F.layer_norm(torch.cat([t, i], dim=1), (fd,), eps=1e-6) * (1 + fscale[:, None]) + fshift[:, None]

    def flux_single_ours(c):
        launch(txt, None, None, None, None, fscale[:, None], fshift[:, None], 1e-6, None, fs_o, config=c)
        launch(img, None, None, None, None, fscale[:, None], fshift[:, None], 1e-6, None, fs_o, row_off=n_txt, config=c)

    t_img = n_img * fd * 2
    out["flux gated residual + norm2 + modulation (image)"] = (
        flux_norm2, lambda c: launch(img, yi, fgate[:, None], None, None, fscale[:, None], fshift[:, None], 1e-6, fi_h,
                                     fi_o, config=c), 4 * t_img, cfgs)
    out["flux single-stream norm + modulation (text + image)"] = (flux_single_norm, flux_single_ours,
                                                                  2 * (n_img + n_txt) * fd * 2, cfgs)
    return out


def rope_cases():
    launch = norm_rope.register_cuda_kernel()
    out = {}
    # Wan: q as the fused QKV GEMM leaves it ([1, S, 3 x 1536] rows), RMS norm across all 12 heads, [S, 128] tables
    s, h, d = 32760, 12, 128
    q = _randn(1, s, 3 * h * d, seed=10)[..., : h * d]
    wq = _randn(h * d, seed=11)
    ang = torch.rand(s, d // 2, device=DEV).repeat_interleave(2, -1) * 6
    cos, sin = ang.cos(), ang.sin()
    o = torch.empty(1, s, h, d, device=DEV, dtype=BF16)

    def wan_ops(x=q):
        x = F.rms_norm(x.float(), (h * d,), wq.float(), 1e-6).type_as(x).unflatten(2, (h, d))
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        c, sn = cos[None, :, None, 0::2], sin[None, :, None, 1::2]
        r = torch.empty_like(x)
        r[..., 0::2] = x1 * c - x2 * sn
        r[..., 1::2] = x1 * sn + x2 * c
        return r.type_as(x)

    out["wan q norm (all heads) + rotary"] = (
        wan_ops, lambda c: launch(q.unflatten(2, (h, d)), wq, cos, sin, o, 0, 1e-6, False, config=c),
        2 * s * h * d * 2 + 2 * s * d * 4, norm_rope.KERNEL_CONFIGS)

    # Flux single-stream: 4608 tokens x 24 heads x 128, per-head RMS norm
    fs, fh = 4608, 24
    qf = _randn(1, fs, 3 * fh * d, seed=12)[..., : fh * d].unflatten(2, (fh, d))
    wf = _randn(d, seed=13)
    ang = torch.rand(fs, d // 2, device=DEV).repeat_interleave(2, -1) * 6
    cf, sf = ang.cos(), ang.sin()
    of = torch.empty(1, fs, fh, d, device=DEV, dtype=BF16)

    def flux_ops(x=qf):
        x = F.rms_norm(x.float(), (d,), wf.float(), 1e-6).type_as(x)
        xr, xi = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        rot = torch.stack([-xi, xr], dim=-1).flatten(3)
        return (x.float() * cf[None, :, None] + rot * sf[None, :, None]).type_as(x)

    out["flux q norm (per head) + rotary"] = (
        flux_ops, lambda c: launch(qf, wf, cf, sf, of, 0, 1e-6, True, config=c), 2 * fs * fh * d * 2 + 2 * fs * d * 4,
        norm_rope.KERNEL_CONFIGS)
    return out


def compiled_cases():
    """Our ops as a compiled block calls them (``torch.compile`` of the public functions), the input tensor a graph
    input or a tensor made inside the graph: does the kernel keep its isolated speed inside inductor's code?"""
    s, d = 32760, 1536
    h, y = _randn(1, s, d, seed=1), _randn(1, s, d, seed=2)
    shift, scale, gate = (_randn(1, 6, d, dtype=torch.float32, seed=3) * 0.3).chunk(6, dim=1)[:3]
    plain = torch.nn.LayerNorm(d, 1e-6, elementwise_affine=False, device=DEV, dtype=BF16)
    q = _randn(1, s, 3 * 12 * 128, seed=10)[..., : 12 * 128].unflatten(2, (12, 128))
    rms = torch.nn.RMSNorm(12 * 128, eps=1e-6, device=DEV, dtype=BF16)
    ang = torch.rand(s, 64, device=DEV).repeat_interleave(2, -1) * 6
    rope = (ang.cos(), ang.sin())

    def norm3(h, y):
        return ada_norm.add_norm_modulate(h, y, None, plain, scale, shift)

    def norm3_inner(h, y):
        return ada_norm.add_norm_modulate(h * 1.0, y * 1.0, None, plain, scale, shift)

    def rope_q(q):
        return norm_rope.norm_rope(q, rms, rope)

    eager3 = _us(lambda: norm3(h, y), 15)
    rows = [("wan residual + norm3 + modulation", "eager op", eager3, 4 * s * d * 2)]
    c3, c3i = torch.compile(norm3), torch.compile(norm3_inner)
    rows.append(("wan residual + norm3 + modulation", "compiled, inputs from outside", _us(lambda: c3(h, y), 15),
                 4 * s * d * 2))
    copies = torch.compile(lambda h, y: (h * 1.0, y * 1.0))
    inner = _us(lambda: c3i(h, y), 15) - _us(lambda: copies(h, y), 15)
    rows.append(("wan residual + norm3 + modulation", "compiled, inputs made inside (minus the 2 copies)", inner,
                 4 * s * d * 2))
    rows.append(("wan q norm + rotary", "eager op", _us(lambda: rope_q(q), 15), 2 * s * d * 2 + 2 * s * 128 * 4))
    cq = torch.compile(rope_q)
    rows.append(("wan q norm + rotary", "compiled", _us(lambda: cq(q), 15), 2 * s * d * 2 + 2 * s * 128 * 4))
    for name, label, us, nbytes in rows:
        print(f"| {name} | ours, {label} | {us:.1f} | {nbytes / us / 1e6:.2f} | - |", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--only", default="ada,rope,compiled")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name(DEV)} · torch {torch.__version__}")
    print("| step | kernel | us / call | TB/s | vs inductor |")
    print("|---|---|---|---|---|")
    cases = {}
    if "ada" in args.only:
        cases.update(ada_cases())
    if "rope" in args.only:
        cases.update(rope_cases())
    if "compiled" in args.only:
        with torch.inference_mode():
            compiled_cases()
    with torch.inference_mode():
        for name, (model_ops, ours, nbytes, configs) in cases.items():
            baseline = _us(torch.compile(model_ops), args.reps)
            rows = [("ours (kernel_config)", _us(lambda f=ours: f(None), args.reps))]
            for cfg in configs:
                try:
                    rows.append((f"ours {cfg[0]} rows x {cfg[1]} warps", _us(lambda c=cfg, f=ours: f(c), args.reps)))
                except Exception as exc:  # noqa: BLE001 - a config that does not launch (registers): go on
                    print(f"  {name} {cfg}: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
            _report(name, nbytes, baseline, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
