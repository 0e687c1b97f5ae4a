"""Ranks 1..N-1 of a denoiser group: join the group, load and warm up like rank 0, then follow its messages.

Started by rank 0 (``python -m denoiser_svc.parallel.worker_main --config FILE --rank R --world-size N --master
HOST:PORT``) or, under torchrun, through ``chitu serve denoiser`` on every rank other than 0. Exit codes: 0 after
``Shutdown``; 1 after any error (its peers' collectives would no longer line up, so the group must restart) or when
rank 0 disappears (heartbeat).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from denoiser_svc.config import DenoiserServiceConfig
from denoiser_svc.parallel.control import ControlChannel, follow
from denoiser_svc.parallel.launch import Heartbeat, Rendezvous, destroy_group
from services.log import get_logger, setup_logging

log = get_logger(__name__)


def _leader_died(reason: str) -> None:
    log.error("worker_lost_rank0", reason=reason)
    # the main thread may be blocked in a collective that will never complete
    os._exit(1)


def run_worker(config: DenoiserServiceConfig, rdv: Rendezvous) -> int:
    from denoiser_svc.worker import Worker

    # The group's lifecycle belongs to rank 0: a SIGTERM/SIGINT sent to the whole process group (Ctrl-C, `chitu up`
    # stopping, torchrun) must let rank 0 drain its in-flight requests, which needs every rank until the end. Ranks
    # exit on rank 0's Shutdown message, or on their own when rank 0 disappears (heartbeat).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging(f"denoiser-rank{rdv.rank}", config.server.log_level, "")
    worker = Worker(config, rdv)
    try:
        worker.init_device()
        heartbeat = Heartbeat(config.parallel, rdv, [0], _leader_died)
        heartbeat.start()
        worker.load_model()
        if config.warmup:
            worker.compile_or_warm_up_model(worker.warmup_job())
        channel = ControlChannel(worker.groups.control)
        channel.barrier()
        log.info("worker_ready", rank=rdv.rank, device=str(worker.device))
        follow(worker, channel)
        heartbeat.stop()
    except Exception:  # noqa: BLE001 - a worker that cannot go on takes the group down (rank 0 sees the exit)
        log.exception("worker_failed", rank=rdv.rank)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    if not destroy_group(config.parallel.destroy_timeout_seconds):
        # the destroy is stuck in NCCL: leave without it (the interpreter would wait for it at exit)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def main(argv: list[str] | None = None) -> int:
    from services.config import load_config

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--master", required=True, help="HOST:PORT of rank 0's rendezvous store")
    args = p.parse_args(argv)
    config = load_config(DenoiserServiceConfig, args.config)
    host, port = args.master.rsplit(":", 1)
    rdv = Rendezvous(rank=args.rank, world_size=args.world_size, local_rank=args.rank, master_addr=host,
                     master_port=int(port), launcher="self")
    return run_worker(config, rdv)


if __name__ == "__main__":
    raise SystemExit(main())
