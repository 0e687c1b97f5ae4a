"""Test cases of the denoiser group: which layouts each family's tiny checkpoint runs, its jobs, the
single-process references, and a runner for pools of real rank processes (``group_main``)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from denoiser_svc.config import DenoiserServiceConfig
from denoiser_svc.types import DenoiseJob
from denoiser_svc.worker import Worker
from services.assets import build_tiny, widen_heads
from services.config import load_config
from services.families.base import FamilyAdapter, SamplingParams
from services.registry import load_adapter

REPO = Path(__file__).resolve().parents[2]
PROMPT = "a red circle on the left of a blue square"
NEGATIVE = "gray"
STEPS = 3

LAYOUTS_2 = {"cfg2": {"cfg_degree": 2}, "ulysses2": {"ulysses_degree": 2}, "ring2": {"ring_degree": 2},
             "ulysses2-chunks2": {"ulysses_degree": 2, "ulysses_chunks": 2}}
LAYOUTS_4 = {"cfg2-ulysses2": {"cfg_degree": 2, "ulysses_degree": 2}, "ulysses4": {"ulysses_degree": 4},
             "ring4": {"ring_degree": 4}, "ulysses2-ring2": {"ulysses_degree": 2, "ring_degree": 2},
             "ulysses2-ring2-chunks2": {"ulysses_degree": 2, "ring_degree": 2, "ulysses_chunks": 2}}


@dataclasses.dataclass
class Case:
    name: str
    family: str
    checkpoint: Path
    component: str
    layout: dict[str, int]
    jobs: list[DenoiseJob]
    overrides: list[str] = dataclasses.field(default_factory=list)
    """Further ``key=value`` denoiser config overrides of every rank (e.g. ``runtime.compile=on``)."""
    warm_up_with: str = "job"
    """With overrides (a compiling case): ``job`` warms up on the case's first job (under another id), as the
    serving rank would for a request of that shape; ``default`` on the worker's own warm-up request (the model's
    default size, then ``runtime.warmup_sizes``), as a serving rank does."""

    @property
    def heads_needed(self) -> int:
        """Attention heads the layout needs (Ulysses degree x head chunks)."""
        return self.layout.get("ulysses_degree", 1) * self.layout.get("ulysses_chunks", 1)

    @property
    def world_size(self) -> int:
        return self.layout.get("cfg_degree", 1) * self.layout.get("ulysses_degree", 1) * self.layout.get(
            "ring_degree", 1)

    def spec(self) -> dict:
        return {"name": self.name, "checkpoint": str(self.checkpoint), "component": self.component,
                "layout": self.layout, "jobs": self.jobs, "overrides": self.overrides, "warm_up_with": self.warm_up_with}


def tiny_checkpoints() -> list[str]:
    """Every tiny checkpoint builder (one per family variant: ``wan22`` is Wan2.2's two-expert layout,
    ``flux2_klein_base`` the undistilled, true-CFG FLUX.2-klein)."""
    from services.tiny import builders

    return sorted(builders())


def _odd_length(conds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the last text token when the length is even, so that text shards need padding on 2 and 4 ranks."""
    embeds = conds.get("prompt_embeds")
    if embeds is None or embeds.ndim != 3 or embeds.shape[1] % 2:
        return conds
    n = embeds.shape[1]
    return {k: (v[:, : n - 1] if v.ndim >= 2 and v.shape[1] == n else v) for k, v in conds.items()}


