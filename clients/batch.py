"""``chitu run CONFIG.yaml``: bring the local stack up, run the listed requests, write a run folder, shut down.

Run folder ``<output_dir>/<tag>-<YYYYMMDD_HHMMSS>-<id>/``::

    request_params.json          the requests as run (defaults resolved by the server are in each sidecar)
    system_params.json           versions, platform, devices, git commit
    run_config.yaml              the resolved run configuration
    results/<request_id>/*.png   media, each with a sidecar .json (settings, timings, warnings)
    metrics/timing/summary.json  per stage and per step: mean, median, max over the run
    metrics/memory/<stage>.json  each service's peak memory (from its info RPC)
    logs/                        every service's JSON log
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import platform
import statistics
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict

from clients.cache import cache_policy
from clients.client import ChituClient, GenerateOptions
from clients.output import result_summary, write_result
from clients.stack import LocalStack, StackConfig
from services.config import ConfigError, dump_yaml, load_config
from services.proto.chitu.v1 import common_pb2


@dataclasses.dataclass
class BatchRequest:
    """One request of a batch (unset fields take the model's defaults)."""

    prompt: str = ""
    """Text to draw."""
    model: str = ""
    """Served model; empty means the first model of the stack."""
    negative_prompt: str = ""
    """Negative prompt (true-CFG models)."""
    width: int | None = None
    """Width in pixels."""
    height: int | None = None
    """Height in pixels."""
    frames: int | None = None
    """Frames (video models)."""
    steps: int | None = None
    """Denoising steps."""
    guidance_scale: float | None = None
    """Guidance strength."""
    seed: int | None = None
    """Seed; unset means random (the one used is recorded)."""
    formats: list[str] = dataclasses.field(default_factory=list)
    """Output formats (png, mp4, raw)."""
    repeat: int = 1
    """Run this request this many times (seed + i when a seed is set)."""
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)
    """FlexCache policy, e.g. ``{strategy: teacache, threshold: 0.3}``; empty means full compute."""

    def validate(self) -> None:
        if not self.prompt.strip():
            raise ConfigError("requests[].prompt must not be empty")
        if self.cache:
            try:
                cache_policy(self.cache)
            except ValueError as exc:
                raise ConfigError(f"requests[].cache: {exc}") from None
        if self.repeat < 1:
            raise ConfigError("requests[].repeat must be >= 1")


@dataclasses.dataclass
class RunConfig:
    """A one-shot batch run."""

    tag: str = "run"
    """Prefix of the run folder's name."""
    output_dir: str = "outputs"
    """Where run folders are created."""
    stack: StackConfig = dataclasses.field(default_factory=lambda: StackConfig(listen="127.0.0.1:0"))
    """The local stack to bring up (empty checkpoints = the embedded default model)."""
    requests: list[BatchRequest] = dataclasses.field(default_factory=list)
    """The requests to run."""
    concurrency: int = 1
    """Requests in flight at once."""
    timeout_seconds: float = 600.0
    """Deadline of each request."""

    def validate(self) -> None:
        if not self.requests:
            raise ConfigError("requests must list at least one request")
        if self.concurrency < 1:
            raise ConfigError("concurrency must be >= 1")


def _system_params() -> dict[str, Any]:
    import diffusers
    import grpc
    import torch
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
            "cpu_count": __import__("os").cpu_count(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "grpcio": grpc.__version__, "cuda_devices": devices,
            "git_commit": commit}


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    return {"count": len(values), "mean": statistics.fmean(values), "median": statistics.median(values),
            "max": max(values), "min": min(values)}


def run_batch(config_path: str, overrides: list[str] | None = None) -> Path:
    cfg = load_config(RunConfig, config_path, overrides)
    stamp = dt.datetime.now().strftime("%Y%m%d_%H%M%S")
    run_dir = Path(cfg.output_dir) / f"{cfg.tag}-{stamp}-{uuid.uuid4().hex[:6]}"
    (run_dir / "results").mkdir(parents=True)
    dump_yaml(cfg, run_dir / "run_config.yaml")
    (run_dir / "system_params.json").write_text(json.dumps(_system_params(), indent=2) + "\n")

    stack = LocalStack(cfg.stack, workdir=run_dir)
    stack.start()
    try:
        with ChituClient(stack.address, security=stack.client_security()) as client:
            default_model = stack.models[0]
            jobs = []
            for i, r in enumerate(cfg.requests):
                for k in range(r.repeat):
                    rid = f"r{i:03d}-{k:03d}"
                    seed = None if r.seed is None else r.seed + k
                    opts = GenerateOptions(negative_prompt=r.negative_prompt, width=r.width, height=r.height,
                                           frames=r.frames, steps=r.steps, guidance_scale=r.guidance_scale, seed=seed,
                                           formats=list(r.formats), request_id=rid, cache=r.cache or None)
                    jobs.append((rid, r.model or default_model, r.prompt, opts))
            (run_dir / "request_params.json").write_text(json.dumps(
                [{"request_id": rid, "model": m, "prompt": p, **dataclasses.asdict(o)} for rid, m, p, o in jobs],
                indent=2) + "\n")

            def one(job: tuple[str, str, str, GenerateOptions]) -> dict[str, Any]:
                rid, model, prompt, opts = job
                result = client.generate_result(prompt, model, opts, timeout=cfg.timeout_seconds)
                params = {"model": model, "prompt": prompt, "negative_prompt": opts.negative_prompt}
                write_result(run_dir / "results", rid, result, params)
                return result_summary(result, {"request_id": rid, **params})

            with ThreadPoolExecutor(cfg.concurrency) as pool:
                summaries = list(pool.map(one, jobs))
            _write_metrics(run_dir, summaries, client)
    finally:
        stack.stop()
    return run_dir


def _write_metrics(run_dir: Path, summaries: list[dict[str, Any]], client: ChituClient) -> None:
    stages: dict[str, list[float]] = {}
    steps: list[float] = []
    for s in summaries:
        for stage, t in s["timings"]["stages"].items():
            stages.setdefault(stage, []).append(t["seconds"])
        steps.extend(s["timings"]["step_seconds"])
    summary = {"requests": len(summaries),
               "total_seconds": _stats([s["timings"]["total_seconds"] for s in summaries]),
               "stages": {k: _stats(v) for k, v in stages.items()}, "step_seconds": _stats(steps),
               "per_request": {s["request_id"]: s["timings"] for s in summaries}}
    timing_dir = run_dir / "metrics" / "timing"
    timing_dir.mkdir(parents=True, exist_ok=True)
    (timing_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    memory_dir = run_dir / "metrics" / "memory"
    memory_dir.mkdir(parents=True, exist_ok=True)
    per_stage: dict[str, dict[str, Any]] = {}
    for model in client.list_models().models:
        for ep in model.endpoints:
            stage = common_pb2.Stage.Name(ep.stage).removeprefix("STAGE_").lower()
            per_stage.setdefault(stage, {})[ep.address] = {
                "model": model.name, **MessageToDict(ep.info).get("metadata", {})}
    for stage, data in per_stage.items():
        (memory_dir / f"{stage}.json").write_text(json.dumps(data, indent=2) + "\n")
