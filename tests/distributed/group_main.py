"""One rank of a test group: joins a gloo group of real processes, then runs every case of a spec file with the
real worker stack (``Worker`` -> ``ModelRunner`` -> CFG parallel, sequence sharding, Ulysses/Ring attention), one
process-group layout per case, and saves each job's final latents per rank.

``python -m tests.distributed.group_main SPEC OUT --rank R --world-size N --master HOST:PORT``

SPEC (``torch.save``): ``{"cases": [{"name", "checkpoint", "component", "layout": {...}, "jobs": [DenoiseJob]}]}``.
OUT/<case>/<request_id>.rank<R>.pt: the latents. Any error exits 1 (the test shows the output).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist


def run(spec_path: Path, out: Path, rank: int, world: int, master: str) -> None:
    from denoiser_svc.config import DenoiserServiceConfig
    from denoiser_svc.parallel.groups import ParallelGroups
    from denoiser_svc.worker import Worker
    from services.config import load_config

    host, port = master.rsplit(":", 1)
    store = dist.TCPStore(host, int(port), world, is_master=False, timeout=datetime.timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    spec = torch.load(spec_path, weights_only=False)
    for case in spec["cases"]:
        overrides = [f"model.checkpoint={case['checkpoint']}", "model.device=cpu", "model.dtype=float32",
                     "warmup=false", f"component={case['component']}",
                     *(f"parallel.{k}={v}" for k, v in case["layout"].items())]
        config = load_config(DenoiserServiceConfig, overrides=overrides)
        groups = ParallelGroups.build(config.parallel, rank, "gloo")
        worker = Worker(config, groups=groups)
        worker.init_device()
        worker.load_model()
        folder = out / case["name"]
        folder.mkdir(parents=True, exist_ok=True)
        for job in case["jobs"]:
            worker.add_request(job)
            for step in range(job.start_step, job.end_step):
                worker.execute_step(job.request_id, step).wait()
            latents = worker.finish_request(job.request_id).latents
            torch.save(latents, folder / f"{job.request_id}.rank{rank}.pt")
        worker.shutdown()
        dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("spec", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--master", required=True)
    args = p.parse_args()
    try:
        run(args.spec, args.out, args.rank, args.world_size, args.master)
    except Exception:  # noqa: BLE001 - the test prints this
        traceback.print_exc()
        sys.stderr.flush()
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
