"""SIGTERM to a whole denoiser group (Ctrl-C, `chitu up` stopping, a container runtime signalling every process):
rank 0 drains the in-flight request, which completes exactly, and every rank exits cleanly."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
import torch

from services.registry import load_adapter
from tests.distributed.cases import build_checkpoint, make_job, reference
from tests.distributed.test_group_service import DenoiserProcess, denoise, info, to_request
from tests.reference import rel_err

pytestmark = pytest.mark.distributed


def test_sigterm_to_the_process_group_drains_the_in_flight_request(checkpoints_dir: Path, tmp_path: Path) -> None:
    ckpt = build_checkpoint("flux", checkpoints_dir)
    adapter = load_adapter(ckpt)
    job = make_job(adapter, "drained")
    job.params = type(job.params)(**{**job.params.__dict__, "steps": 40})
    job.end_step = 40
    group = DenoiserProcess(tmp_path / "group", ckpt, {"parallel": {"ulysses_degree": 2}, "warmup": False,
                                                      "server": {"grace_seconds": 60}})
    try:
        address = group.wait_ready()
        worker_pid = int(info(address)["worker_pids"])
        started = threading.Event()
        outcome: dict[str, object] = {}
        steps: list[int] = []
        signalled = threading.Event()

        def on_step(step: int) -> None:
            steps.append(step)
            if signalled.is_set():
                outcome.setdefault("step_after_signal", step)
            started.set()

        def run() -> None:
            try:
                outcome["latents"] = denoise(address, to_request(job, ckpt.name), on_step=on_step, timeout=180)
            except BaseException as exc:  # noqa: BLE001 - reported below
                outcome["error"] = exc
            finally:
                started.set()

        client = threading.Thread(target=run)
        client.start()
        assert started.wait(120) and "error" not in outcome, outcome
        os.killpg(group.proc.pid, signal.SIGTERM)  # every rank of the group gets the signal
        signalled.set()  # after the signal: a step counted below was certainly computed after it
        client.join(180)
        assert isinstance(outcome.get("latents"), torch.Tensor), f"{outcome.get('error')!r}\n{group.tail()}"
        # the signal came mid-request: steps were still being computed after it, and none was lost
        assert "step_after_signal" in outcome, f"every step was done before SIGTERM ({len(steps)} steps)"
        assert rel_err(outcome["latents"], reference(ckpt, job)) <= 1e-5
        assert group.proc.wait(timeout=60) == 0, group.tail()
        with pytest.raises(ProcessLookupError):  # the worker rank exited after rank 0's shutdown
            for _ in range(100):
                os.kill(worker_pid, 0)
                threading.Event().wait(0.1)
    finally:
        group.stop()
