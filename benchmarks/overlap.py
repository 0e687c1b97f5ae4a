"""Does running Flux's single-stream MLP GEMM on a second CUDA stream, beside the attention branch, save time on one
GPU? (Issue 3: what is left of Flux's 1.12x.)

A Flux.1 single-stream block computes ``proj_out(cat(attention(norm(x)), gelu(proj_mlp(norm(x)))))``; the MLP
up-projection (4608 x 3072 -> 12288, ~0.43 ms) does not depend on the attention branch (QKV GEMM, q/k norms,
FlashAttention-4: ~0.8 ms). FA4's 864 tiles (36 query tiles x 24 heads) fill 132 SMs 6.5 times, so its last wave
leaves ~45 % of the card idle (~6 % of the call), and the q/k norms are memory-bound: a concurrent GEMM could fill
both. Under the card's 700 W cap (every heavy forward runs there, RESULTS.md) filled SMs also draw power, so only a
measurement at sustained load answers it.

Each variant runs 8 blocks captured in one CUDA graph (no host work between kernels, as a compiled forward with CUDA
graphs runs), replayed back to back for ``--seconds`` with the variants alternating for ``--rounds``; it prints ms a
block, the ratio to the sequential order and the clocks. Variants: ``seq`` (MLP, then the attention branch, as our
block runs on one GPU), ``fork@start`` (MLP on a side stream from the block's start), ``fork@attn`` (MLP on a side
stream from the attention call; the QKV GEMM runs alone). The MLP GEMM is cuBLASLt with its GELU epilogue and, where
QuACK is installed, QuACK's static and dynamic persistent schedules (a statically scheduled persistent kernel whose
CTAs start late finishes late). The block's other work (the norm, the split output projection, the gated residual)
is as our block runs it, in plain torch ops.

    python3 benchmarks/overlap.py [--seconds 1.0] [--rounds 3] [--blocks 8]
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

TOKENS, DIM, HEADS, HEAD_DIM, MLP = 4608, 3072, 24, 128, 12288


def _mlp_calls(w_mlp: torch.Tensor, b_mlp: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The MLP up-projection with its tanh GELU, per GEMM kernel available here."""
    calls = {"cublasLt": lambda h: torch._addmm_activation(b_mlp, h, w_mlp.t(), use_gelu=True)}
    try:
        from quack.gemm_config import GemmConfig

        from services.gemm import quack_epilogues

        epilogue = quack_epilogues()["bias_gelu"]
        for label, dynamic in (("quack-static", False), ("quack-dynamic", True)):
            config = GemmConfig(tile_m=128, tile_n=192, pingpong=True, cluster_m=2, cluster_n=1,
                                is_dynamic_persistent=dynamic)
            calls[label] = (lambda h, c=config: epilogue(h, w_mlp.t(), None, config=c, tuned=False,
                                                         bias=b_mlp.view(1, -1))["D"])
    except Exception as exc:  # noqa: BLE001 - QuACK absent or not loadable: the cuBLAS rows still answer
        print(f"QuACK not usable here ({type(exc).__name__}: {str(exc)[:100]}); cuBLAS MLP only", flush=True)
    return calls


