"""How the ranks of a denoiser group find each other, start, and notice each other's death.

Two launchers:

- self-launched (one machine): ``chitu serve denoiser`` is rank 0; it hosts the rendezvous store and starts ranks
  1..N-1 as ``python -m denoiser_svc.parallel.worker_main`` child processes (same process group, so a signal to the
  group reaches them all);
- torchrun (several machines): torchrun starts every rank and sets its launcher protocol variables (RANK,
  WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); rank 0 serves gRPC, the others run the worker loop. These
  variables say *who this process is*, not what it should do: the layout still comes from the config.

Liveness: every rank bumps a counter in the rendezvous store each ``heartbeat_seconds`` (on a thread of its own,
through its own store connection). Rank 0 watches every counter (and its children's exit codes); a worker watches
rank 0's. A counter that stops moving for ``heartbeat_timeout_seconds``, or a store that stops answering, means a
dead peer: rank 0 fails the group (UNAVAILABLE, NOT_SERVING, exit non-zero), a worker exits at once.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from denoiser_svc.config import ParallelConfig
from denoiser_svc.parallel.groups import ParallelGroups
from services.log import get_logger

log = get_logger(__name__)

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""torchrun's launcher protocol."""
HEARTBEAT_KEY = "chitu/heartbeat/{rank}"


@dataclass
class Rendezvous:
    """Who this process is in its group and where the group meets."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: Literal["self", "torchrun"] = "self"
    store: dist.Store | None = None
    """Rank 0 of a self-launched group: the store it hosts (others connect to master_addr:master_port)."""

    @classmethod
    def from_torchrun(cls, env: Mapping[str, str] | None = None) -> Rendezvous | None:
        """The rendezvous torchrun describes in its launcher variables, or None when not run by torchrun."""
        env = os.environ if env is None else env
        if not all(name in env for name in TORCHRUN_VARS):
            return None
        return cls(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]), local_rank=int(env["LOCAL_RANK"]),
                   master_addr=env["MASTER_ADDR"], master_port=int(env["MASTER_PORT"]), launcher="torchrun")

    @classmethod
    def host(cls, config: ParallelConfig) -> Rendezvous:
        """Rank 0 of a self-launched group: start the store (on ``master_port``, or a free one)."""
        store = dist.TCPStore(config.master_addr, config.master_port, config.world_size, is_master=True,
                              wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=config.start_timeout_seconds))
        return cls(rank=0, world_size=config.world_size, local_rank=0, master_addr=config.master_addr,
                   master_port=store.port, launcher="self", store=store)


def compute_backend(config: ParallelConfig, device: torch.device) -> str:
    if config.backend != "auto":
        return config.backend
    return "nccl" if device.type == "cuda" else "gloo"


def local_device(device: torch.device, rdv: Rendezvous) -> torch.device:
    """The device of a rank: its local GPU (``cuda:LOCAL_RANK``), or the CPU."""
    if device.type != "cuda":
        return device
    if rdv.local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"rank {rdv.rank} has local rank {rdv.local_rank} but this machine shows "
                           f"{torch.cuda.device_count()} GPUs")
    return torch.device("cuda", rdv.local_rank)


def init_group(config: ParallelConfig, rdv: Rendezvous, device: torch.device) -> ParallelGroups:
    """Join the torch.distributed group and build every process group of the layout."""
    backend = compute_backend(config, device)
    timeout = datetime.timedelta(seconds=config.start_timeout_seconds)
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    if rdv.launcher == "torchrun":
        dist.init_process_group(backend, init_method="env://", rank=rdv.rank, world_size=rdv.world_size,
                                timeout=timeout, **kwargs)
    else:
        store = rdv.store or dist.TCPStore(rdv.master_addr, rdv.master_port, rdv.world_size, is_master=False,
                                           timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rdv.rank, world_size=rdv.world_size, timeout=timeout,
                                **kwargs)
    groups = ParallelGroups.build(config, rdv.rank, backend)
    log.info("group_joined", rank=rdv.rank, world_size=rdv.world_size, backend=backend, groups=groups.describe())
    return groups


def spawn_workers(config_path: Path, rdv: Rendezvous) -> list[subprocess.Popen]:
    """Start ranks 1..N-1 of a self-launched group (they inherit stdout/stderr: one log stream per container)."""
    procs = []
    for rank in range(1, rdv.world_size):
        cmd = [sys.executable, "-m", "denoiser_svc.parallel.worker_main", "--config", str(config_path),
               "--rank", str(rank), "--world-size", str(rdv.world_size),
               "--master", f"{rdv.master_addr}:{rdv.master_port}"]
        procs.append(subprocess.Popen(cmd, cwd=str(Path(__file__).resolve().parents[2])))
    log.info("workers_started", pids=[p.pid for p in procs])
    return procs


class Heartbeat:
    """Publishes this rank's liveness and watches the ranks in ``watch`` (see module doc)."""

    def __init__(self, config: ParallelConfig, rdv: Rendezvous, watch: list[int], on_dead: Callable[[str], None]):
        self.config = config
        self.rdv = rdv
        self.watch = watch
        self.on_dead = on_dead
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-rank{rdv.rank}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        try:
            store = dist.TCPStore(self.rdv.master_addr, self.rdv.master_port, is_master=False,
                                  timeout=datetime.timedelta(seconds=self.config.heartbeat_timeout_seconds))
        except Exception as exc:  # noqa: BLE001
            self.on_dead(f"rank {self.rdv.rank} cannot reach the rendezvous store: {exc}")
            return
        last = {r: (-1, time.monotonic()) for r in self.watch}
        mine = HEARTBEAT_KEY.format(rank=self.rdv.rank)
        while not self._stop.is_set():
            try:
                store.add(mine, 1)
                now = time.monotonic()
                for r in self.watch:
                    value = store.add(HEARTBEAT_KEY.format(rank=r), 0)
                    if value != last[r][0]:
                        last[r] = (value, now)
                    elif now - last[r][1] > self.config.heartbeat_timeout_seconds:
                        self.on_dead(f"rank {r} sent no heartbeat for {now - last[r][1]:.0f} s")
                        return
            except Exception as exc:  # noqa: BLE001 - the store is gone: its host (rank 0 or torchrun) died
                if not self._stop.is_set():
                    self.on_dead(f"the rendezvous store stopped answering ({type(exc).__name__}: {exc})")
                return
            self._stop.wait(self.config.heartbeat_seconds)


def run_bounded(fn: Callable[[], object], timeout: float, name: str) -> bool:
    """Run ``fn`` in a daemon thread and wait at most ``timeout`` seconds; True when it returned (or raised: logged).
    For teardown calls that may never return (``destroy_process_group`` after NCCL ran inside CUDA graphs): the
    caller then leaves the process with ``os._exit`` instead of letting the interpreter wait for the call."""
    done = threading.Event()

    def target() -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - teardown: report and go on
            log.exception("teardown_call_failed", call=name)
        finally:
            done.set()

    threading.Thread(target=target, name=f"bounded-{name}", daemon=True).start()
    if done.wait(timeout):
        return True
    log.warning("teardown_call_timed_out", call=name, timeout_seconds=timeout)
    return False


def destroy_group(timeout: float) -> bool:
    """``destroy_process_group`` bounded by ``timeout`` (see ``run_bounded``); True when it finished."""
    if not dist.is_initialized():
        return True
    return run_bounded(dist.destroy_process_group, timeout, "destroy_process_group")
