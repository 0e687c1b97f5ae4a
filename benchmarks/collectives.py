"""All-to-all on the GPUs of one host at the Ulysses message sizes of the benchmark models (issue 4).

Ulysses moves, per attention call and rank, one stacked q/k/v tensor in and one output tensor back. This script
times those exchanges alone and next to a GEMM (the overlap the denoiser relies on), for two implementations:

- ``nccl``: ``torch.distributed.all_to_all_single`` (what the group uses today);
- ``p2p``: a pull over symmetric memory: every rank writes its input into its own symmetric buffer, a barrier, and
  every rank copies the chunk meant for it out of each peer's buffer (``copy_`` between devices: the copy engines
  over NVLink, no SMs taken from compute), a second barrier before the buffer is reused. ``p2p-streams`` issues
  the pulls from the peers on separate streams.

It prints per size: median milliseconds, algorithm bandwidth (bytes leaving a rank / time), and with ``--overlap``
the GEMM's slowdown while the exchange runs beside it.

    python benchmarks/collectives.py --gpus 4 --results $OUT/collectives.md
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
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


def _time(fn, iters: int, warmup: int) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
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

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=dev)
    group = dist.group.WORLD
    rows = []
    try:
        import torch.distributed._symmetric_memory as symm
        max_numel = max(SIZES.values()) // 2
        sbuf = symm.empty(max_numel, dtype=torch.bfloat16, device=dev)
        handle = symm.rendezvous(sbuf, group)
        p2p_error = ""
    except Exception as exc:  # noqa: BLE001 - reported in the table
        handle, p2p_error = None, f"{type(exc).__name__}: {exc}"[:200]
    streams = [torch.cuda.Stream(dev) for _ in range(world)]
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    gemm_alone = _time(lambda: a @ a, args.iters, args.warmup)
    side = torch.cuda.Stream(dev)

    for name, nbytes in SIZES.items():
        numel = nbytes // 2 // world * world
        x = torch.randn(numel, device=dev, dtype=torch.bfloat16) + rank
        out = torch.empty_like(x)
        chunk = numel // world

        def nccl(out: torch.Tensor = out, x: torch.Tensor = x) -> None:
            dist.all_to_all_single(out, x, group=group)

        def p2p(multi: bool = False, out: torch.Tensor = out, x: torch.Tensor = x, chunk: int = chunk) -> None:
            sbuf[:x.numel()].copy_(x)
            handle.barrier(channel=0)
            cur = torch.cuda.current_stream()
            for step in range(world):
                peer = (rank + step) % world
                src = handle.get_buffer(peer, (chunk,), torch.bfloat16, rank * chunk)
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

        impls = {"nccl": nccl}
        if handle is not None:
            impls["p2p"] = p2p
            impls["p2p-streams"] = lambda: p2p(True)
        expect = None
        for impl, fn in impls.items():
            fn()
            torch.cuda.synchronize()
            if expect is None:
                expect = out.clone()
            ok = torch.equal(out, expect)
            ms = _time(fn, args.iters, args.warmup)
            row = {"size": name, "impl": impl, "ms": ms, "gbps": nbytes * (world - 1) / world / ms / 1e6,
                   "exact": ok}
            if args.overlap:
                def both(fn=fn) -> None:  # noqa: ANN001
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        fn()
                    a @ a
                    torch.cuda.current_stream().wait_stream(side)
                row["overlap_ms"] = _time(both, args.iters, args.warmup)
                row["gemm_ms"] = gemm_alone
            rows.append(row)
    if rank == 0:
        queue.put({"rows": rows, "p2p_error": p2p_error, "card": torch.cuda.get_device_name(dev),
                   "torch": torch.__version__})
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=4)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--overlap", action="store_true", help="also time each exchange beside an 8192^3 bf16 GEMM")
    p.add_argument("--results", default=None, help="append the table to this markdown file")
    args = p.parse_args(argv)
    import socket

    import torch
    import torch.multiprocessing as mp

    if torch.cuda.device_count() < args.gpus:
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
    lines = [f"\n## All-to-all at the Ulysses sizes: {datetime.date.today().isoformat()}, {args.gpus}x {got['card']}, "
             f"torch {got['torch']}\n", "| size (bytes per rank) | impl | ms | GB/s out of a rank | exact | "
             "beside a GEMM (ms; GEMM alone) |", "|---|---|---|---|---|---|"]
    for r in got["rows"]:
        ov = f"{r['overlap_ms']:.3f}; {r['gemm_ms']:.3f}" if "overlap_ms" in r else ""
        lines.append(f"| {r['size']} | {r['impl']} | {r['ms']:.3f} | {r['gbps']:.0f} | {r['exact']} | {ov} |")
    if got["p2p_error"]:
        lines.append(f"\np2p unavailable: {got['p2p_error']}")
    text = "\n".join(lines)
    print(text, flush=True)
    if args.results:
        with Path(args.results).open("a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
