"""All-to-all on the GPUs of one host at the Ulysses message sizes of the benchmark models (issue 4).

Ulysses moves, per attention call and rank, one stacked q/k/v tensor in and one output tensor back. This script
times those exchanges alone and next to a GEMM (the overlap the denoiser relies on), for two implementations:

- ``nccl`` (``gloo`` on the CPU): ``torch.distributed.all_to_all_single`` (what the group uses today);
- ``p2p``: a pull over symmetric memory: every rank writes its input into its own symmetric buffer, a barrier, and
  every rank copies the chunk meant for it out of each peer's buffer (``copy_`` between devices: the copy engines
  over NVLink, no SMs taken from compute), a second barrier before the buffer is reused. ``p2p-streams`` issues
  the pulls from the peers on separate streams.

It prints per size: median milliseconds, algorithm bandwidth (bytes leaving a rank / time), and with ``--overlap``
the GEMM's slowdown while the exchange runs beside it.

    python benchmarks/collectives.py --gpus 4 --overlap --results $OUT/collectives.md
    python benchmarks/collectives.py --device cpu --tiny --gpus 2     # gloo, nccl-equivalent c10d path only (CI)
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# bytes per rank of the Ulysses exchanges at 4 ranks (bf16): tokens per rank x (3 for q/k/v in | 1 out) x hidden
SIZES = {
    "flux-in (1280x3x3072)": 1280 * 3 * 3072 * 2,
    "flux-out (1280x3072)": 1280 * 3072 * 2,
    "wan-in (8190x3x1536)": 8190 * 3 * 1536 * 2,
    "wan-out (8190x1536)": 8190 * 1536 * 2,
}


def _time(fn, iters: int, warmup: int, cuda: bool) -> float:
    """Median milliseconds of ``fn`` (CUDA events on the GPU, the wall clock on the CPU)."""
    import torch

    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if not cuda:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:  # noqa: ANN001
    import torch
    import torch.distributed as dist

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dtype = torch.bfloat16 if cuda else torch.float32
    sizes = {name: (n // 256 if args.tiny else n) for name, n in SIZES.items()}
    group = dist.group.WORLD
    rows = []
    handle, p2p_error = None, "needs CUDA"
    if cuda:
        try:
            import torch.distributed._symmetric_memory as symm
            sbuf = symm.empty(max(sizes.values()) // dtype.itemsize, dtype=dtype, device=dev)
            handle = symm.rendezvous(sbuf, group)
            p2p_error = ""
        except Exception as exc:  # noqa: BLE001 - reported in the table
            p2p_error = f"{type(exc).__name__}: {exc}"[:200]
    # NCCL communicators limited to n CTAs (SMs): slower alone, but they may leave a concurrent GEMM its SMs
    limited, ctas_error = {}, ""
    for n in args.max_ctas if cuda else []:
        try:
            opts = dist.ProcessGroupNCCL.Options()
            opts.config.max_ctas = n
            limited[n] = dist.new_group(list(range(world)), backend="nccl", pg_options=opts)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            ctas_error = f"{type(exc).__name__}: {exc}"[:200]
    streams = [torch.cuda.Stream(dev) for _ in range(world)] if cuda else []
    if args.overlap:
        a = torch.randn(8192, 8192, device=dev, dtype=dtype)
        gemm_alone = _time(lambda: a @ a, args.iters, args.warmup, cuda)
        side = torch.cuda.Stream(dev)

    for name, nbytes in sizes.items():
        numel = nbytes // dtype.itemsize // world * world
        chunk = numel // world

        def member_input(member: int, numel: int = numel) -> torch.Tensor:  # every rank can rebuild every member's input
            return torch.randn(numel, generator=torch.Generator().manual_seed(member)).to(dev, dtype)

        x = member_input(rank)
        # what this rank must end with: chunk `rank` of every member's input, in member order
        expect = torch.cat([member_input(m)[rank * chunk:(rank + 1) * chunk] for m in range(world)])
        out = torch.empty_like(x)

        def c10d(out: torch.Tensor = out, x: torch.Tensor = x) -> None:
            dist.all_to_all_single(out, x, group=group)

        def p2p(multi: bool = False, out: torch.Tensor = out, x: torch.Tensor = x, chunk: int = chunk) -> None:
            sbuf[:x.numel()].copy_(x)
            handle.barrier(channel=0)
            cur = torch.cuda.current_stream()
            for step in range(world):
                peer = (rank + step) % world
                src = handle.get_buffer(peer, (chunk,), dtype, rank * chunk)
                if multi:
                    s = streams[step]
                    s.wait_stream(cur)
                    with torch.cuda.stream(s):
                        out[peer * chunk:(peer + 1) * chunk].copy_(src)
                else:
                    out[peer * chunk:(peer + 1) * chunk].copy_(src)
            if multi:
                for s in streams[:world]:
                    cur.wait_stream(s)
            handle.barrier(channel=0)

        impls = {dist.get_backend(): c10d}
        for n, pg in limited.items():
            impls[f"nccl, max {n} CTAs"] = lambda out=out, x=x, pg=pg: dist.all_to_all_single(out, x, group=pg)
        if handle is not None:
            impls["p2p"] = p2p
            impls["p2p-streams"] = lambda: p2p(True)
        for impl, fn in impls.items():
            out.zero_()
            fn()
            ok = torch.equal(out, expect)
            ms = _time(fn, args.iters, args.warmup, cuda)
            row = {"size": name, "impl": impl, "ms": ms, "gbps": numel * dtype.itemsize * (world - 1) / world / ms / 1e6,
                   "exact": ok}
            if args.overlap:
                def both(fn=fn) -> None:  # noqa: ANN001
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        fn()
                    a @ a
                    torch.cuda.current_stream().wait_stream(side)
                row["overlap_ms"] = _time(both, args.iters, args.warmup, cuda)
                row["gemm_ms"] = gemm_alone
            rows.append(row)
    if rank == 0:
        queue.put({"rows": rows, "p2p_error": p2p_error, "ctas_error": ctas_error, "card": torch.cuda.get_device_name(dev) if cuda else "cpu",
                   "torch": torch.__version__})
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=4, help="ranks (GPUs; processes on the CPU)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="1/256 of the sizes (CPU smoke run)")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--overlap", action="store_true", help="also time each exchange beside an 8192^3 bf16 GEMM")
    p.add_argument("--max-ctas", default="", help="also NCCL communicators limited to these CTA counts, e.g. 4,8,16 "
                   "(CUDA; with --overlap: does a smaller footprint let the exchange hide beside a GEMM?)")
    p.add_argument("--results", default=None, help="append the table to this markdown file")
    args = p.parse_args(argv)
    args.max_ctas = [int(v) for v in args.max_ctas.split(",") if v]
    import socket

    import torch
    import torch.multiprocessing as mp

    if args.device == "cpu" and args.overlap:
        p.error("--overlap needs CUDA (streams)")
    if args.device == "cuda" and torch.cuda.device_count() < args.gpus:
        p.error(f"--gpus {args.gpus} but {torch.cuda.device_count()} CUDA devices")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args.gpus, port, args, queue)) for r in range(args.gpus)]
    for proc in procs:
        proc.start()
    got = queue.get(timeout=600)
    for proc in procs:
        proc.join()
    if any(proc.exitcode for proc in procs):
        raise SystemExit(f"a rank failed (exit codes {[proc.exitcode for proc in procs]})")
    lines = [f"\n## All-to-all at the Ulysses sizes: {datetime.date.today().isoformat()}, {args.gpus}x {got['card']}, "
             f"torch {got['torch']}{', tiny sizes' if args.tiny else ''}\n", "| size (bytes per rank) | impl | ms | GB/s out of a rank | exact | "
             "beside a GEMM (ms; GEMM alone) |", "|---|---|---|---|---|---|"]
    for r in got["rows"]:
        ov = f"{r['overlap_ms']:.3f}; {r['gemm_ms']:.3f}" if "overlap_ms" in r else ""
        lines.append(f"| {r['size']} | {r['impl']} | {r['ms']:.3f} | {r['gbps']:.1f} | {r['exact']} | {ov} |")
    if got["p2p_error"]:
        lines.append(f"\np2p unavailable: {got['p2p_error']}")
    if got["ctas_error"]:
        lines.append(f"\nCTA-limited NCCL communicators unavailable: {got['ctas_error']}")
    text = "\n".join(lines)
    print(text, flush=True)
    if args.results:
        with Path(args.results).open("a") as f:
            f.write(text + "\n")
    return 0 if all(r["exact"] for r in got["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
