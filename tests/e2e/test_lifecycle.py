"""Health, draining, stage failures and deadlines, against real service processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.client import ChituClient, GenerateOptions
from clients.stack import LocalStack, StackConfig
from services.proto.chitu.v1 import denoiser_pb2, denoiser_pb2_grpc
from tests.net import free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tiny_flux: Path, tmp_path_factory: pytest.TempPathFactory):
    """A private stack: these tests kill and restart its services."""
    cfg = StackConfig(checkpoints={"tiny-flux": str(tiny_flux)}, listen="127.0.0.1:0", device="cpu", dtype="float32",
                      stage_overrides={"orchestrator": ["health_interval_seconds=0.2"]})
    s = LocalStack(cfg, workdir=tmp_path_factory.mktemp("lifecycle"))
    s.start()
    yield s
    s.stop()


def _health(address: str, service: str = "") -> int | None:
    with grpc.insecure_channel(address) as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status
        except grpc.RpcError:
            return None


def _wait_for(predicate, timeout: float = 20.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def _denoiser_counts(address: str) -> dict[str, str]:
    with grpc.insecure_channel(address) as ch:
        info = denoiser_pb2_grpc.DenoiserServiceStub(ch).GetDenoiserInfo(denoiser_pb2.GetDenoiserInfoRequest(),
                                                                          timeout=5).info
    return dict(info.metadata)


def test_health_not_serving_while_loading(tiny_flux: Path, tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "enc.yaml"
    cfg.write_text(yaml.safe_dump({"server": {"port": port}, "model": {"checkpoint": str(tiny_flux), "device": "cpu"}}))
    proc = subprocess.Popen([sys.executable, "-m", "clients.cli", "serve", "encoder", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: list[int] = []
    try:
        address = f"127.0.0.1:{port}"

        def poll() -> bool:
            status = _health(address, "chitu.v1.TextEncoderService")
            if status is not None and (not seen or seen[-1] != status):
                seen.append(status)
            return status == health_pb2.HealthCheckResponse.SERVING

        assert _wait_for(poll, timeout=60, interval=0.01), f"never SERVING; saw {seen}"
        assert seen[0] == health_pb2.HealthCheckResponse.NOT_SERVING, seen
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_stage_down_is_unavailable_naming_stage_then_recovers(stack: LocalStack) -> None:
    vae = stack.service("vae")
    stack.kill(vae)
    with ChituClient(stack.address) as c, pytest.raises(grpc.RpcError) as info:
        c.generate_result("a red circle", "tiny-flux", GenerateOptions(width=32, height=32, steps=2), timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "vae stage" in info.value.details() and vae.address in info.value.details()
    # the orchestrator's health follows its stages
    assert _wait_for(lambda: _health(stack.address) == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=10)
    stack.restart(vae)
    assert _wait_for(lambda: _health(stack.address) == health_pb2.HealthCheckResponse.SERVING, timeout=20)
    with ChituClient(stack.address) as c:
        result = c.generate_result("a red circle", "tiny-flux", GenerateOptions(width=32, height=32, steps=2),
                                   timeout=30)
    assert result.artifacts


def test_deadline_exceeded_and_denoiser_stops_working(stack: LocalStack) -> None:
    den = stack.service("denoiser").address
    before = int(_denoiser_counts(den)["cancelled_requests"])
    with ChituClient(stack.address) as c:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            c.generate_result("a red circle", "tiny-flux", GenerateOptions(width=512, height=512, steps=1000, seed=1),
                              timeout=2.0)
        assert time.monotonic() - t0 < 10
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    def stopped() -> bool:
        counts = _denoiser_counts(den)
        return counts["active_requests"] == "0" and int(counts["cancelled_requests"]) > before

    assert _wait_for(stopped, timeout=10), _denoiser_counts(den)
    with ChituClient(stack.address) as c:
        assert c.generate_result("a red circle", "tiny-flux", GenerateOptions(width=32, height=32, steps=2),
                                 timeout=30).artifacts


def test_sigterm_drains_in_flight_request(stack: LocalStack) -> None:
    den = stack.service("denoiser")
    results: dict[str, object] = {}
    started = threading.Event()

    def run() -> None:
        try:
            with ChituClient(stack.address) as c:
                for ev in c.generate("a red circle", "tiny-flux", GenerateOptions(width=256, height=256, steps=60,
                                                                                      seed=2), timeout=120):
                    if ev.HasField("step"):
                        started.set()
                    if ev.HasField("result"):
                        results["result"] = ev.result
        except grpc.RpcError as exc:
            results["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    assert started.wait(60), "the request never started denoising"
    assert den.process is not None
    den.process.send_signal(signal.SIGTERM)
    # while draining, new work is refused
    time.sleep(0.2)
    with grpc.insecure_channel(den.address) as ch, pytest.raises(grpc.RpcError) as info:
        list(denoiser_pb2_grpc.DenoiserServiceStub(ch).Denoise(denoiser_pb2.DenoiseRequest(model="tiny-flux"),
                                                                timeout=5))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # refused by a draining server, not a dead one: the process is still up, finishing the request in flight
    assert den.process.poll() is None and "result" not in results, "the denoiser was gone, not draining"
    worker.join(120)
    assert "error" not in results, results.get("error")
    assert results["result"].steps == 60 and results["result"].artifacts
    assert den.process.wait(timeout=30) == 0
    stack.restart(den)
    assert _wait_for(lambda: _health(stack.address) == health_pb2.HealthCheckResponse.SERVING, timeout=20)
    with ChituClient(stack.address) as c:
        assert c.generate_result("a red circle", "tiny-flux", GenerateOptions(width=32, height=32, steps=2),
                                 timeout=30).artifacts