def build(mlp: Callable[[torch.Tensor], torch.Tensor], order: str, blocks: int, dev: torch.device,
          eager: bool = False):
    """A CUDA graph of ``blocks`` single-stream blocks in ``order`` (``eager``: the blocks run eagerly, the host
    launching ahead of the device); returns its replay and its output tensor."""
    g = torch.Generator(device=dev).manual_seed(0)

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=dev) * 0.02).to(torch.bfloat16)

    w_qkv, b_qkv, w_o = w(3 * DIM, DIM), w(3 * DIM), w(DIM, DIM + MLP)
    b_o, gate = w(DIM), w(DIM)
    x0 = torch.randn(TOKENS, DIM, generator=g, device=dev).to(torch.bfloat16)
    side = torch.cuda.Stream(dev)
    from services.attention.backends import _fa4_op

    def attention_branch(h: torch.Tensor) -> torch.Tensor:
        qkv = F.linear(h, w_qkv, b_qkv).view(1, TOKENS, 3, HEADS, HEAD_DIM)
        q = F.rms_norm(qkv[:, :, 0], (HEAD_DIM,))  # memory-bound, as the fused q/k norm + rotary kernel
        k = F.rms_norm(qkv[:, :, 1], (HEAD_DIM,))
        return _fa4_op(q, k, qkv[:, :, 2])[0].view(TOKENS, DIM)

    def block(x: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(x, (DIM,))
        main = torch.cuda.current_stream(dev)
        if order != "seq":
            h.record_stream(side)
        if order == "seq":
            up = mlp(h)
            att = attention_branch(h)
        elif order == "fork@start":
            side.wait_stream(main)
            with torch.cuda.stream(side):
                up = mlp(h)
            att = attention_branch(h)
            main.wait_stream(side)
            up.record_stream(main)
        else:  # fork@attn
            qkv = F.linear(h, w_qkv, b_qkv).view(1, TOKENS, 3, HEADS, HEAD_DIM)
            q = F.rms_norm(qkv[:, :, 0], (HEAD_DIM,))
            k = F.rms_norm(qkv[:, :, 1], (HEAD_DIM,))
            side.wait_stream(main)
            with torch.cuda.stream(side):
                up = mlp(h)
            att = _fa4_op(q, k, qkv[:, :, 2])[0].view(TOKENS, DIM)
            main.wait_stream(side)
            up.record_stream(main)
        out = torch.addmm(b_o, att, w_o[:, :DIM].t())
        out.addmm_(up, w_o[:, DIM:].t())
        return x + gate * out

    x = x0.clone()
    for _ in range(2):  # compile every kernel before capture
        x = block(x)
    torch.cuda.synchronize(dev)
    if eager:
        result = [x]

        def run() -> None:
            y = x0
            for _ in range(blocks):
                y = block(y)
            result[0] = y

        run()
        torch.cuda.synchronize(dev)
        return run, result[0]
    graph = torch.cuda.CUDAGraph()
    static_in = x0.clone()
    with torch.cuda.graph(graph):
        y = static_in
        for _ in range(blocks):
            y = block(y)
    torch.cuda.synchronize(dev)
    return graph.replay, y


def _sustained(replay: Callable[[], None], seconds: float, blocks: int) -> tuple[float, str]:
    """ms a block of ``replay`` run back to back for ``seconds`` (``attention_kernels``' timing), and the clocks."""
    from benchmarks.attention_kernels import _sustained_ms

    ms, clocks = _sustained_ms(replay, seconds)
    return ms / blocks, clocks.brief()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--orders", default="seq,fork@start,fork@attn")
    ap.add_argument("--eager", action="store_true", help="no CUDA graph: the host launches each block's kernels")
    ap.add_argument("--gemms", default="cublasLt,quack-static,quack-dynamic", help="MLP GEMM kernels to try")
    ap.add_argument("--results", type=Path, default=None, help="append the table to this markdown file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (FlashAttention-4 and CUDA graphs)")
        return 2
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(1)
    w_mlp = (torch.randn(MLP, DIM, generator=g, device=dev) * 0.02).to(torch.bfloat16)
    b_mlp = (torch.randn(MLP, generator=g, device=dev) * 0.02).to(torch.bfloat16)
    replays: dict[str, Callable[[], None]] = {}
    for gemm, mlp in _mlp_calls(w_mlp, b_mlp).items():
        if gemm not in args.gemms.split(","):
            continue
        reference = None
        for order in args.orders.split(","):
            try:
                replay, out = build(mlp, order, args.blocks, dev, args.eager)
                replay()
                torch.cuda.synchronize(dev)
            except Exception as exc:  # noqa: BLE001 - report a variant that cannot be captured, time the rest
                print(f"{gemm} {order}: not captured ({type(exc).__name__}: {str(exc)[:160]})", flush=True)
                continue
            # the same kernels on the same inputs: a fork must not change the output (or it dropped work / raced)
            reference = out.clone() if reference is None else reference
            diff = (out.float() - reference.float()).abs().max().item()
            print(f"{gemm} {order}: output max |diff| vs {args.orders.split(',')[0]}: {diff:.3e}", flush=True)
            replays[f"{gemm} {order}"] = replay
    per: dict[str, list[float]] = {label: [] for label in replays}
    clocks: dict[str, str] = {}
    for r in range(args.rounds):
        for label in (list(replays) if r % 2 == 0 else list(replays)[::-1]):
            ms, clocks[label] = _sustained(replays[label], args.seconds, args.blocks)
            per[label].append(ms)
            print(f"round {r} {label}: {ms:.4f} ms a block ({clocks[label]})", flush=True)
    lines = [f"Flux single-stream block, MLP GEMM on a side stream ({torch.cuda.get_device_name(dev)}, torch "
             f"{torch.__version__}; {args.blocks} blocks {'eagerly' if args.eager else 'a CUDA graph'}, "
             f"{args.seconds:g} s back to back x {args.rounds} rounds, alternating)", "",
             "| MLP GEMM | order | ms a block (median of rounds) | rounds | vs seq | clocks (last round) |",
             "|---|---|---|---|---|---|"]
    for label, runs in per.items():
        gemm, order = label.split(" ")
        seq = statistics.median(per.get(f"{gemm} seq", runs))
        med = statistics.median(runs)
        lines.append(f"| {gemm} | {order} | {med:.4f} | {', '.join(f'{m:.4f}' for m in runs)} | "
                     f"{seq / med:.3f}x | {clocks[label]} |")
    table = "\n".join(lines)
    print(table, flush=True)
    if args.results:
        with args.results.open("a") as f:
            f.write(table + "\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
