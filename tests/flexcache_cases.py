"""Shared pieces of the FlexCache tests: tiny checkpoints with more blocks, jobs, settings per strategy, and the
single-process runs that the cached and parallel runs are compared with."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from denoiser_svc.cache import policy_from_dict
from denoiser_svc.config import DenoiserServiceConfig
from denoiser_svc.types import DenoiseJob, FinishedRequest
from denoiser_svc.worker import Worker
from services.assets import build_tiny
from services.config import load_config
from services.families.base import SamplingParams

DEEP_BLOCKS = {"flux": {"num_layers": 2, "num_single_layers": 4}, "flux_cfg": {"num_layers": 2, "num_single_layers": 4},
               "wan": {"num_layers": 5}, "flux2_klein": {"num_layers": 2, "num_single_layers": 3},
               "flux2_klein_base": {"num_layers": 2, "num_single_layers": 3}, "z_image": {"n_layers": 5}}
"""Transformer config overrides of the ``deep`` tiny checkpoints: enough blocks for a front, a middle and a back.
``flux_cfg`` is Flux without guidance embeddings, served with true CFG (two branches per step, as Wan);
``flux2_klein_base`` is the undistilled FLUX.2-klein (CFG); Z-Image runs CFG at the guidance of ``make_job``."""

TEXT_WIDTH = {"flux": "joint_attention_dim", "flux2_klein": "joint_attention_dim", "z_image": "cap_feat_dim",
              "qwen_image": "joint_attention_dim",
              "wan": "text_dim"}
"""Transformer config key of each family's text-embedding width."""

NEVER_HIT: dict[str, dict[str, Any]] = {
    "teacache": {"threshold": 0.0}, "first_block": {"threshold": 0.0}, "magcache": {"threshold": 0.0},
    "meancache": {"fresh_fraction": 1.0}, "taylorseer": {"interval": 1}, "blockdance": {"interval": 1},
    "dbcache": {"threshold": 0.0, "front_blocks": 2, "back_blocks": 1}, "pab": {"interval": 1},
}
"""Per strategy, settings under which it never reuses anything (must equal full compute)."""

REAL: dict[str, dict[str, Any]] = {
    "teacache": {"threshold": 0.9},
    "first_block": {"threshold": 0.23},
    "magcache": {"threshold": 0.2, "retention_fraction": 0.25},
    "meancache": {"fresh_fraction": 0.5},
    "taylorseer": {"interval": 3, "order": 2, "front_blocks": 1, "back_blocks": 1},
    "blockdance": {"interval": 2, "start_fraction": 0.3},
    "dbcache": {"threshold": 0.25, "front_blocks": 2, "back_blocks": 1, "max_consecutive_hits": 2},
    "pab": {"interval": 2, "start_fraction": 0.2},
}
"""Per strategy, settings that skip work on the tiny checkpoints (calibrated on them: the decisions are not near
their thresholds, so rounding differences between layouts cannot flip them)."""

REAL_BY_FAMILY: dict[str, dict[str, dict[str, Any]]] = {
    "flux2_klein": {"first_block": {"threshold": 0.8},
                    "dbcache": {"threshold": 0.8, "front_blocks": 2, "back_blocks": 1, "max_consecutive_hits": 2}},
    "z_image": {"first_block": {"threshold": 0.75, "max_consecutive_hits": 2},
                "dbcache": {"threshold": 0.73, "front_blocks": 2, "back_blocks": 1, "max_consecutive_hits": 2},
                "magcache": {"threshold": 0.1, "retention_fraction": 0.25}, "meancache": {"fresh_fraction": 0.7},
                "taylorseer": {"interval": 2, "order": 1, "front_blocks": 1, "back_blocks": 1}},
}
"""Per family, settings that replace ``REAL``'s. The tiny random FLUX.2-klein and Z-Image transformers change much
more from step to step than Flux's (their front residuals move by 55-140% per step, where a trained model's move by a
few percent), so the value-dependent thresholds sit between those changes, each decision at least 1% (relative) from
its threshold on the unit and the parallel test shapes; Z-Image's gentler settings keep its reuse error moderate
(each reused step costs it several percent: the random model's prediction changes fast, and CFG at 5 amplifies it)."""


def real(family: str, strategy: str) -> dict[str, Any]:
    """The ``REAL`` settings of ``strategy`` for ``family`` (``flux2_klein_base`` shares FLUX.2-klein's)."""
    return REAL_BY_FAMILY.get(family.removesuffix("_base"), {}).get(strategy, REAL[strategy])


STEPS = 10


