"""The GEMMs of the Flux.1-dev and Wan2.1-1.3B blocks at their real shapes, on one GPU, each in the ways a block
could run it, in microseconds a call and TFLOP/s: where the forward's ~88 ms (Flux) / ~117 ms (Wan) of GEMM time
goes and which arrangement of the same products is fastest.

- Flux double-stream blocks project the image rows (4096) and the text rows (512) with separate weights of the same
  shape. ``separate``: two GEMMs one after the other (what diffusers and our block run); ``grouped``: one
  ``torch._grouped_mm`` over the joint rows [text; image] with the two weights stacked (+ the bias pass it needs);
  ``two streams``: the text GEMM on a second stream beside the image GEMM. A 512-row GEMM fills a fraction of the
  card (4 row tiles of 128), so the question is what the pair costs.
- Flux single-stream blocks: QKV (N=9216) and the GELU MLP (N=12288) as two GEMMs or one N=21504 GEMM (+ a GELU
  pass), the output projection over [attention; MLP] split in two accumulating GEMMs or as one.
- Wan blocks (32760 rows): fused QKV (N=4608) vs three N=1536 GEMMs, the up-projection with the GELU in cuBLASLt's
  epilogue vs a plain GEMM + a GELU pass, the down projection, the output projections.

Timing: 5 calls back to back a sample after ~10 ms of queued sleep (the host's launch work hidden), median of the
samples; the idle time before each sample lets the card run near its boost clock, so rates are higher than inside a
forward, where it sits at its power cap (``gpu_clocks.py``): compare arrangements with each other, not with forwards.

    python benchmarks/gemm_shapes.py [--reps 20] [--only flux-double,flux-single,wan] [--blas cublas,cublaslt]
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

from services.attention.autotune import _timer  # noqa: E402

BF16 = torch.bfloat16
CALLS = 5  # back-to-back calls a timed sample
HOST_COVER_CYCLES = 20_000_000  # ~10 ms of queued sleep before a sample: the host's launch work stays hidden


def _randn(*shape: int, seed: int, dev: torch.device, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator(dev).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=dev) * scale).to(BF16)


def _linear(n: int, k: int, seed: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """An ``nn.Linear``-shaped weight [n, k] and bias [n]."""
    return _randn(n, k, seed=seed, dev=dev, scale=k ** -0.5), _randn(n, seed=seed + 1, dev=dev, scale=0.1)


def _gelu_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """What ``runtime.linear_gelu_tanh`` runs on CUDA: the bias and the GELU in the GEMM's epilogue."""
    return torch._addmm_activation(b, x, w.t(), use_gelu=True)


class Timer:
    def __init__(self, dev: torch.device, reps: int) -> None:
        self.dev, self.reps = dev, reps
        self.timer = _timer(dev, HOST_COVER_CYCLES)

    def us(self, fn: Callable[[], object]) -> float:
        def many():
            for _ in range(CALLS):
                fn()

        for _ in range(2):
            many()
        return statistics.median(self.timer(many) for _ in range(self.reps)) * 1000 / CALLS


def _row(table: list[str], case: str, variant: str, us: float, flop: float, note: str = "") -> None:
    line = f"| {case} | {variant} | {us:.1f} | {flop / us / 1e6:.0f} | {note} |"
    table.append(line)
    print(line, flush=True)


