"""Denoiser start-up with and without the compiled-kernel cache (``runtime.kernel_cache_dir``): the same worker start
(load, ``auto`` kernel timing, GEMM selection, regional compile, warm-up request) in fresh processes, first with an
empty cache folder, then again with the folder the first start filled. Prints both times, their ratio and inductor's
cache hits and misses, and appends a row to the results file.

    python3 benchmarks/startup.py --tiny flux --device cpu            # CPU (CI runs this through the unit test)
    python3 benchmarks/startup.py --checkpoint /models/FLUX.1-dev --device cuda --dtype bfloat16 --set runtime.cuda_graphs=true

``--child`` is the single start (one process): it prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def child(checkpoint: str, device: str, dtype: str, cache: str, sets: list[str]) -> dict:
    """One start in this process: returns the seconds each phase took, inductor's counters and the runtime facts."""
    from torch._dynamo.utils import counters

    from denoiser_svc.config import DenoiserServiceConfig
    from denoiser_svc.worker import Worker
    from services.config import load_config

    t0 = time.perf_counter()
    overrides = [f"model.checkpoint={checkpoint}", f"model.device={device}", f"model.dtype={dtype}",
                 "runtime.compile=on", f"runtime.kernel_cache_dir={cache}", *sets]
    worker = Worker(load_config(DenoiserServiceConfig, overrides=overrides))
    worker.init_device()
    worker.load_model()
    loaded = time.perf_counter()
    worker.compile_or_warm_up_model(worker.warmup_job())
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    done = time.perf_counter()
    return {"load_seconds": loaded - t0, "warmup_seconds": done - loaded, "inductor": dict(counters["inductor"]),
            "facts": worker.runtime_facts}


def start(checkpoint: Path, device: str, dtype: str, cache: Path, sets: list[str], timeout: float = 1800) -> dict:
    """One start in a fresh process (no in-memory cache shared with an earlier one); the compilers' cache variables
    are left out of its environment, so only the config points the caches."""
    from services.runtime import FLASH_ATTENTION_CACHE_SWITCH, KERNEL_CACHES

    env = {k: v for k, v in os.environ.items() if k not in {*KERNEL_CACHES, FLASH_ATTENTION_CACHE_SWITCH}}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--checkpoint", str(checkpoint), "--device",
           device, "--dtype", dtype, "--cache", str(cache), *(x for s in sets for x in ("--set", s))]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"start failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


def compare(checkpoint: Path, device: str, dtype: str, cache: Path, sets: list[str]) -> tuple[dict, dict]:
    """(cold, warm): a start with ``cache`` empty, then one that finds what the first left there."""
    if cache.exists() and any(cache.iterdir()):
        raise SystemExit(f"{cache} is not empty: the cold start needs an empty folder")
    return start(checkpoint, device, dtype, cache, sets), start(checkpoint, device, dtype, cache, sets)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="", help="diffusers-format folder (or --tiny)")
    ap.add_argument("--tiny", default="", help="build this family's tiny checkpoint (flux, wan, ...) and use it")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--cache", default="", help="kernel cache folder, empty at the start (default: a temporary one)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="denoiser config override key=value")
    ap.add_argument("--results", default="", help="append the row to this markdown file")
    ap.add_argument("--json", default="", help="write both starts' measurements to this file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.checkpoint, args.device, args.dtype, args.cache, args.sets)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint)
        if args.tiny:
            from services.assets import build_tiny

            checkpoint = build_tiny(args.tiny, Path(tmp) / f"tiny-{args.tiny}", seed=0)
        cache = Path(args.cache) if args.cache else Path(tmp) / "kernels"
        cold, warm = compare(checkpoint, args.device, args.dtype, cache, args.sets)
    rows = []
    for name, r in (("cold (empty cache)", cold), ("warm (cache of the cold start)", warm)):
        ind = r["inductor"]
        rows.append(f"| {name} | {r['load_seconds']:.1f} | {r['warmup_seconds']:.1f} | "
                    f"{ind.get('fxgraph_cache_hit', 0)} / {ind.get('fxgraph_cache_miss', 0)} | "
                    f"{r['facts'].get('attention_auto_seconds', '-')} ({r['facts'].get('attention_source', '-')}) | "
                    f"{r['facts'].get('gemm_select_seconds', '-')} |")
    ratio = cold["warmup_seconds"] / max(warm["warmup_seconds"], 1e-9)
    if args.json:
        Path(args.json).write_text(json.dumps({"cold": cold, "warm": warm}))
    table = "\n".join([f"### Start-up: {checkpoint.name} on {args.device} ({datetime.date.today()}), "
                       f"overrides {args.sets or 'none'}", "",
                       "| start | load s | kernels + compile + warm-up s | inductor graph cache hits / misses | "
                       "attention auto s (source) | GEMM selection s |", "|---|---|---|---|---|---|", *rows, "",
                       f"warm-up from the cache: {ratio:.2f}x faster", ""])
    print(table)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()