def deep_checkpoint(family: str, checkpoints_dir: Path, seed: int = 0) -> Path:
    """The tiny ``family`` checkpoint with a transformer of more blocks (``DEEP_BLOCKS``), fresh random weights."""
    out = checkpoints_dir / f"tiny-{family}-deep"
    if (out / "model_index.json").is_file():
        return out
    if family == "flux_cfg":
        from services.tiny.flux import make_tiny_flux

        base = checkpoints_dir / "tiny-flux-true-cfg"
        if not (base / "model_index.json").is_file():
            make_tiny_flux(base, seed=seed, true_cfg=True)
            (base / "chitu.json").write_text(json.dumps({"width": 64, "height": 64, "steps": 8,
                                                         "guidance_scale": 3.5}))
    else:
        base = build_tiny(family, checkpoints_dir / f"tiny-{family}", seed=seed)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp)
    cfg_path = tmp / "transformer" / "config.json"
    cfg = {**json.loads(cfg_path.read_text()), **DEEP_BLOCKS[family]}
    import diffusers

    cls = getattr(diffusers, cfg["_class_name"])
    torch.manual_seed(seed + 11)
    model = cls.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    with torch.no_grad():  # Z-Image's pad tokens start as torch.empty: give them values that matter
        for name, param in model.named_parameters():
            if name.endswith("pad_token"):
                param.normal_(0.0, 0.5)
    shutil.rmtree(tmp / "transformer")
    model.save_pretrained(tmp / "transformer", safe_serialization=True)
    try:
        tmp.rename(out)
    except OSError:  # another process built it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def worker_config(checkpoint: Path, *overrides: str) -> DenoiserServiceConfig:
    return load_config(DenoiserServiceConfig, overrides=[f"model.checkpoint={checkpoint}", "model.device=cpu",
                                                         "model.dtype=float32", "warmup=false", *overrides])


def make_worker(checkpoint: Path, *overrides: str) -> Worker:
    worker = Worker(worker_config(checkpoint, *overrides))
    worker.init_device()
    worker.load_model()
    return worker


def make_job(checkpoint: Path, strategy: str | None, settings: dict[str, Any] | None = None, *,
             request_id: str = "job", steps: int = STEPS, seed: int = 5, size: tuple[int, int] | None = None,
             frames: int | None = None, text_tokens: int = 16) -> DenoiseJob:
    """A request with synthetic conditioning (seeded), CFG on for true-CFG families; ``size`` (width, height) and
    ``frames`` default to the model's defaults."""
    from services.registry import load_adapter

    adapter = load_adapter(checkpoint)
    lim = adapter.limits()
    gen = torch.Generator("cpu").manual_seed(seed)
    cfg = json.loads((checkpoint / "transformer" / "config.json").read_text())
    width = cfg[TEXT_WIDTH[adapter.family]]

    def conditioning() -> dict[str, torch.Tensor]:
        out = {"prompt_embeds": torch.randn(1, text_tokens, width, generator=gen)}
        if adapter.family == "flux":
            out["pooled_prompt_embeds"] = torch.randn(1, cfg["pooled_projection_dim"], generator=gen)
        return out

    conds = conditioning()
    # the negative branch runs where the family guides by CFG (scale above 1 for Flux and FLUX.2, above 0 for Z-Image)
    negs = conditioning() if lim.guidance_kind == "cfg" else {}
    guidance = {"flux": 3.5, "flux2_klein": 4.0}.get(adapter.family, 5.0)
    width, height = size or (lim.default_width, lim.default_height)
    params = SamplingParams(width=width, height=height, steps=steps, guidance_scale=guidance, seed=seed,
                            frames=lim.default_frames if frames is None else frames)
    policy = None if strategy is None else policy_from_dict({"strategy": strategy, **(settings or {})})
    return DenoiseJob(request_id=request_id, params=params, conditionings=conds, negative_conditionings=negs,
                      start_step=0, end_step=steps, cache=policy)


def assert_clean(worker: Worker) -> None:
    """No session, no hook, every module's own forward back (a compiled one where regional compilation put one)."""
    from denoiser_svc.cache.hooks import HookRegistry, hook_names

    assert worker.runner.cache.sessions == {}
    for module in worker.runner.model.transformer.modules():
        assert hook_names(module) == () and HookRegistry.of(module) is None
        own = module.__dict__.get("forward")
        assert "HookRegistry" not in getattr(own, "__qualname__", ""), type(module)


def run_job(worker: Worker, job: DenoiseJob) -> FinishedRequest:
    worker.add_request(job)
    try:
        for step in range(job.start_step, job.end_step):
            worker.execute_step(job.request_id, step).wait()
    except BaseException:
        worker.abort_request(job.request_id)
        raise
    return worker.finish_request(job.request_id)
