"""cuBLAS vs QuACK's CuTe-DSL GEMMs (``quack-kernels``, shipped with FlashAttention-4) at the Flux.1-dev / Wan2.1
block shapes, on one Hopper GPU: can a persistent GEMM with its epilogue overlapped with the next tile's main loop
take the tanh-GELU, the gated residual of Wan's FFN, or a strided output at no cost?

Why: cuBLASLt's GELU epilogue costs 3-6 % over its plain GEMM at these shapes (Wan up-projection 1247 vs 1174 us,
``gemm_shapes.py``), ~1.5 ms of a Flux forward and ~2 ms of a Wan forward; it cannot write a strided column slice at
speed, which is what one K=15360 output projection of Flux's single blocks needs; Wan's FFN ends in
``h + gate * (x W^T + b)``, a 300 MB elementwise pass a block after the GEMM.

Every row is timed as ``gemm_shapes.py`` times (covered: idle before each sample, so rates read above the forwards'
power-capped ones; compare rows with each other). QuACK rows name their tile configuration (``pp``: ping-pong, two
consumer warp groups alternating main loop and epilogue; ``coop``: cooperative); each prints its relative
difference from the cuBLAS result (both accumulate in float32; bf16 rounding of the output: ~4e-3).

    PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:. python benchmarks/quack_gemms.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gemm_shapes import BF16, Timer, _gelu_linear, _linear, _randn  # noqa: E402

CONFIGS = {  # name: (tile_m, tile_n, pingpong, cluster_m, cluster_n)
    "pp128x192c21": (128, 192, True, 2, 1),
    "pp128x208c21": (128, 208, True, 2, 1),
    "pp128x160c12": (128, 160, True, 1, 2),
    "coop256x128c21": (256, 128, False, 2, 1),
    "coop256x192c21": (256, 192, False, 2, 1),
    "coop128x256c21": (128, 256, False, 2, 1),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--tuned", action="store_true", help="also QuACK's own autotuner (slow: ~44 compiles a kind)")
    ap.add_argument("--sustained", type=float, default=0.0, help="only the sustained rows: cuBLAS vs QuACK's "
                    "chosen configuration back to back for this many seconds each, in 3 rounds (the power cap)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    from quack.gemm_interface import gemm_add_inplace

    from services.gemm import quack_epilogues, quack_gemm_config, residual_pass

    # the epilogues services.gemm runs (QuACK's own gemm_act fails to fingerprint the activation under CuTe DSL
    # 4.8.1: "epilogue fn depends on <ContextVar _LOC_TRANSFORMS>")
    mods = quack_epilogues()
    bias_gelu, bias_only, gated_residual = mods["bias_gelu"], mods["bias"], mods["gated_residual"]

    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)} · torch {torch.__version__}", flush=True)
    warm = _randn(8192, 8192, seed=59, dev=dev)
    for _ in range(300):
        warm @ warm
    t = Timer(dev, args.reps)
    configs = {n: quack_gemm_config(*c) for n, c in CONFIGS.items() if n in args.configs.split(",")}
    print("| GEMM | variant | us / call | TFLOP/s | rel diff vs cuBLAS | compile s |\n|---|---|---|---|---|---|")

    def row(case: str, variant: str, us: float, flop: float, diff: float | None = None, comp: float | None = None):
        d = "" if diff is None else f"{diff:.1e}"
        c = "" if comp is None else f"{comp:.1f}"
        print(f"| {case} | {variant} | {us:.1f} | {flop / us / 1e6:.0f} | {d} | {c} |", flush=True)

    def quack_rows(case, flop, ref, call):
        """``call(cfg)`` runs QuACK with one pinned config (None: its autotuner) and returns the output."""
        variants = list(configs.items()) + ([("tuned", None)] if args.tuned else [])
        for name, cfg in variants:
            try:
                t0 = time.perf_counter()
                out = call(cfg)
                torch.cuda.synchronize()
                comp = time.perf_counter() - t0
                row(case, f"quack {name}", t.us(lambda c=cfg: call(c)), flop, _rel(out, ref), comp)
            except Exception as e:  # noqa: BLE001 - a config a shape cannot take is a row, not a crash
                print(f"| {case} | quack {name} | - | - | {type(e).__name__}: {str(e)[:100]} | |", flush=True)

    def act_call(x, w, b, act, post=None):
        mod = bias_gelu if act else bias_only
        out = {} if post is None else {"out": {"D": post}}

        def call(cfg):
            kw = {"config": cfg, "tuned": False} if cfg is not None else {"tuned": True}
            return mod(x, w.t(), bias=b.view(1, -1), **out, **kw)["D"]
        return call

    def one_gemm(case, m, k, n, gelu):
        """A GEMM with the tanh-GELU epilogue, or a plain bias GEMM."""
        x = _randn(m, k, seed=5, dev=dev)
        w, b = _linear(n, k, 7, dev)
        flop = 2.0 * m * k * n
        case = f"{case} [{m}, {k}] x [{k}, {n}]"
        if gelu:
            ref = _gelu_linear(x, w, b)
            row(case, "cuBLASLt gelu epilogue (ours now)", t.us(lambda: _gelu_linear(x, w, b)), flop)
            row(case, "cuBLAS plain (bias, no gelu)", t.us(lambda: F.linear(x, w, b)), flop)
        else:
            ref = F.linear(x, w, b)
            row(case, "cuBLAS (bias epilogue)", t.us(lambda: F.linear(x, w, b)), flop)
        quack_rows(case, flop, ref, act_call(x, w, b, "gelu_tanh_approx" if gelu else None))

    def flux_single_out():
        """Flux single block: the MLP's GELU GEMM into a column slice of one [rows, 3072 + 12288] buffer; the output
        projection split in two, the second accumulating in place (cuBLAS vs QuACK)."""
        m, k, hid = 4608, 3072, 12288
        x = _randn(m, k, seed=9, dev=dev)
        w, b = _linear(hid, k, 11, dev)
        buf = torch.empty(m, k + hid, device=dev, dtype=BF16)
        quack_rows(f"flux single mlp + gelu into buf[:, 3072:] of [{m}, {k + hid}]", 2.0 * m * k * hid,
                   _gelu_linear(x, w, b), act_call(x, w, b, "gelu_tanh_approx", post=buf[:, k:]))

        attn, mlp = _randn(m, k, seed=13, dev=dev), _randn(m, hid, seed=17, dev=dev)
        w_out, b_out = _linear(k, k + hid, 19, dev)
        ref = F.linear(torch.cat([attn, mlp], 1), w_out, b_out)
        out = torch.empty(m, k, device=dev, dtype=BF16)
        case = f"flux single out split [{m}, {k}+{hid}] x [{k + hid}, {k}]"
        flop = 2.0 * m * (k + hid) * k

        def split_cublas():
            torch.addmm(b_out, attn, w_out[:, :k].t(), out=out)
            out.addmm_(mlp, w_out[:, k:].t())
            return out

        def split_quack():
            torch.addmm(b_out, attn, w_out[:, :k].t(), out=out)
            gemm_add_inplace(mlp, w_out[:, k:].t(), out, tuned=False)  # no config pin here: the per-arch default
            return out

        row(case, "cuBLAS two GEMMs, the second accumulating in place (ours now)", t.us(split_cublas), flop)
        try:
            row(case, "cuBLAS, then QuACK accumulating in place (default config)", t.us(split_quack), flop,
                _rel(split_quack(), ref))
        except Exception as e:  # noqa: BLE001
            print(f"| {case} | QuACK accumulating | - | - | {type(e).__name__}: {str(e)[:100]} | |", flush=True)

    def wan_down_residual():
        """Wan FFN down projection + the gated residual h + gate * (x W^T + b)."""
        m, k, n = 32760, 8960, 1536
        x = _randn(m, k, seed=23, dev=dev)
        w, b = _linear(n, k, 29, dev)
        h = _randn(m, n, seed=31, dev=dev)
        gate = torch.randn(1, n, device=dev, dtype=torch.float32) * 0.1
        flop = 2.0 * m * k * n
        ref = (h.float() + F.linear(x, w, b).float() * gate).to(BF16)
        case = f"wan ff down + gated residual [{m}, {k}] x [{k}, {n}]"
        row(case, "cuBLAS down", t.us(lambda: F.linear(x, w, b)), flop)
        res = residual_pass(dev)
        y = F.linear(x, w, b)
        res(h, y, gate)
        row(case, "cuBLAS down + inductor residual (ours now)", t.us(lambda: res(h, F.linear(x, w, b), gate)), flop)
        bias_row, gate_row = b.view(1, n), gate.view(1, n)

        def fused(cfg):
            kw = {"config": cfg, "tuned": False} if cfg is not None else {"tuned": True}
            return gated_residual(x, w.t(), h, bias=bias_row, gate=gate_row, **kw)["D"]

        quack_rows(case + " (one GEMM, residual in its epilogue)", flop, ref, fused)

    if args.sustained:
        return sustained_rows(args.sustained, dev, act_call, gated_residual, configs)
    for spec in (("flux double ff up + gelu", 4096, 3072, 12288, True),
                 ("flux single mlp + gelu", 4608, 3072, 12288, True),
                 ("wan ff up + gelu", 32760, 1536, 8960, True),
                 ("flux double image qkv", 4096, 3072, 9216, False),
                 ("flux double ff down", 4096, 12288, 3072, False),
                 ("flux single out (one K=15360 GEMM)", 4608, 15360, 3072, False),
                 ("wan qkv", 32760, 1536, 4608, False)):
        one_gemm(*spec)
        torch.cuda.empty_cache()
    flux_single_out()
    torch.cuda.empty_cache()
    wan_down_residual()
    return 0


def sustained_rows(seconds: float, dev: torch.device, act_call, gated_residual, configs, rounds: int = 3) -> int:
    """cuBLAS and QuACK (the configuration ``services.gemm`` chose at these shapes) each run back to back for
    ``seconds``, alternating, ``rounds`` times: at the card's power cap (as inside a forward) rather than covered."""
    from benchmarks.attention_kernels import sustained_rounds
    from services.gemm import residual_pass

    res = residual_pass(dev)

    def pair(m: int, k: int, n: int, epi: str | None, cfg: str):
        """(cuBLAS as our blocks ran it before, QuACK with ``cfg``) for one shape."""
        x = _randn(m, k, seed=5, dev=dev)
        w, b = _linear(n, k, 7, dev)
        h = _randn(m, n, seed=31, dev=dev)
        gate = torch.randn(1, n, device=dev) * 0.1
        quack = act_call(x, w, b, epi) if epi != "res" else None

        def theirs():
            if epi == "res":
                return res(h, F.linear(x, w, b), gate)
            return _gelu_linear(x, w, b) if epi else F.linear(x, w, b)

        def ours():
            if epi == "res":
                return gated_residual(x, w.t(), h, bias=b.view(1, -1), gate=gate, config=configs[cfg], tuned=False)
            return quack(configs[cfg])

        theirs(), ours()
        return theirs, ours

    print("| GEMM | kernel | sustained ms / call (median of rounds) | TFLOP/s | clocks |\n|---|---|---|---|---|")
    for name, m, k, n, epi, cfg in (("wan ff up + gelu", 32760, 1536, 8960, "gelu", "pp128x192c21"),
                                    ("flux double ff up + gelu", 4096, 3072, 12288, "gelu", "pp128x192c21"),
                                    ("wan qkv", 32760, 1536, 4608, None, "pp128x192c21"),
                                    ("wan ff down + gated residual", 32760, 8960, 1536, "res", "coop256x192c21")):
        theirs, ours = pair(m, k, n, epi, cfg)
        case, flop = f"{name} [{m}, {k}] x [{k}, {n}]", 2.0 * m * k * n
        for label, (ms, clocks) in sustained_rounds({"cuBLAS": theirs, f"quack {cfg}": ours}, seconds, rounds).items():
            med = sorted(ms)[len(ms) // 2]
            print(f"| {case} | {label} | {med:.3f} ({', '.join(f'{v:.3f}' for v in ms)}) | {flop / med / 1e9:.0f} | "
                  f"{clocks} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
