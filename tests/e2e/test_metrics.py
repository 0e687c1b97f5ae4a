"""Prometheus metrics of a real service process: RPC counters by status, latency, serving, queue depth."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from services.proto.chitu.v1 import encoder_pb2, encoder_pb2_grpc
from tests.net import free_port

pytestmark = pytest.mark.e2e


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_encoder_metrics(tiny_flux: Path, tmp_path: Path) -> None:
    grpc_port, metrics_port = free_port(), free_port()
    cfg = tmp_path / "enc.yaml"
    ready = tmp_path / "ready"
    cfg.write_text(yaml.safe_dump({"server": {"port": grpc_port, "metrics_port": metrics_port,
                                              "ready_file": str(ready)},
                                   "model": {"checkpoint": str(tiny_flux), "device": "cpu"}}))
    proc = subprocess.Popen([sys.executable, "-m", "clients.cli", "serve", "encoder", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "encoder did not start"
            time.sleep(0.05)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
            stub = encoder_pb2_grpc.TextEncoderServiceStub(ch)
            for _ in range(2):
                stub.Encode(encoder_pb2.EncodeRequest(model="tiny-flux", prompt="a red circle"), timeout=30)
            with pytest.raises(grpc.RpcError):
                stub.Encode(encoder_pb2.EncodeRequest(model="tiny-flux", prompt=""), timeout=30)
        m = _scrape(metrics_port)
        method = "/chitu.v1.TextEncoderService/Encode"
        assert m[f'chitu_rpc_requests_total{{code="OK",method="{method}",service="encoder"}}'] == 2
        assert m[f'chitu_rpc_requests_total{{code="INVALID_ARGUMENT",method="{method}",service="encoder"}}'] == 1
        assert m[f'chitu_rpc_seconds_count{{method="{method}",service="encoder"}}'] == 3
        assert m['chitu_serving{service="encoder"}'] == 1
        assert m['chitu_queue_depth{service="encoder"}'] == 0
        assert m['chitu_process_peak_rss_bytes{service="encoder"}'] > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_denoiser_metrics(tiny_flux: Path, tmp_path: Path) -> None:
    """The denoiser's own series: a histogram of step times, and the steps that compiled on a request's path (a
    compiled denoiser; the request's size is not the warm-up's, so its first step compiles: the gauge says 1, the
    info RPC too)."""
    from clients.client import ChituClient, GenerateOptions
    from clients.stack import LocalStack, StackConfig
    from services.proto.chitu.v1 import denoiser_pb2, denoiser_pb2_grpc

    metrics_port = free_port()
    cfg = StackConfig(checkpoints={"tiny-flux": str(tiny_flux)}, listen="127.0.0.1:0", device="cpu", dtype="float32",
                      stage_overrides={"denoiser": [f"server.metrics_port={metrics_port}", "runtime.compile=on",
                                                    "runtime.compile_backend=aot_eager"]})
    stack = LocalStack(cfg, workdir=tmp_path / "stack")
    stack.start()
    try:
        with ChituClient(stack.address) as c:
            for _ in range(2):
                c.generate_result("a red circle", "tiny-flux", GenerateOptions(width=96, height=64, steps=3, seed=1),
                                  timeout=120)
        m = _scrape(metrics_port)
        assert m['chitu_denoiser_step_seconds_count{service="denoiser"}'] == 6
        assert m['chitu_denoiser_step_seconds_sum{service="denoiser"}'] > 0
        assert m['chitu_denoiser_steps_compiling_after_warmup{service="denoiser"}'] == 1
        with grpc.insecure_channel(stack.service("denoiser").address) as ch:
            info = denoiser_pb2_grpc.DenoiserServiceStub(ch).GetDenoiserInfo(denoiser_pb2.GetDenoiserInfoRequest(),
                                                                              timeout=10).info
        assert info.metadata["steps_compiling_after_warmup"] == "1"
    finally:
        stack.stop()

