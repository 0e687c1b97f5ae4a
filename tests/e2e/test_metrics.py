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
