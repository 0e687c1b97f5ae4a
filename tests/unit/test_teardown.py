"""Bounded teardown of a denoiser group's ranks (``denoiser_svc.parallel.launch.run_bounded`` / ``destroy_group``):
on GPUs, ``destroy_process_group`` never returned after NCCL ran inside CUDA graphs (2x H200), so a rank waits for it
at most ``parallel.destroy_timeout_seconds`` and then leaves with ``os._exit``. The GPU side is
``tests/gpu/test_parallel_gpu.py::test_served_cuda_graph_group_serves_and_exits_on_sigterm``."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch.distributed as dist

from denoiser_svc.config import DenoiserServiceConfig
from denoiser_svc.parallel.launch import destroy_group, run_bounded
from services.config import ConfigError, load_config


def test_run_bounded_waits_for_a_call_that_returns_and_gives_up_on_one_that_does_not() -> None:
    calls = []
    assert run_bounded(lambda: calls.append(1), 5.0, "append") and calls == [1]
    assert run_bounded(lambda: 1 / 0, 5.0, "raises")  # raised: logged, the call is over
    release = threading.Event()
    t0 = time.monotonic()
    assert not run_bounded(lambda: release.wait(60), 0.3, "stuck")
    assert 0.3 <= time.monotonic() - t0 < 5
    release.set()


def test_destroy_group_destroys_a_real_group() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        assert dist.is_initialized()
        assert destroy_group(10.0)
        assert not dist.is_initialized()
        assert destroy_group(10.0)  # nothing to destroy
    finally:
        if dist.is_initialized():  # never leave a default group to the other tests of this process
            dist.destroy_process_group()


def test_destroy_timeout_is_validated(tiny_flux) -> None:
    base = [f"model.checkpoint={tiny_flux}"]
    assert load_config(DenoiserServiceConfig, overrides=base).parallel.destroy_timeout_seconds == 5.0
    with pytest.raises(ConfigError, match="parallel.destroy_timeout_seconds must be > 0"):
        load_config(DenoiserServiceConfig, overrides=[*base, "parallel.destroy_timeout_seconds=0"])