def flux_double(t: Timer, dev: torch.device, table: list[str], s: int = 1) -> None:
    """The four projection pairs of a double-stream block: image (4096 rows) and text (512 rows)."""
    side = torch.cuda.Stream(dev) if dev.type == "cuda" else None
    for name, k, n, gelu in (("qkv", 3072 // s, 9216 // s, False), ("attn out", 3072 // s, 3072 // s, False),
                             ("ff up + gelu", 3072 // s, 12288 // s, True), ("ff down", 12288 // s, 3072 // s, False)):
        _flux_pair(t, dev, table, side, name, k, n, gelu, 4096 // s, 512 // s)


def _flux_pair(t: Timer, dev: torch.device, table: list[str], side: torch.cuda.Stream | None, name: str, k: int,
               n: int, gelu: bool, img_rows: int, txt_rows: int) -> None:
    w_img, b_img = _linear(n, k, 1, dev)
    w_txt, b_txt = _linear(n, k, 3, dev)
    x = _randn(txt_rows + img_rows, k, seed=5, dev=dev)  # joint rows [text; image]
    x_txt, x_img = x[:txt_rows], x[txt_rows:]
    flop_img, flop_txt = 2.0 * img_rows * k * n, 2.0 * txt_rows * k * n
    lin = _gelu_linear if gelu else F.linear
    # stacked weights as grouped_mm wants them: [G, K, N] with each group column-major (nn.Linear's layout)
    w_stack = torch.stack([w_txt, w_img]).transpose(1, 2)
    offs = torch.tensor([txt_rows, txt_rows + img_rows], device=dev, dtype=torch.int32)

    def separate():
        return lin(x_img, w_img, b_img), lin(x_txt, w_txt, b_txt)

    def grouped_bare():
        return torch._grouped_mm(x, w_stack, offs=offs)

    def grouped():
        out = torch._grouped_mm(x, w_stack, offs=offs)
        out[:txt_rows] += b_txt
        out[txt_rows:] += b_img
        if gelu:
            out = F.gelu(out, approximate="tanh")
        return out

    def streams():
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            t_out = lin(x_txt, w_txt, b_txt)
        i_out = lin(x_img, w_img, b_img)
        torch.cuda.current_stream(dev).wait_stream(side)
        return i_out, t_out

    case = f"flux double {name} [{txt_rows}+{img_rows}, {k}] x [{k}, {n}]"
    _row(table, case, "image alone", t.us(lambda: lin(x_img, w_img, b_img)), flop_img)
    _row(table, case, "text alone", t.us(lambda: lin(x_txt, w_txt, b_txt)), flop_txt)
    _row(table, case, "separate (image, then text)", t.us(separate), flop_img + flop_txt)
    try:
        ref = torch.cat([separate()[1], separate()[0]])
        err = ((grouped().float() - ref.float()).norm() / ref.float().norm()).item()
        _row(table, case, "grouped_mm, no bias", t.us(grouped_bare), flop_img + flop_txt)
        _row(table, case, "grouped_mm + bias" + (" + gelu" if gelu else "") + " passes", t.us(grouped),
             flop_img + flop_txt, f"rel diff vs separate {err:.1e}")
    except (RuntimeError, NotImplementedError) as e:  # not every build has the grouped kernel
        table.append(f"| {case} | grouped_mm | - | - | {type(e).__name__}: {str(e)[:80]} |")
    if side is not None:
        _row(table, case, "two streams (text beside image)", t.us(streams), flop_img + flop_txt)


def flux_single(t: Timer, dev: torch.device, table: list[str], s: int = 1) -> None:
    rows, k, hidden = 4608 // s, 3072 // s, 12288 // s
    x = _randn(rows, k, seed=7, dev=dev)
    w_qkv, b_qkv = _linear(3 * k, k, 11, dev)
    w_mlp, b_mlp = _linear(hidden, k, 13, dev)
    w_both, b_both = torch.cat([w_qkv, w_mlp]), torch.cat([b_qkv, b_mlp])
    f_qkv, f_mlp = 2.0 * rows * k * 3 * k, 2.0 * rows * k * hidden
    case = f"flux single in [{rows}, {k}] x [{k}, 9216 + 12288]"
    _row(table, case, "qkv GEMM", t.us(lambda: F.linear(x, w_qkv, b_qkv)), f_qkv)
    _row(table, case, "mlp GEMM + gelu epilogue", t.us(lambda: _gelu_linear(x, w_mlp, b_mlp)), f_mlp)
    _row(table, case, "mlp GEMM plain", t.us(lambda: F.linear(x, w_mlp, b_mlp)), f_mlp)
    _row(table, case, "both as now (qkv + gelu-epilogue mlp)",
         t.us(lambda: (F.linear(x, w_qkv, b_qkv), _gelu_linear(x, w_mlp, b_mlp))), f_qkv + f_mlp)
    _row(table, case, "one GEMM over both weights (no gelu)", t.us(lambda: F.linear(x, w_both, b_both)), f_qkv + f_mlp)

    def one_then_gelu():
        out = F.linear(x, w_both, b_both)
        return out[:, :3 * k], F.gelu(out[:, 3 * k:], approximate="tanh")

    _row(table, case, "one GEMM over both + gelu pass on the mlp part", t.us(one_then_gelu), f_qkv + f_mlp)

    attn, mlp = _randn(rows, k, seed=17, dev=dev), _randn(rows, hidden, seed=19, dev=dev)
    w_out, b_out = _linear(k, k + hidden, 23, dev)
    cat_in = torch.cat([attn, mlp], dim=1)
    f_out = 2.0 * rows * (k + hidden) * k
    case = f"flux single out [{rows}, {k}+{hidden}] x [{k + hidden}, {k}]"
    _row(table, case, "one GEMM on the concatenated input (no cat)", t.us(lambda: F.linear(cat_in, w_out, b_out)), f_out)

    def split():
        out = torch.addmm(b_out, attn, w_out[:, :k].t())
        return torch.addmm(out, mlp, w_out[:, k:].t())

    _row(table, case, "split: two accumulating GEMMs (as now)", t.us(split), f_out)
    # the MLP's GELU GEMM writing straight into the columns of one [rows, K + hidden] buffer (row stride K + hidden)
    # and the attention output copied into the rest: then proj_out is one GEMM without a concatenation
    buf = torch.empty(rows, k + hidden, device=dev, dtype=BF16)

    def into_buffer():
        torch._addmm_activation(b_mlp, x, w_mlp.t(), use_gelu=True, out=buf[:, k:])
        buf[:, :k].copy_(attn)
        return F.linear(buf, w_out, b_out)

    try:
        mlp_ref = _gelu_linear(x, w_mlp, b_mlp)
        into_buffer()
        diff = ((buf[:, k:].float() - mlp_ref.float()).norm() / mlp_ref.float().norm()).item()
        _row(table, case, "mlp gelu GEMM into a column slice (out=)",
             t.us(lambda: torch._addmm_activation(b_mlp, x, w_mlp.t(), use_gelu=True, out=buf[:, k:])), f_mlp,
             f"rel diff vs contiguous output {diff:.1e}")
        _row(table, case, "mlp gelu GEMM into the slice + attention copy + one out GEMM", t.us(into_buffer),
             f_mlp + f_out)
        _row(table, case, "mlp gelu GEMM + split out GEMMs (as now, same work)",
             t.us(lambda: (_gelu_linear(x, w_mlp, b_mlp), split())), f_mlp + f_out)
    except RuntimeError as e:
        table.append(f"| {case} | mlp GEMM into a column slice | - | - | {type(e).__name__}: {str(e)[:80]} |")
    _row(table, case, "cat + one GEMM", t.us(lambda: F.linear(torch.cat([attn, mlp], 1), w_out, b_out)), f_out)


def wan(t: Timer, dev: torch.device, table: list[str], s: int = 1) -> None:
    rows, d, ffn = 32760 // s, 1536 // s, 8960 // s
    x = _randn(rows, d, seed=29, dev=dev)
    w_qkv, b_qkv = _linear(3 * d, d, 31, dev)
    w_q, w_k, w_v = w_qkv.split(d)
    b_q, b_k, b_v = b_qkv.split(d)
    f_one = 2.0 * rows * d * d
    case = f"wan qkv [{rows}, {d}] x [{d}, 3 x {d}]"
    _row(table, case, "fused (as now)", t.us(lambda: F.linear(x, w_qkv, b_qkv)), 3 * f_one)
    _row(table, case, "three (diffusers)",
         t.us(lambda: (F.linear(x, w_q, b_q), F.linear(x, w_k, b_k), F.linear(x, w_v, b_v))), 3 * f_one)
    _row(table, case, "one of them (o-proj, cross q shape)", t.us(lambda: F.linear(x, w_q, b_q)), f_one)

    w_up, b_up = _linear(ffn, d, 37, dev)
    w_down, b_down = _linear(d, ffn, 41, dev)
    h = _randn(rows, ffn, seed=43, dev=dev)
    f_ffn = 2.0 * rows * d * ffn
    case = f"wan ffn [{rows}, {d}] x [{d}, {ffn}] x [{ffn}, {d}]"
    _row(table, case, "up + gelu epilogue (as now)", t.us(lambda: _gelu_linear(x, w_up, b_up)), f_ffn)
    _row(table, case, "up plain", t.us(lambda: F.linear(x, w_up, b_up)), f_ffn)
    _row(table, case, "up plain + gelu pass",
         t.us(lambda: F.gelu(F.linear(x, w_up, b_up), approximate="tanh")), f_ffn)
    _row(table, case, "down", t.us(lambda: F.linear(h, w_down, b_down)), f_ffn)


def ceiling(t: Timer, dev: torch.device, table: list[str], s: int = 1) -> None:
    n = 8192 // s
    a, b = _randn(n, n, seed=47, dev=dev), _randn(n, n, seed=53, dev=dev)
    _row(table, f"ceiling [{n}, {n}] x [{n}, {n}]", "mm", t.us(lambda: a @ b), 2.0 * n ** 3)


CASES = {"ceiling": ceiling, "flux-double": flux_double, "flux-single": flux_single, "wan": wan}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--only", default=",".join(CASES))
    ap.add_argument("--blas", default="cublas", help="comma list of torch.backends.cuda.preferred_blas_library "
                    "values to run every case under (cublas, cublaslt)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="every dimension / 16 (a CPU smoke run of the same code)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA device (or --device cpu for a smoke run)", file=sys.stderr)
        return 2
    if dev.type == "cuda":
        print(f"{torch.cuda.get_device_name(dev)} · torch {torch.__version__}")
        warm = _randn(8192, 8192, seed=59, dev=dev)
        for _ in range(300):  # bring the clocks up before the first timed row
            warm @ warm
    t = Timer(dev, args.reps)
    for blas in args.blas.split(","):
        if dev.type == "cuda":
            torch.backends.cuda.preferred_blas_library(blas)
        table = ["| GEMM | variant | us / call | TFLOP/s | note |", "|---|---|---|---|---|"]
        print(f"\n### preferred BLAS library: {blas}\n" + "\n".join(table), flush=True)
        for name in args.only.split(","):
            CASES[name](t, dev, table, 16 if args.tiny else 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