def make_job(adapter: FamilyAdapter, request_id: str = "job") -> DenoiseJob:
    """A short request at a size whose token counts do not divide 2 or 4 (padding on every layout), with CFG on
    for true-CFG families."""
    lim = adapter.limits()
    m = lim.size_multiple
    width, height = max(3 * m, lim.min_size), max(5 * m, lim.min_size)
    frames = 1 + lim.frame_multiple if lim.supports_video else 1
    cfg = lim.guidance_kind == "cfg"
    guidance = max(lim.default_guidance_scale, lim.cfg_threshold + 3.0) if cfg else lim.default_guidance_scale
    params = SamplingParams(width=width, height=height, steps=STEPS, guidance_scale=guidance, seed=7, frames=frames)
    encoder = adapter.load_encoder(torch.float32, torch.device("cpu"))
    encoded = adapter.encode(encoder, PROMPT, NEGATIVE if cfg else None)
    conds, negs = _odd_length(encoded.conditionings), _odd_length(encoded.negative_conditionings)
    if adapter.family == "qwen_image":
        # a model-side key-padding mask (Qwen-Image takes one): exercises masks through the wrappers
        mask = torch.ones(conds["prompt_embeds"].shape[:2], dtype=torch.int64)
        mask[:, -2:] = 0
        conds = {**conds, "prompt_embeds_mask": mask}
    lo, hi = adapter.expert_range("transformer", params)
    return DenoiseJob(request_id=request_id, params=params, conditionings=conds, negative_conditionings=negs,
                      start_step=lo, end_step=hi)


def family_cases(family: str, checkpoint: Path, widened: Path) -> list[Case]:
    """Every layout this checkpoint supports at world sizes 2 and 4 (cfg needs true CFG; sequence layouts a plan;
    Ulysses over 4 ranks, or over 2 in 2 head chunks, a copy of the checkpoint with 4 heads, made at ``widened``)."""
    adapter = load_adapter(checkpoint)
    has_cfg = adapter.limits().guidance_kind == "cfg"
    has_plan = adapter.sequence_parallel_plan("transformer") is not None
    job = make_job(adapter)
    cases = []
    for name, layout in {**LAYOUTS_2, **LAYOUTS_4}.items():
        if layout.get("cfg_degree", 1) > 1 and not has_cfg:
            continue
        if (layout.get("ulysses_degree", 1) > 1 or layout.get("ring_degree", 1) > 1) and not has_plan:
            continue
        case = Case(f"{family}-{name}", family, checkpoint, "transformer", layout, [job])
        if case.heads_needed > 2:
            case.checkpoint = widen_heads(checkpoint, widened, heads=4)
        cases.append(case)
    return cases


def reference(checkpoint: Path, job: DenoiseJob, component: str = "transformer", device: str = "cpu",
              dtype: str = "float32") -> torch.Tensor:
    """The single-process result: the same worker stack with a group of one."""
    config = load_config(DenoiserServiceConfig, overrides=[f"model.checkpoint={checkpoint}", f"model.device={device}",
                                                           f"model.dtype={dtype}", "warmup=false",
                                                           f"component={component}"])
    worker = Worker(config)
    worker.init_device()
    worker.load_model()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the group's ranks run: same kernels, same reduction order
    try:
        worker.add_request(job)
        for step in range(job.start_step, job.end_step):
            worker.execute_step(job.request_id, step).wait()
        return worker.finish_request(job.request_id).latents
    finally:
        torch.set_num_threads(threads)


def run_pool(cases: list[Case], world: int, workdir: Path, timeout: float = 900.0, device: str = "cpu",
             dtype: str = "float32") -> Path:
    """Run ``cases`` on ``world`` real rank processes (gloo on the CPU, NCCL on ``cuda``); returns the folder of
    saved latents."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec = workdir / "spec.pt"
    torch.save({"cases": [c.spec() for c in cases]}, spec)
    out = workdir / "out"
    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False)
    log_path = workdir / "group.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tests.distributed.group_main", str(spec), str(out),
                                 "--world-size", str(world), "--master", f"127.0.0.1:{store.port}", "--device",
                                 device, "--dtype", dtype],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            code = proc.wait()
    if code != 0:
        raise RuntimeError(f"group of {world} failed (exit {code}) or timed out:\n"
                           f"{log_path.read_text(errors='replace')[-6000:]}")
    return out


def build_checkpoint(builder: str, checkpoints_dir: Path) -> Path:
    return build_tiny(builder, checkpoints_dir / f"tiny-{builder}", seed=0)
