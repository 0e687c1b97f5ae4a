"""FlexCache through the running services (real processes on loopback ports): the cache policy travels from the
client through the orchestrator to the denoiser; bad policies become INVALID_ARGUMENT naming the field and the
allowed values; the accounting reaches the result, the sidecar JSON and the logs; a cancelled or failed cached
request leaves no state behind."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
import yaml

from clients.cache import cache_policy
from clients.client import ChituClient, GenerateOptions
from denoiser_svc.cache import policy_from_proto
from denoiser_svc.types import DenoiseJob
from services import codec
from services.families.base import SamplingParams
from services.proto.chitu.v1 import (
    cache_pb2,
    denoiser_pb2,
    denoiser_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
)
from tests.flexcache_cases import make_worker, run_job
from tests.reference import rel_err

pytestmark = pytest.mark.e2e

PROMPT = "a large red circle on the left, on a blue background"


def test_cli_generate_with_cache_reports_accounting(flux_stack, tmp_path: Path) -> None:
    """`chitu generate --cache`: the result's metadata, the sidecar's timings and the denoiser's log carry the
    fraction of transformer compute skipped (per step and total) and the cache memory."""
    cmd = [sys.executable, "-m", "clients.cli", "generate", PROMPT, "--model", "tiny-flux", "--server",
           flux_stack.address, "--width", "64", "--height", "48", "--steps", "8", "--seed", "3",
           "--cache", "meancache:fresh_fraction=0.5", "--output", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    sidecar = json.loads(Path(proc.stdout.strip().splitlines()[-1]).with_suffix(".json").read_text())
    md, cache = sidecar["metadata"], sidecar["timings"]["cache"]
    assert md["cache.strategy"] == cache["strategy"] == "meancache"
    assert len(cache["skipped_per_step"]) == len(cache["pattern"]) == 8 and cache["pattern"].count("H") == 4
    assert cache["skipped_fraction"] == pytest.approx(sum(cache["skipped_per_step"]) / 8, abs=1e-4) == 0.5
    assert cache["memory_bytes"] > 0
    log = flux_stack.service("denoiser").log_path.read_text()
    lines = [json.loads(x) for x in log.splitlines() if '"flexcache_summary"' in x]
    mine = [x for x in lines if x.get("request_id") == sidecar["request_id"]]
    assert mine and mine[-1]["skipped_fraction"] == "0.5000" and mine[-1]["pattern"] == cache["pattern"]


def _unknown_strategy() -> cache_pb2.CachePolicy:
    """A policy from a newer client: its strategy (oneof field 99) is unknown to this server."""
    return cache_pb2.CachePolicy.FromString(bytes([0xFA, 0x06, 0x00]))  # field 99, length-delimited, empty


BAD = [
    ("empty", cache_pb2.CachePolicy(), ["cache.strategy", "allowed", "teacache", "dbcache", "pab"]),
    ("unknown", _unknown_strategy(), ["cache.strategy", "allowed", "meancache"]),
    ("range", cache_policy({"strategy": "teacache", "threshold": 7}), ["cache.teacache.threshold=7", "[0, 5]"]),
    ("nan", cache_policy({"strategy": "magcache", "threshold": float("nan")}), ["cache.magcache.threshold=nan"]),
    ("blocks", cache_policy({"strategy": "dbcache", "front_blocks": 2, "back_blocks": 1}),
     ["front_blocks=2", "back_blocks=1", "3 blocks", "<= 2"]),
    ("window", cache_policy({"strategy": "pab", "start_fraction": 0.6, "end_fraction": 0.5}),
     ["cache.pab.end_fraction=0.5", "start_fraction"]),
]


@pytest.mark.parametrize(("name", "policy", "needles"), BAD, ids=[b[0] for b in BAD])
def test_bad_cache_policy_is_invalid_argument(flux_stack, name: str, policy: cache_pb2.CachePolicy,
                                              needles: list[str]) -> None:
    req = generation_pb2.GenerateRequest(model="tiny-flux", prompt="a red circle", width=32, height=32, steps=2,
                                         cache=policy)
    events = []
    with grpc.insecure_channel(flux_stack.address) as ch, pytest.raises(grpc.RpcError) as info:
        for ev in generation_pb2_grpc.GenerationServiceStub(ch).Generate(req, timeout=60):
            events.append(ev)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    if name != "blocks":  # block counts are checked by the denoiser against its transformer's structure
        assert events == [], "a bad policy must be refused before any stage works on the request"
    assert all(n in info.value.details() for n in needles), info.value.details()
    with ChituClient(flux_stack.address) as c:  # the stack keeps serving
        result = c.generate_result("a small green star", "tiny-flux", GenerateOptions(
            width=32, height=32, steps=3, seed=1, cache="first_block"), timeout=60)
    assert result.artifacts and result.metadata["cache.strategy"] == "first_block"


@pytest.fixture(scope="module")
def wan_denoiser(tiny_wan: Path, tmp_path_factory: pytest.TempPathFactory):
    """A Wan denoiser service on its own (the family that cannot use TeaCache)."""
    work = tmp_path_factory.mktemp("wan-denoiser")
    ready = work / "ready"
    cfg = work / "denoiser.yaml"
    cfg.write_text(yaml.safe_dump({"server": {"port": 0, "ready_file": str(ready)}, "warmup": False,
                                   "model": {"name": "tiny-wan", "checkpoint": str(tiny_wan), "device": "cpu",
                                             "dtype": "float32"}}))
    log = open(work / "denoiser.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "clients.cli", "serve", "denoiser", "--config", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while not ready.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, (work / "denoiser.log").read_text()[-3000:]
        time.sleep(0.1)
    yield ready.read_text().strip()
    proc.terminate()
    proc.wait(timeout=60)
    log.close()


def _wan_request(policy: cache_pb2.CachePolicy | None) -> denoiser_pb2.DenoiseRequest:
    gen = torch.Generator("cpu").manual_seed(0)
    embeds = [torch.randn(1, 8, 32, generator=gen) for _ in range(2)]
    req = denoiser_pb2.DenoiseRequest(
        model="tiny-wan", width=32, height=32, frames=5, steps=4, guidance_scale=5.0, seed=1,
        conditionings=codec.named_to_proto({"prompt_embeds": embeds[0]}, 1 << 30),
        negative_conditionings=codec.named_to_proto({"prompt_embeds": embeds[1]}, 1 << 30))
    if policy is not None:
        req.cache.CopyFrom(policy)
    return req


def _denoise(address: str, req: denoiser_pb2.DenoiseRequest) -> tuple[torch.Tensor, dict[str, str]]:
    assembler = codec.ChunkAssembler()
    metadata: dict[str, str] = {}
    with grpc.insecure_channel(address) as ch:
        for resp in denoiser_pb2_grpc.DenoiserServiceStub(ch).Denoise(req, timeout=120):
            if resp.WhichOneof("event") == "latents_chunk":
                assembler.add(resp.latents_chunk)
            elif resp.WhichOneof("event") == "summary":
                metadata = dict(resp.summary.metadata)
    return assembler.tensor(), metadata


def test_strategy_the_family_cannot_use_is_invalid_argument(wan_denoiser: str) -> None:
    with grpc.insecure_channel(wan_denoiser) as ch, pytest.raises(grpc.RpcError) as info:
        list(denoiser_pb2_grpc.DenoiserServiceStub(ch).Denoise(_wan_request(cache_policy("teacache")), timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details()
    assert "cache.teacache" in details and "the wan family cannot use teacache" in details
    assert "allowed for this model: ['first_block', 'magcache', 'meancache'" in details, details
    latents, md = _denoise(wan_denoiser, _wan_request(cache_policy("first_block")))  # still serving
    assert latents.numel() and md["cache.strategy"] == "first_block" and len(md["cache.pattern"]) == 4


def _counts(address: str) -> dict[str, str]:
    with grpc.insecure_channel(address) as ch:
        return dict(denoiser_pb2_grpc.DenoiserServiceStub(ch).GetDenoiserInfo(
            denoiser_pb2.GetDenoiserInfoRequest(), timeout=10).info.metadata)


def test_cancelled_and_failed_cached_requests_leave_no_state(flux_stack, tiny_flux: Path) -> None:
    """A cached request cancelled mid-run and one refused when admitted (its prompt embeddings have the wrong width:
INVALID_ARGUMENT from the adapter's prepare, after the engine queued it) are dropped with their cache state:
    the next request with the same strategy equals the same request on a fresh worker (this test process).
    Tolerance: <= 1e-6 relative, bitwise-identical hit pattern; the service runs the same kernels, only possibly
    with another CPU thread split of the GEMMs."""
    address = flux_stack.service("denoiser").address
    policy = cache_policy({"strategy": "first_block", "threshold": 0.3})
    gen = torch.Generator("cpu").manual_seed(4)
    conds = {"prompt_embeds": torch.randn(1, 16, 32, generator=gen), "pooled_prompt_embeds": torch.randn(1, 32, generator=gen)}
    wire = codec.named_to_proto(conds, 1 << 30)
    before = int(_counts(address)["cancelled_requests"])
    long = denoiser_pb2.DenoiseRequest(request_id="long", model="tiny-flux", conditionings=wire, width=256, height=256,
                                       steps=1000, guidance_scale=3.5, seed=2, cache=policy)
    with grpc.insecure_channel(address) as ch:
        call = denoiser_pb2_grpc.DenoiserServiceStub(ch).Denoise(long, timeout=300)
        for resp in call:
            if resp.WhichOneof("event") == "progress" and resp.progress.step >= 3:
                call.cancel()
                break
    deadline = time.monotonic() + 60
    while not (_counts(address)["active_requests"] == "0" and int(_counts(address)["cancelled_requests"]) > before):
        assert time.monotonic() < deadline, _counts(address)
        time.sleep(0.05)
    bad = {"prompt_embeds": torch.randn(1, 16, 7), "pooled_prompt_embeds": conds["pooled_prompt_embeds"]}
    failing = denoiser_pb2.DenoiseRequest(request_id="bad", model="tiny-flux", width=64, height=48, steps=6,
                                          guidance_scale=3.5, seed=2, cache=policy,
                                          conditionings=codec.named_to_proto(bad, 1 << 30))
    failed_before = int(_counts(address)["failed_requests"])
    with pytest.raises(grpc.RpcError) as err:  # queued by the engine, refused by prepare: a status that says what to fix
        _denoise(address, failing)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert "conditionings['prompt_embeds'] has shape [1, 16, 7]; expected [1, L, 32]" in err.value.details()
    assert int(_counts(address)["failed_requests"]) == failed_before + 1
    req = denoiser_pb2.DenoiseRequest(request_id="next", model="tiny-flux", conditionings=wire, width=64, height=48,
                                      steps=8, guidance_scale=3.5, seed=2, cache=policy)
    latents, md = _denoise(address, req)
    fresh = run_job(make_worker(tiny_flux), DenoiseJob(
        request_id="fresh", params=SamplingParams(width=64, height=48, steps=8, guidance_scale=3.5, seed=2),
        conditionings=conds, start_step=0, end_step=8, cache=policy_from_proto(policy)))
    assert md["cache.pattern"] == fresh.metadata["cache.pattern"] and "H" in md["cache.pattern"]
    assert rel_err(latents, fresh.latents) <= 1e-6
