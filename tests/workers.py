"""A denoiser worker started as a serving rank starts it (load, kernel choice, compile, warm-up), for tests that
check what the runtime config does to it."""

from __future__ import annotations

from pathlib import Path

from denoiser_svc.config import DenoiserServiceConfig
from denoiser_svc.worker import Worker
from services.config import ModelConfig
from services.runtime import RuntimeConfig


def start_worker(checkpoint: Path, runtime: RuntimeConfig, device: str = "cpu", dtype: str = "float32") -> Worker:
    cfg = DenoiserServiceConfig(model=ModelConfig(checkpoint=str(checkpoint), device=device, dtype=dtype),
                                runtime=runtime)
    worker = Worker(cfg)
    worker.init_device()
    worker.load_model()
    worker.compile_or_warm_up_model(worker.warmup_job())
    return worker
