"""The denoiser group behind the real service: ``chitu serve denoiser`` with a parallel layout launches its own rank
processes (rank 0 speaks gRPC), and a Denoise RPC returns what one process computes. A rank that dies mid-request
makes the in-flight request fail with UNAVAILABLE (no hang), the group report NOT_SERVING, and the process exit
non-zero (so that Kubernetes restarts it).

Tolerance: float32, <= 1e-5 relative on the latents (see test_group_exactness.py for why).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from denoiser_svc.types import DenoiseJob
from services import codec
from services.proto.chitu.v1 import denoiser_pb2, denoiser_pb2_grpc
from services.registry import load_adapter
from tests.distributed.cases import REPO, build_checkpoint, make_job, reference
from tests.reference import rel_err

pytestmark = pytest.mark.distributed

SERVICE = "chitu.v1.DenoiserService"


class DenoiserProcess:
    """``chitu serve denoiser`` as its own process group (the rank processes it launches live in it too)."""

    def __init__(self, workdir: Path, checkpoint: Path, overrides: dict):
        workdir.mkdir(parents=True, exist_ok=True)
        self.ready = workdir / "ready"
        self.log_path = workdir / "denoiser.log"
        overrides = dict(overrides)
        server = {"port": 0, "ready_file": str(self.ready), "grace_seconds": 5, **overrides.pop("server", {})}
        config = {"server": server, "model": {"checkpoint": str(checkpoint), "device": "cpu", "dtype": "float32"},
                  **overrides}
        path = workdir / "denoiser.yaml"
        path.write_text(yaml.safe_dump(config))
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "clients.cli", "serve", "denoiser", "--config", str(path)],
                                     cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.address = ""

    def wait_ready(self, timeout: float = 240.0) -> str:
        deadline = time.monotonic() + timeout
        while not self.ready.is_file():
            if self.proc.poll() is not None:
                raise RuntimeError(f"denoiser exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"denoiser not SERVING after {timeout}s:\n{self.tail()}")
            time.sleep(0.05)
        self.address = self.ready.read_text().strip()
        return self.address

    def tail(self, n: int = 8000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # ranks it launched are in its process group: nothing may outlive the test
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


def to_request(job: DenoiseJob, model: str) -> denoiser_pb2.DenoiseRequest:
    p = job.params
    return denoiser_pb2.DenoiseRequest(
        request_id=job.request_id, model=model, conditionings=codec.named_to_proto(job.conditionings),
        negative_conditionings=codec.named_to_proto(job.negative_conditionings), width=p.width, height=p.height,
        frames=p.frames, steps=p.steps, guidance_scale=p.guidance_scale, seed=p.seed, start_step=job.start_step,
        end_step=job.end_step)


def denoise(address: str, request: denoiser_pb2.DenoiseRequest, on_step=None, timeout: float = 120) -> torch.Tensor:
    assembler = codec.ChunkAssembler()
    with grpc.insecure_channel(address) as channel:
        for msg in denoiser_pb2_grpc.DenoiserServiceStub(channel).Denoise(request, timeout=timeout):
            kind = msg.WhichOneof("event")
            if kind == "progress" and on_step is not None:
                on_step(msg.progress.step)
            elif kind == "latents_chunk":
                assembler.add(msg.latents_chunk)
    return assembler.tensor()


def info(address: str) -> dict[str, str]:
    with grpc.insecure_channel(address) as channel:
        resp = denoiser_pb2_grpc.DenoiserServiceStub(channel).GetDenoiserInfo(denoiser_pb2.GetDenoiserInfoRequest(),
                                                                              timeout=10)
    return dict(resp.info.metadata)


def health(address: str) -> int | None:
    with grpc.insecure_channel(address) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE),
                                                             timeout=1).status
        except grpc.RpcError:
            return None


def test_flux_group_of_four_serves_what_one_process_computes(checkpoints_dir: Path, tmp_path: Path) -> None:
    """Ulysses 2 x Ring 2 over 4 rank processes, warmed up at start, two requests interleaved step by step
    (round robin) on the resident group: each equals its single-process result."""
    ckpt = build_checkpoint("flux", checkpoints_dir)
    adapter = load_adapter(ckpt)
    jobs = [make_job(adapter, "first"), make_job(adapter, "second")]
    jobs[1].params = type(jobs[1].params)(**{**jobs[1].params.__dict__, "seed": 11, "width": 64})
    group = DenoiserProcess(tmp_path / "group", ckpt, {
        "parallel": {"ulysses_degree": 2, "ring_degree": 2},
        "engine": {"max_active_requests": 2, "policy": "round_robin"}})
    try:
        address = group.wait_ready()
        facts = info(address)
        assert facts["world_size"] == "4" and facts["parallel_layout"] == "cfg1-ring2-ulysses2", facts
        assert len(facts["worker_pids"].split(",")) == 3, facts
        results: dict[str, torch.Tensor | BaseException] = {}

        def run(job: DenoiseJob) -> None:
            try:
                results[job.request_id] = denoise(address, to_request(job, ckpt.name))
            except BaseException as exc:  # noqa: BLE001 - reported below
                results[job.request_id] = exc

        threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        for job in jobs:
            got = results[job.request_id]
            assert isinstance(got, torch.Tensor), f"{job.request_id}: {got!r}\n{group.tail()}"
            err = rel_err(got, reference(ckpt, job))
            assert err <= 1e-5, f"{job.request_id}: rel err {err:.2e}"
    finally:
        group.stop()


def test_dead_rank_fails_requests_unavailable_and_group_exits(checkpoints_dir: Path, tmp_path: Path) -> None:
    """A CFG-parallel Wan group of two: one request completes exactly; then rank 1 is killed during a long request."""
    ckpt = build_checkpoint("wan", checkpoints_dir)
    adapter = load_adapter(ckpt)
    job = make_job(adapter, "exact")
    group = DenoiserProcess(tmp_path / "group", ckpt, {
        "parallel": {"cfg_degree": 2, "failure_linger_seconds": 3.0}, "warmup": False})
    try:
        address = group.wait_ready()
        err = rel_err(denoise(address, to_request(job, ckpt.name)), reference(ckpt, job))
        assert err <= 1e-5, f"rel err {err:.2e}"

        worker_pid = int(info(address)["worker_pids"])
        long = to_request(make_job(adapter, "long"), ckpt.name)
        long.steps, long.end_step = 1000, 1000
        started = threading.Event()
        outcome: dict[str, object] = {}

        def run() -> None:
            try:
                denoise(address, long, on_step=lambda s: started.set(), timeout=120)
                outcome["result"] = "completed"
            except grpc.RpcError as exc:
                outcome["code"], outcome["details"] = exc.code(), exc.details()
            finally:
                started.set()

        client = threading.Thread(target=run)
        client.start()
        assert started.wait(60) and not outcome, f"the long request never started: {outcome}\n{group.tail()}"
        killed_at = time.monotonic()
        os.kill(worker_pid, signal.SIGKILL)
        client.join(30)
        assert not client.is_alive(), "the in-flight request hung after a rank died"
        assert outcome.get("code") == grpc.StatusCode.UNAVAILABLE, (outcome, group.tail())
        assert "rank 1" in str(outcome.get("details")), outcome
        assert time.monotonic() - killed_at < 15
        # NOT_SERVING while it lingers, and new requests are refused with UNAVAILABLE
        assert health(address) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as refused:
            denoise(address, to_request(job, ckpt.name), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # then the group exits non-zero (its supervisor restarts it)
        assert group.proc.wait(timeout=60) != 0, group.tail()
    finally:
        group.stop()
