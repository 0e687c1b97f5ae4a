"""One rank of a test group: joins a gloo group of real processes, then runs every case of a spec file with the
real worker stack (``Worker`` -> ``ModelRunner`` -> CFG parallel, sequence sharding, Ulysses/Ring attention), one
process-group layout per case, and saves each job's final latents per rank.

``python -m tests.distributed.group_main SPEC OUT --world-size N --master HOST:PORT [--device cuda --dtype D]``:
one process imports the stack once, then forks the N ranks (rank processes of their own, with their own
torch.distributed state; forking saves each rank the ~5 s import, which on a 2-core CI machine dominates a pool's
run time). With ``--device cuda`` (tests/gpu) the ranks are spawned instead, rank r on ``cuda:r``, over NCCL.

SPEC (``torch.save``): ``{"cases": [{"name", "checkpoint", "component", "layout": {...}, "jobs": [DenoiseJob]}]}``.
OUT/<case>/<request_id>.rank<R>.pt: the latents; OUT/<case>/graph_breaks.rank<R>: the graph breaks torch.compile hit
while warming up and running the case's jobs; OUT/<case>/facts.rank<R>.json: the worker's runtime facts (kernel and
GEMM choices). Any error exits 1 (the test shows the output).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist


def run(spec_path: Path, out: Path, rank: int, world: int, master: str, device: str = "cpu",
        dtype: str = "float32") -> None:
    from denoiser_svc.config import DenoiserServiceConfig
    from denoiser_svc.parallel.groups import ParallelGroups
    from denoiser_svc.parallel.launch import destroy_group
    from denoiser_svc.worker import Worker
    from services.config import load_config
    from services.runtime import graph_breaks

    host, port = master.rsplit(":", 1)
    store = dist.TCPStore(host, int(port), world, is_master=False, timeout=datetime.timedelta(seconds=120))
    backend = "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank)
        backend = "nccl"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    spec = torch.load(spec_path, weights_only=False)
    for case in spec["cases"]:
        t0 = time.perf_counter()
        overrides = [f"model.checkpoint={case['checkpoint']}", f"model.device={device}", f"model.dtype={dtype}",
                     f"component={case['component']}",
                     *(f"parallel.{k}={v}" for k, v in case["layout"].items()), *case.get("overrides", [])]
        config = load_config(DenoiserServiceConfig, overrides=overrides)
        groups = ParallelGroups.build(config.parallel, rank, backend)
        worker = Worker(config, groups=groups)
        worker.init_device()
        worker.load_model()
        breaks = graph_breaks()  # from before the warm-up: compilation happens there
        if case.get("overrides"):  # runtime settings: choose kernels and compile as a serving rank does
            torch._dynamo.reset()  # compile afresh, as a serving process does (no graphs cached by an earlier case)
            # the first job under another id is the warm-up: its recorded step picks the GEMM routes, and the CUDA
            # graphs are captured before the job itself runs (as a served request finds them)
            first = case["jobs"][0]
            warmup = (worker.warmup_job() if case.get("warm_up_with") == "default"
                      else dataclasses.replace(first, request_id=f"{first.request_id}-warmup"))
            worker.compile_or_warm_up_model(warmup)
        folder = out / case["name"]
        folder.mkdir(parents=True, exist_ok=True)
        for job in case["jobs"]:
            worker.add_request(job)
            for step in range(job.start_step, job.end_step):
                worker.execute_step(job.request_id, step).wait()
            latents = worker.finish_request(job.request_id).latents
            torch.save(latents, folder / f"{job.request_id}.rank{rank}.pt")
        (folder / f"graph_breaks.rank{rank}").write_text(str(graph_breaks() - breaks))
        (folder / f"facts.rank{rank}.json").write_text(json.dumps(worker.runtime_facts))
        worker.shutdown()
        dist.barrier()
        print(f"case {case['name']}: {time.perf_counter() - t0:.1f} s", flush=True)
    # bounded, as a serving rank's: after NCCL ran inside CUDA graphs destroy_process_group may never return (it had
    # kept a finished 2-GPU case waiting for the pool's 900 s timeout); every result is on disk by now
    if not destroy_group(timeout=10.0):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def rank_main(spec: Path, out: Path, rank: int, world: int, master: str, device: str, dtype: str) -> None:
    try:
        run(spec, out, rank, world, master, device, dtype)
    except Exception:  # noqa: BLE001 - the test prints this
        print(f"rank {rank} failed:", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("spec", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--master", required=True)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = p.parse_args()
    import multiprocessing

    import diffusers

    import denoiser_svc.worker  # noqa: F401 - imported once, before forking
    from services.registry import load_adapter

    for ckpt in {case["checkpoint"] for case in torch.load(args.spec, weights_only=False)["cases"]}:
        adapter = load_adapter(ckpt)  # diffusers imports its pipeline and model modules lazily: do it here, once
        getattr(diffusers, adapter.model_index["_class_name"])
        getattr(diffusers, adapter.component_config("transformer")["_class_name"])

    torch.set_num_threads(1)  # N ranks share the CI machine's cores: no oversubscription
    ctx = multiprocessing.get_context("spawn" if args.device == "cuda" else "fork")
    ranks = [ctx.Process(target=rank_main, args=(args.spec, args.out, r, args.world_size, args.master, args.device,
                                                 args.dtype))
             for r in range(args.world_size)]
    for proc in ranks:
        proc.start()
    codes = []
    for proc in ranks:
        proc.join()
        codes.append(proc.exitcode)
        if proc.exitcode != 0:  # the others would wait forever on the failed rank's collectives
            for other in ranks:
                if other.is_alive():
                    other.kill()
    print(f"rank exit codes: {codes}", flush=True)
    return 0 if all(code == 0 for code in codes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
