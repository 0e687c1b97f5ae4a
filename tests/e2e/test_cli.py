"""The README's commands: `chitu up` + `chitu generate`, and the one-shot `chitu run`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from services.media import decode_png
from tests.net import free_port

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not alive
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_up_generate_and_sigterm_stops_everything(tmp_path: Path, tiny_flux: Path) -> None:
    port = free_port()
    up = subprocess.Popen([sys.executable, "-m", "clients.cli", "up", "--listen", f"127.0.0.1:{port}",
                           "--checkpoint", f"demo={tiny_flux}", "--device", "cpu", "--workdir", str(tmp_path / "w")],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = up.stdout.readline()
        assert line.startswith(f"chitu ready: orchestrator at 127.0.0.1:{port}"), (line, up.stderr.read())
        assert "'demo'" in line
        children = _children(up.pid)
        assert len(children) == 4, children  # encoder, denoiser, vae, orchestrator
        gen = subprocess.run([sys.executable, "-m", "clients.cli", "generate", "a small blue square",
                              "--server", f"127.0.0.1:{port}", "--seed", "3", "--width", "32", "--height", "32",
                              "--steps", "2", "--output", str(tmp_path / "out")],
                             capture_output=True, text=True, timeout=120, cwd=REPO)
        assert gen.returncode == 0, gen.stderr
        png = Path(gen.stdout.strip().splitlines()[-1])
        assert decode_png(png.read_bytes()).shape == (32, 32, 3)
        sidecar = json.loads(png.with_suffix(".json").read_text())
        assert sidecar["seed"] == 3 and sidecar["model"] == "demo" and sidecar["steps"] == 2
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
        deadline = time.monotonic() + 30
        while any(_alive(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(c) for c in children), "chitu up left services running"
    finally:
        if up.poll() is None:
            up.kill()


def test_run_writes_the_run_folder(tmp_path: Path, tiny_flux: Path) -> None:
    cfg = {"tag": "t", "output_dir": str(tmp_path / "outputs"),
           "stack": {"checkpoints": {"m": str(tiny_flux)}, "device": "cpu"},
           "requests": [{"prompt": "a red circle", "width": 32, "height": 32, "steps": 3, "seed": 1, "repeat": 2},
                        {"prompt": "a green star", "width": 48, "height": 32, "steps": 2}]}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "clients.cli", "run", str(path)], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    assert run_dir.parent == tmp_path / "outputs" and run_dir.name.startswith("t-")
    for name in ("request_params.json", "system_params.json", "run_config.yaml", "metrics/timing/summary.json"):
        assert (run_dir / name).is_file(), name
    requests = json.loads((run_dir / "request_params.json").read_text())
    assert [r["request_id"] for r in requests] == ["r000-000", "r000-001", "r001-000"]
    assert [r["seed"] for r in requests[:2]] == [1, 2]
    for r in requests:
        folder = run_dir / "results" / r["request_id"]
        meta = json.loads((folder / "image_0.json").read_text())
        assert (folder / "image_0.png").is_file() and meta["prompt"] == r["prompt"]
    summary = json.loads((run_dir / "metrics/timing/summary.json").read_text())
    assert summary["requests"] == 3 and summary["step_seconds"]["count"] == 3 + 3 + 2
    assert set(summary["stages"]) == {"encode", "denoise", "decode"}
    for stage in ("encode", "denoise", "decode"):
        mem = json.loads((run_dir / "metrics/memory" / f"{stage}.json").read_text())
        assert all(int(v["peak_rss_bytes"]) > 0 for v in mem.values())
    den = json.loads((run_dir / "metrics/memory/denoise.json").read_text())
    assert sum(int(v["completed_requests"]) for v in den.values()) == 3
    logs = sorted(p.name for p in (run_dir / "logs").iterdir())
    assert logs == ["denoiser-m.log", "encoder-m.log", "orchestrator-main.log", "vae-m.log"]
    # every structured log line of a request carries its request id
    lines = [json.loads(x) for x in (run_dir / "logs/orchestrator-main.log").read_text().splitlines()
             if x.startswith("{")]
    done = [x for x in lines if x.get("event") == "generation_done"]
    assert sorted(x["request_id"] for x in done) == ["r000-000", "r000-001", "r001-000"]
    assert all("request_id" in x for x in lines)
