"""Attention kernels at the real models' shapes, on one GPU: every usable backend of the registry (what ``auto``
measures at start-up), in TFLOP/s, with its error against the float32 math kernel.

Shapes (batch 1, bf16): Flux.1-dev 1024^2 joint attention 4608 x 24 x 128; Wan2.1-1.3B 480p x 81f self-attention
32760 x 12 x 128 and its cross-attention 32760 -> 512. ``--layouts`` also times cuDNN on contiguous ``[B, H, S, D]``
inputs (the registry passes ``[B, S, H, D]`` tensors as transposed views), with the copies that layout needs;
``--fa4-tiles`` times FlashAttention-4 with other tile shapes than its own heuristic; ``--packed`` times the exact
kernels with v (or q, k and v) as views of one fused QKV projection output, as the model blocks hand them over;
``--sustained S`` calls FA4 / cuDNN back to back for S seconds (as inside a forward) against the covered timing,
with the SM clock and power (with ``--fa4-tiles``: every tile shape that way). ``--merged`` times the cross-attention
over merged repeated keys (``services.attention.repeated_keys``: Wan's zero-padded prompts) at several prompt lengths,
its detection pass, and the kernel's launch configs (rows at the full 512 keys compare it with the backends above).

    python benchmarks/attention_kernels.py [--shapes flux,wan,wan-cross] [--reps 20] [--layouts] [--fa4-tiles]
        [--packed] [--sustained 3] [--merged]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.attention.autotune import CallShape, _inputs, _timer, measure  # noqa: E402

SHAPES = {
    "flux": CallShape("joint", (1, 4608, 24, 128), (1, 4608, 24, 128), torch.bfloat16, False),
    "wan": CallShape("joint", (1, 32760, 12, 128), (1, 32760, 12, 128), torch.bfloat16, False),
    "wan-cross": CallShape("cross", (1, 32760, 12, 128), (1, 512, 12, 128), torch.bfloat16, False),
}


def flop(shape: CallShape) -> float:
    b, sq, h, d = shape.q
    return 4.0 * b * h * sq * shape.k[1] * d


def _time_ms(call, reps: int) -> float:
    """Median device time of ``call``, timed as ``auto`` times kernels (host launch work covered)."""
    timer = _timer(torch.device("cuda"))
    for _ in range(3):
        call()
    return statistics.median(timer(call) for _ in range(reps))


def _bshd_inputs(shape: CallShape):
    """``[B, S, H, D]`` q, k, v as ``auto`` measures them."""
    return _inputs(shape, torch.device("cuda"), seed=0)[:3]


def layout_rows(shape: CallShape, reps: int) -> list[tuple[str, float]]:
    """cuDNN attention with its inputs in other memory layouts, each timed with the copies it needs so that the
    caller gets ``[B, S, H*D]`` rows for the output projection (what a model block does next)."""
    q, k, v = _bshd_inputs(shape)
    b, s, h, d = shape.q
    cudnn = torch.ops.aten._scaled_dot_product_cudnn_attention
    qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # [B, H, S, D] contiguous

    def heads_major():  # inputs [B, H, S, D] contiguous; the output comes back in q's layout: one copy to rows
        return cudnn(qh, kh, vh, None, False, 0.0, False, False)[0].transpose(1, 2).reshape(b, s, h * d)

    def qk_heads_major():  # q, k [B, H, S, D] contiguous, v a [B, S, H, D] view
        return cudnn(qh, kh, v.transpose(1, 2), None, False, 0.0, False, False)[0].transpose(1, 2).reshape(b, s,
                                                                                                       h * d)

    def rows_major():  # the registry's call: [B, S, H, D] tensors as transposed views, output in q's layout
        return cudnn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, False, 0.0, False,
                     False)[0].transpose(1, 2).reshape(b, s, h * d)

    return [("sdpa_cudnn, [B,S,H,D] views (registry)", _time_ms(rows_major, reps)),
            ("sdpa_cudnn, q/k/v [B,H,S,D] contiguous, + output to rows", _time_ms(heads_major, reps)),
            ("sdpa_cudnn, q/k [B,H,S,D], v view, + output to rows", _time_ms(qk_heads_major, reps))]


def packed_rows(shape: CallShape, reps: int, sustained: float = 0.0, rounds: int = 3) -> list[tuple[str, float]]:
    """The exact kernels with their inputs as the blocks hand them over: q and k fresh tensors (the norm + rotary
    kernel writes them), v a view of the fused QKV output (token rows strided by 3 x H x D); and all three views.
    With ``sustained`` seconds, each layout is also run back to back that long, the layouts alternating, ``rounds``
    times (the median per layout): at the power cap, as inside a forward."""
    from services.attention.backends import AttentionSpec, BackendName, usable_backends

    q, k, v = _bshd_inputs(shape)
    # one GEMM's output, [B, S, 3, H, D] (self-attention's QKV) or [B, S_text, 2, H, D] (cross-attention's KV)
    packed = torch.stack([q, k, v] if shape.kind == "joint" else [k, v], dim=2)
    *qv, kv, vv = packed.unbind(2)
    spec = AttentionSpec.for_device(q.device, q.dtype, q.shape[-1])
    rows = []
    for backend in usable_backends(spec):
        if backend.name not in (BackendName.FLASH_ATTN4, BackendName.SDPA_CUDNN):
            continue
        cases = {"q, k, v contiguous": (q, k, v), "v a packed view": (q, k, vv)}
        cases["q, k, v packed views" if qv else "k, v packed views"] = (qv[0] if qv else q, kv, vv)
        calls = {label: (lambda a=a, bb=bb, c=c, fn=backend.fn: fn(a, bb, c, None))
                 for label, (a, bb, c) in cases.items()}
        for label, call in calls.items():
            rows.append((f"{backend.name.value}, {label}", _time_ms(call, reps)))
        if sustained:
            for label, (ms, _) in sustained_rounds(calls, sustained, rounds).items():
                rows.append((f"{backend.name.value}, {label}, sustained {sustained:g} s x {rounds} rounds "
                             f"({', '.join(f'{x:.3f}' for x in ms)})", statistics.median(ms)))
    return rows


FA4_TILES = [((128, 128), True, True), ((128, 128), False, True), ((128, 144), True, True), ((128, 160), True, True),
             ((128, 176), True, True), ((128, 176), False, True), ((128, 192), True, True), ((128, 112), True, True),
             ((192, 128), False, True), ((128, 96), True, True)]


def fa4_tile_rows(shape: CallShape, reps: int, sustained: float = 0.0, rounds: int = 3) -> list[tuple[str, float]]:
    """FlashAttention-4's forward with other tile shapes than its SM90 heuristic (128 x 128, RS, overlap), timed
    covered (idle before each call: boost clocks); with ``sustained`` seconds each tile is also run back to back
    that long (the card at its power cap, as inside a forward: a tile that moves fewer bytes a FLOP may clock higher
    there), in ``rounds`` rounds over all tiles (the card's clock drifts over a minute; the median per tile)."""
    from flash_attn.cute.interface import _flash_attn_fwd

    q, k, v = _bshd_inputs(shape)
    ref = _flash_attn_fwd(q, k, v)[0]
    rows, calls = [], {}
    for tile, rs, overlap in FA4_TILES:
        label = f"flash_attn4 tile {tile[0]}x{tile[1]}{' RS' if rs else ''}{' OL' if overlap else ''}"
        try:
            def call(tile=tile, rs=rs, overlap=overlap):
                return _flash_attn_fwd(q, k, v, tile_mn=tile, mma_pv_is_rs=rs, intra_wg_overlap=overlap)[0]

            err = float((call().float() - ref.float()).norm() / ref.float().norm())
            if err > 1e-2:
                raise ValueError(f"differs from the default tile by {err:.1e}")
            rows.append((label, _time_ms(call, reps)))
            calls[label] = call
        except Exception as exc:  # noqa: BLE001 - infeasible tiles fail to compile; report and go on
            print(f"  {label}: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}",
                  flush=True)
    if sustained:
        for label, (runs, clocks) in sustained_rounds(calls, sustained, rounds, alternate=False).items():
            rows.append((f"{label}, sustained {sustained:g} s x {rounds} rounds "
                         f"({', '.join(f'{r:.3f}' for r in runs)}) [{clocks}]", statistics.median(runs)))
    return rows


def _sustained_ms(call, seconds: float):
    """Per-call milliseconds of ``call`` run back to back for ``seconds`` (no idle time between calls, as inside a
    long forward; the median of the second half), and the clock sampler that watched it."""
    from benchmarks.gpu_clocks import ClockSampler

    ms = []
    with ClockSampler(torch.cuda.current_device()) as clocks:
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(11)]
            ends[0].record()
            for e in ends[1:]:
                call()
                e.record()
            ends[-1].synchronize()
            ms += [a.elapsed_time(b) for a, b in zip(ends, ends[1:], strict=False)]
    return statistics.median(ms[len(ms) // 2:]), clocks


def sustained_rounds(calls: dict[str, Callable[[], object]], seconds: float, rounds: int = 3,
                     alternate: bool = True) -> dict[str, tuple[list[float], str]]:
    """Each call run back to back for ``seconds`` (``_sustained_ms``), the calls in turn, ``rounds`` times (with
    ``alternate`` the order flips every other round, so no call always follows the same one); per call its ms a call
    in each round and the clocks of its last round."""
    out: dict[str, tuple[list[float], str]] = {label: ([], "") for label in calls}
    for r in range(rounds):
        order = list(calls) if r % 2 == 0 or not alternate else list(calls)[::-1]
        for label in order:
            ms, sampler = _sustained_ms(calls[label], seconds)
            out[label] = (out[label][0] + [ms], sampler.brief())
    return out


def sustained_rows(shape: CallShape, seconds: float) -> list[tuple[str, float]]:
    """FlashAttention-4 (where installed) and cuDNN called back to back for ``seconds``, against the covered timing
    (``_time_ms``: the device idles ~30 ms before each call), with the SM clock and power over each."""
    from benchmarks.gpu_clocks import ClockSampler
    from services.attention.backends import AttentionSpec, BackendName, usable_backends

    q, k, v = _bshd_inputs(shape)
    spec = AttentionSpec.for_device(q.device, q.dtype, q.shape[-1])
    rows = []
    for backend in usable_backends(spec):
        if backend.name not in (BackendName.FLASH_ATTN4, BackendName.SDPA_CUDNN):
            continue

        def call(fn=backend.fn):
            return fn(q, k, v, None)

        with ClockSampler(torch.cuda.current_device()) as idle_clocks:
            covered = _time_ms(call, 10)
        busy, busy_clocks = _sustained_ms(call, seconds)
        print(f"  {backend.name.value} covered: {idle_clocks.summary()}", flush=True)
        print(f"  {backend.name.value} sustained {seconds:.0f} s: {busy_clocks.summary()}", flush=True)
        rows.append((f"{backend.name.value}, covered (idle before each call)", covered))
        rows.append((f"{backend.name.value}, sustained {seconds:.0f} s back to back (2nd half)", busy))
    return rows


MERGED_CONFIGS = [(bm, bn, w, st) for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8) for st in (2, 3, 4)]


def merged_rows(shape: CallShape, reps: int, tokens: tuple[int, ...] = (512, 256, 120, 30)) -> list[tuple[str, float]]:
    """The merged-key kernel with keys padded after ``tokens`` real rows (512: no padding, plain attention over all
    keys): its default config, then every config of ``MERGED_CONFIGS`` at 512 and 120 tokens (the fastest three
    printed), and the detection pass ``trailing_repeats``. Each config's output is checked against float32 attention
    over all keys (a config that errs or exceeds 1e-2 is reported, not timed)."""
    from services.attention.repeated_keys import kernel_config, register_cuda_kernel, trailing_repeats

    launch = register_cuda_kernel()
    q, k0, v0 = _bshd_inputs(shape)
    rows = []
    by_config: dict[tuple, dict[int, float]] = {}
    for n in tokens:
        k, v = k0.clone(), v0.clone()
        if n < k.shape[1]:
            k[:, n:], v[:, n:] = k[:, n], v[:, n]
        keep, log_count = trailing_repeats(k, v)
        ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v)))
        ref = ref.transpose(1, 2)
        out = torch.empty_like(q)
        timed = []
        for cfg in [kernel_config(shape.q[-1])] + (MERGED_CONFIGS if n in (512, 120) else []):
            try:
                launch(q, k, v, keep, log_count, out, cfg)
                err = float((out.float() - ref).norm() / ref.norm())
                if err > 1e-2:
                    print(f"  merged {n} tokens config {cfg}: rel err {err:.2e}, not timed", flush=True)
                    continue
                timed.append((_time_ms(functools.partial(launch, q, k, v, keep, log_count, out, cfg), reps), cfg, err))
            except Exception as exc:  # noqa: BLE001 - a config that does not fit (shared memory) is reported
                print(f"  merged {n} tokens config {cfg}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        if not timed:
            continue
        for ms, cfg, _ in timed:
            by_config.setdefault(cfg, {})[n] = ms
        ms, cfg, err = timed[0]
        rows.append((f"merged keys, {n}-token prompt (keep {int(keep[0])}), default {cfg}, err {err:.1e}", ms))
        for ms, cfg, err in sorted(timed[1:])[:3]:
            rows.append((f"merged keys, {n}-token prompt, config {cfg}, err {err:.1e}", ms))
        if n == tokens[0]:
            rows.append(("merged keys: detection pass (trailing_repeats)",
                         _time_ms(functools.partial(trailing_repeats, k, v), reps)))
    both = {cfg: t[512] + t[120] for cfg, t in by_config.items() if 512 in t and 120 in t}
    if both:  # the config fastest over a full (512) and a typical (120-token) prompt together
        best = min(both, key=both.get)
        print(f"MERGED_BEST {','.join(map(str, best))} ({by_config[best][512]:.3f} ms at 512 keys, "
              f"{by_config[best][120]:.3f} ms at 121)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="flux,wan,wan-cross")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--layouts", action="store_true", help="cuDNN with other input memory layouts")
    ap.add_argument("--fa4-tiles", action="store_true", help="FlashAttention-4 with other tile shapes")
    ap.add_argument("--packed", action="store_true", help="exact kernels with inputs as views of a fused QKV output")
    ap.add_argument("--sustained", type=float, default=0.0, help="seconds of back-to-back calls of FA4 / cuDNN, "
                    "with the SM clock and power (0: off)")
    ap.add_argument("--merged", action="store_true", help="cross-attention over merged repeated (padded) keys")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)} · torch {torch.__version__}")
    print("| shape | backend | ms / call | TFLOP/s | rel err vs fp32 math | status |")
    print("|---|---|---|---|---|---|")
    for key in args.shapes.split(","):
        shape = SHAPES[key]
        for m in measure({shape: 1}, dev, reps=args.reps):
            if m.kind != shape.kind or m.status.startswith("unusable"):
                continue
            tf = flop(shape) / (m.ms_per_forward * 1e-3) / 1e12 if m.ok else float("nan")
            print(f"| {key} | {m.backend.value}{' (lossy)' if m.lossy else ''} | {m.ms_per_forward:.3f} | {tf:.0f} | "
                  f"{m.rel_err:.2e} | {m.status} |", flush=True)
        extra = layout_rows(shape, args.reps) if args.layouts else []
        if args.packed:
            extra += packed_rows(shape, args.reps, args.sustained)
        if args.sustained and not args.fa4_tiles and not args.packed:
            extra += sustained_rows(shape, args.sustained)
        if args.fa4_tiles and shape.kind == "joint":
            extra += fa4_tile_rows(shape, args.reps, args.sustained)
        if args.merged and shape.kind == "cross":
            extra += merged_rows(shape, args.reps)
        for label, ms in extra:
            print(f"| {key} | {label} | {ms:.3f} | {flop(shape) / ms / 1e9:.0f} | - | ok |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
