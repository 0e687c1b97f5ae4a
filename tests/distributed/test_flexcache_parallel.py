"""FlexCache composes with every parallel layout: ``chitu serve denoiser`` with CFG parallel, Ulysses, Ring and
Ulysses x CFG launches its own rank processes (the multi-process executor: rank 0 speaks gRPC and broadcasts each
request, every rank runs its own cache session), and every cached request returns what the cached request returns
in one process, with the same hit pattern on every rank. Flux (one branch) covers Ulysses and Ring, true-CFG Flux
(TeaCache deciding for both branches across the CFG group) covers CFG parallel, Wan covers Ulysses x CFG. FLUX.2-klein
(Ulysses, Ring) has its joint single-stream sequence split at each rank's text shard; Z-Image (Ulysses, Ring; both
CFG branches on each rank: the probe pass) shards its unified image+caption sequence, whose image tokens, the only
ones the metrics read, end inside the second rank's shard, before its pad and caption tokens.

Why they must agree: every value-dependent decision (TeaCache, First-Block, DBCache, MagCache) is taken on partial
sums reduced over the sequence-parallel and CFG groups (float64, padding left out), so all ranks, and both CFG
branches, take the same branch of the forward; schedule-based strategies decide from the step index alone. A rank
that decided differently would diverge, or hang in a collective that its peers skip (PAB and MeanCache skip
all-to-alls and gathers).

Tolerance: float32, <= 1e-5 relative on the final latents, as for the uncached group (sharding only reorders
floating-point sums inside attention; see test_group_exactness.py). The settings of ``REAL`` (``real``) keep every
decision far from its threshold compared with that rounding, so the hit patterns must be identical. Job sizes give
15 image tokens (and 15 text tokens for Flux and FLUX.2), so sequence shards are padded on every sequence-parallel
layout; Z-Image's unified sequence is a multiple of 32 (it pads each part itself), never padded at degree 2, so its
job is larger: 60 image tokens (4 pad tokens), 15 caption tokens (17 pad tokens), 48 tokens per rank.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
import yaml

from denoiser_svc.cache import policy_to_proto
from denoiser_svc.types import DenoiseJob
from services import codec
from services.proto.chitu.v1 import denoiser_pb2, denoiser_pb2_grpc
from tests.flexcache_cases import REAL, deep_checkpoint, make_job, make_worker, real, run_job
from tests.reference import rel_err

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-5
LAYOUTS = {
    "flux-ulysses2": ("flux", {"ulysses_degree": 2}),
    "flux-ring2": ("flux", {"ring_degree": 2}),
    "flux_cfg-cfg2": ("flux_cfg", {"cfg_degree": 2}),
    "wan-cfg2-ulysses2": ("wan", {"cfg_degree": 2, "ulysses_degree": 2}),
    "flux2_klein-ulysses2": ("flux2_klein", {"ulysses_degree": 2}),
    "flux2_klein-ring2": ("flux2_klein", {"ring_degree": 2}),
    "z_image-ulysses2": ("z_image", {"ulysses_degree": 2}),
    "z_image-ring2": ("z_image", {"ring_degree": 2}),
}
JOB_SHAPE = {"size": (48, 80), "frames": 1, "text_tokens": 15}
JOB_SHAPES = {"z_image": {**JOB_SHAPE, "size": (96, 160)}}
NO_TEACACHE = {"wan", "flux2_klein", "z_image"}
"""Families that refuse TeaCache (no fitted rescaling polynomial)."""


def strategies(family: str) -> list[str]:
    return [s for s in REAL if not (family in NO_TEACACHE and s == "teacache")]


def jobs(family: str, checkpoint: Path) -> list[DenoiseJob]:
    shape = JOB_SHAPES.get(family, JOB_SHAPE)
    return [make_job(checkpoint, s, real(family, s), request_id=f"{family}-{s}", **shape) for s in strategies(family)]


def to_request(job: DenoiseJob, model: str) -> denoiser_pb2.DenoiseRequest:
    p = job.params
    req = denoiser_pb2.DenoiseRequest(
        request_id=job.request_id, model=model, conditionings=codec.named_to_proto(job.conditionings),
        negative_conditionings=codec.named_to_proto(job.negative_conditionings), width=p.width, height=p.height,
        frames=p.frames, steps=p.steps, guidance_scale=p.guidance_scale, seed=p.seed)
    assert job.cache is not None
    req.cache.CopyFrom(policy_to_proto(job.cache))
    return req


class Group:
    """``chitu serve denoiser`` with a parallel layout, in its own process group (with the ranks it launches)."""

    def __init__(self, workdir: Path, checkpoint: Path, layout: dict[str, int]):
        workdir.mkdir(parents=True, exist_ok=True)
        self.ready, self.log_path = workdir / "ready", workdir / "denoiser.log"
        config = {"server": {"port": 0, "ready_file": str(self.ready)}, "warmup": False, "parallel": layout,
                  "model": {"name": "m", "checkpoint": str(checkpoint), "device": "cpu", "dtype": "float32"}}
        (workdir / "denoiser.yaml").write_text(yaml.safe_dump(config))
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "clients.cli", "serve", "denoiser", "--config",
                                      str(workdir / "denoiser.yaml")], cwd=REPO, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 300.0) -> str:
        deadline = time.monotonic() + timeout
        while not self.ready.is_file():
            assert self.proc.poll() is None, f"denoiser exited {self.proc.returncode}:\n{self.tail()}"
            assert time.monotonic() < deadline, f"denoiser not ready after {timeout}s:\n{self.tail()}"
            time.sleep(0.05)
        return self.ready.read_text().strip()

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def summaries(self) -> dict[tuple[str, str], dict]:
        """(service, request id) -> the ``flexcache_summary`` log line of that rank (rank 0 is ``denoiser``,
        rank r ``denoiser-rank{r}``)."""
        out = {}
        for line in self.log_path.read_text(errors="replace").splitlines():
            if '"flexcache_summary"' in line and line.startswith("{"):
                event = json.loads(line)
                out[(event["service"], event["request_id"])] = event
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # nothing it launched may outlive the test
        self._log.close()


def denoise(address: str, request: denoiser_pb2.DenoiseRequest) -> tuple[torch.Tensor, dict[str, str]]:
    assembler, metadata = codec.ChunkAssembler(), {}
    with grpc.insecure_channel(address) as channel:
        for msg in denoiser_pb2_grpc.DenoiserServiceStub(channel).Denoise(request, timeout=180):
            kind = msg.WhichOneof("event")
            if kind == "latents_chunk":
                assembler.add(msg.latents_chunk)
            elif kind == "summary":
                metadata = dict(msg.summary.metadata)
    return assembler.tensor(), metadata


@pytest.fixture(scope="module")
def single_process(checkpoints_dir: Path) -> dict[str, tuple[torch.Tensor, dict[str, str]]]:
    """Request id -> (latents, metadata) of each cached job in one process."""
    out = {}
    for family in sorted({family for family, _ in LAYOUTS.values()}):
        ckpt = deep_checkpoint(family, checkpoints_dir)
        worker = make_worker(ckpt)
        for job in jobs(family, ckpt):
            done = run_job(worker, job)
            out[job.request_id] = (done.latents, done.metadata)
    return out


@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_cached_group_equals_cached_single_process(layout_name: str, checkpoints_dir: Path, tmp_path: Path,
                                                   single_process) -> None:
    family, layout = LAYOUTS[layout_name]
    ckpt = deep_checkpoint(family, checkpoints_dir)
    world = layout.get("cfg_degree", 1) * layout.get("ulysses_degree", 1) * layout.get("ring_degree", 1)
    group = Group(tmp_path / layout_name, ckpt, layout)
    failures, report = [], []
    try:
        address = group.wait_ready()
        results = {job.request_id: denoise(address, to_request(job, "m")) for job in jobs(family, ckpt)}
        # every rank logs its summary when it releases the request, which ranks 1..N-1 may do just after rank 0
        # has answered: wait for all of them before stopping the group (a stop would cut the last lines off)
        expected = {("denoiser" if r == 0 else f"denoiser-rank{r}", rid) for r in range(world) for rid in results}
        deadline = time.monotonic() + 30
        while not expected <= set(group.summaries()) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        group.stop()
    summaries = group.summaries()
    for rid, (latents, metadata) in results.items():
        ref_latents, ref_md = single_process[rid]
        err = rel_err(latents, ref_latents)
        report.append(f"{layout_name} {rid}: rel err {err:.2e}, pattern {metadata.get('cache.pattern')}")
        if not err <= TOLERANCE:
            failures.append(f"{rid}: rel err {err:.2e} > {TOLERANCE}")
        if "H" not in ref_md["cache.pattern"]:
            failures.append(f"{rid}: the single-process run skipped nothing ({ref_md['cache.pattern']})")
        for key in ("cache.pattern", "cache.skipped_per_step", "cache.skipped_fraction"):
            if metadata.get(key) != ref_md[key]:
                failures.append(f"{rid}: rank 0 {key}={metadata.get(key)}, one process {ref_md[key]}")
        for rank in range(world):
            service = "denoiser" if rank == 0 else f"denoiser-rank{rank}"
            line = summaries.get((service, rid))
            if line is None or line["pattern"] != ref_md["cache.pattern"]:
                failures.append(f"{rid}: rank {rank} hit pattern {line and line['pattern']}, one process "
                                f"{ref_md['cache.pattern']}")
    print("\n".join(report))
    assert not failures, "\n".join(failures + report + [group.tail()[-2000:]])
