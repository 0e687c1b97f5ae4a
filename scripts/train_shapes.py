#!/usr/bin/env python3
"""Train the demo model ``chitu-shapes-flux`` (Flux.1 architecture, diffusers classes) on procedural shapes.

One command on one GPU, resumable: every invocation continues the run folder where the last one stopped and stops
itself before ``--deadline-minutes`` (state saved, then a quick evaluation and the plots), so a run can be spread
over several 10-minute commands. Everything the next step needs is in the run folder (at most 8 files, each under
15 MiB: what comes back from the GPU machine's $OUT): ``progress.json`` (configs, tokenizer vocabularies, loss
logs, timings, evaluation), ``vae.safetensors``, ``trainable-NN.safetensors`` (fp32 transformer + text encoders),
``loss.png``, ``samples.png``. ``scripts/shapes_release.py`` turns a finished run into the diffusers folder.

Recipe (``TrainConfig`` holds every number):

1. VAE stage: AutoencoderKL (8x downsampling, 8 latent channels) trained on freshly rendered training scenes every
   step (L1 reconstruction + a mild KL term on the posterior), then frozen; the latent mean/std set the VAE's
   ``shift_factor``/``scaling_factor`` (as Flux.1's VAE config carries them) and its weights are rounded to bf16,
   the dtype it is shipped in, before anything downstream uses it.
2. Latent pool: ``pool_size`` training scenes rendered on the device, encoded once (posterior mode), normalised
   and 2x2-packed exactly as FluxPipeline packs latents, with their captions' CLIP and T5 token ids. Training then
   costs no rendering, VAE or tokenizer work per step (no data loader to starve the GPU).
3. Transformer stage: rectified flow matching as Flux.1 (x_t = (1 - s) x_0 + s e, the model predicts e - x_0 at
   timestep s, s logit-normal), bf16 autocast with fp32 weights, AdamW, warm-up then cosine decay, gradient
   clipping. 10% of captions are replaced by the empty caption, so that FluxPipeline's true CFG
   (``true_cfg_scale > 1`` with ``negative_prompt=""``) has a trained unconditional branch; hence
   ``guidance_embeds=False`` (nothing to distil guidance from).

Text encoders: tiny CLIP and T5 built from scratch (there are no pretrained ones to download) and trained *jointly*
with the transformer. Frozen random encoders would only pass word identity through random projections (CLIP's
pooled vector would be a random hash of the caption); training them costs under 5% of the step (0.46 M of 9.5 M
parameters, 32 tokens) and gives the transformer embeddings that separate colour, shape and position words.

Adam moments are not saved (they would double the state past what comes back from the machine): a resumed run
restarts them and re-warms the learning rate over ``resume_warmup`` steps. Data and noise of step k come from
generators seeded with (seed, k), so where a run is split does not change what it sees. ``--deterministic`` requests
deterministic kernels (``torch.use_deterministic_algorithms``, warn-only); it is off by default because on an H100
with torch 2.11 it gave a NaN transformer loss from the first steps (2026-11-27), so reproducibility is judged on
scores (within 2 points), not bits. The first three steps of every invocation are logged one by one and a
non-finite loss stops the run at once (STATUS FAILED, exit code 2) without saving over the last good state.

Run (GPU, repo root):   python3 scripts/train_shapes.py --run-dir $OUT/run --deadline-minutes 9
CPU smoke test:         python scripts/train_shapes.py --run-dir /tmp/run --preset tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

T0 = time.monotonic()
"""Start of this invocation (the process start, imports included, for the first ``main`` call of a process)."""
_CALLS = 0
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from services.shapes import model as M  # noqa: E402
from services.shapes.evaluate import adherence, classify, load_classifier  # noqa: E402
from services.shapes.render import render  # noqa: E402
from services.shapes.scenes import Scenes, heldout_scenes, sample_scenes  # noqa: E402


@dataclass(frozen=True)
class TrainConfig:
    """Every number of the recipe (stored in progress.json; a resumed run uses the stored one)."""

    preset: str = "demo"
    """Model sizes (``services.shapes.model.PRESETS``)."""
    seed: int = 0
    vae_steps: int = 1500
    vae_batch: int = 64
    vae_lr: float = 1e-3
    kl_weight: float = 1e-5
    """Weight of the posterior's KL divergence per latent element, against the per-pixel L1 loss."""
    stats_samples: int = 4096
    """Scenes whose latents set the VAE's scaling and shift factors."""
    pool_size: int = 200_000
    steps: int = 4000
    batch: int = 512
    lr: float = 8e-4
    warmup: int = 200
    resume_warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    eval_steps: int = 20
    eval_count: int = 64
    eval_guidances: tuple[float, ...] = (1.0, 2.5, 4.0, 6.0)
    """True-CFG scales evaluated at the end (1.0 = no CFG); the best on validation captions becomes the default."""
    log_every: int = 100
    save_every_minutes: float = 3.0


PRESET_TRAIN: dict[str, TrainConfig] = {
    "demo": TrainConfig(),
    "tiny": TrainConfig(preset="tiny", vae_steps=4, vae_batch=4, stats_samples=16, pool_size=64, steps=6, batch=8,
                        warmup=2, resume_warmup=1, eval_steps=2, eval_count=8, eval_guidances=(1.0, 4.0), log_every=2),
}

STAGE_SEEDS = {"vae": 1, "vae-noise": 2, "stats": 3, "pool": 4, "transformer": 5, "eval": 6}


def stage_seed(cfg: TrainConfig, stage: str, step: int = 0) -> int:
    """Seed of one stage's step: a pure function of (run seed, stage, step)."""
    return (cfg.seed * 1_000_003 + STAGE_SEEDS[stage]) * 10_000_019 + step


def lr_at(step: int, total: int, base: float, warmup: int, min_ratio: float, resumed_at: int, resume_warmup: int) -> float:
    warm = min(1.0, (step + 1) / max(warmup, 1))
    if resumed_at > 0:
        warm = min(warm, (step - resumed_at + 1) / max(resume_warmup, 1))
    progress = min(1.0, step / max(total, 1))
    return base * warm * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def log(msg: str) -> None:
    print(f"[{(time.monotonic() - T0) / 60:5.2f} min] {msg}", flush=True)


class Run:
    """The run folder: progress.json plus the weight files, written atomically."""

    def __init__(self, folder: Path, progress: dict[str, Any]):
        self.folder = folder
        self.p = progress

    @staticmethod
    def open(folder: Path, preset: str | None, overrides: list[str]) -> Run:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / M.PROGRESS
        if path.is_file():
            progress = json.loads(path.read_text())
            preset = preset or progress["train"]["preset"]
            if overrides or preset != progress["train"]["preset"]:
                stored = progress["train"]
                wanted = asdict(apply_overrides(PRESET_TRAIN[preset], overrides))
                diff = {k: (stored[k], v) for k, v in wanted.items() if _norm(stored[k]) != _norm(v)}
                if diff:
                    raise SystemExit(f"{folder} is a run with other settings {diff}; use a new --run-dir")
            log(f"resuming {folder}: vae {progress['vae']['steps_done']}/{progress['train']['vae_steps']}, "
                f"transformer {progress['transformer']['steps_done']}/{progress['train']['steps']}")
            return Run(folder, progress)
        cfg = apply_overrides(PRESET_TRAIN[preset or "demo"], overrides)
        progress = {
            "version": 1, "train": asdict(cfg), "model": M.config_to_json(M.PRESETS[cfg.preset]),
            "tokenizers": asdict(M.TokenizerVocab.build()),
            "vae": {"steps_done": 0, "done": False, "log": [], "latent_stats": None},
            "transformer": {"steps_done": 0, "done": False, "log": [], "files": []},
            "invocations": [], "eval": None, "finished": False,
        }
        log(f"new run in {folder}: {json.dumps(asdict(cfg))}")
        return Run(folder, progress)

    @property
    def cfg(self) -> TrainConfig:
        data = dict(self.p["train"])
        data["eval_guidances"] = tuple(data["eval_guidances"])
        return TrainConfig(**data)

    def save(self) -> None:
        tmp = self.folder / f".{M.PROGRESS}.tmp"
        tmp.write_text(json.dumps(self.p, indent=1))
        tmp.replace(self.folder / M.PROGRESS)


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """``key=value`` overrides of TrainConfig fields (typed like the field)."""
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in types:
            raise SystemExit(f"--set {item!r}: expected key=value with key in {sorted(types)}")
        current = getattr(cfg, key)
        if isinstance(current, tuple):
            changes[key] = tuple(float(x) for x in value.split(","))
        else:
            changes[key] = type(current)(value)
    return dataclasses.replace(cfg, **changes)


def autocast(device: torch.device) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# -- stage 1: the VAE ------------------------------------------------------------------------------------------------

def train_vae(run: Run, comps: dict[str, Any], device: torch.device, deadline: float, stop_after: int) -> None:
    from safetensors.torch import load_file, save_file

    cfg, state = run.cfg, run.p["vae"]
    vae = comps["vae"].to(device).train()
    start = state["steps_done"]
    if start:
        vae.load_state_dict(load_file(str(run.folder / M.VAE_FILE)))
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    t_start, acc, acc_kl, n = time.monotonic(), torch.zeros((), device=device), torch.zeros((), device=device), 0
    step = start
    for step in range(start, cfg.vae_steps):
        if time.monotonic() >= deadline or step - start >= stop_after:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.vae_steps, cfg.vae_lr, 100, cfg.min_lr_ratio, start, cfg.resume_warmup)
        x = render(sample_scenes(cfg.vae_batch, stage_seed(cfg, "vae", step)), device) * 2 - 1
        gen = torch.Generator(device).manual_seed(stage_seed(cfg, "vae-noise", step))
        with autocast(device):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample(generator=gen)).sample
        mean, logvar = post.mean.float(), post.logvar.float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        l1 = (rec.float() - x).abs().mean()
        loss = l1 + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        opt.step()
        acc += l1.detach()
        acc_kl += kl.detach()
        n += 1
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.vae_steps:
            rate = (step + 1 - start) / (time.monotonic() - t_start)
            state["log"].append([step + 1, float(acc) / n, float(acc_kl) / n])
            log(f"vae step {step + 1}/{cfg.vae_steps} l1 {float(acc) / n:.4f} kl {float(acc_kl) / n:.2f} "
                f"({rate:.1f} it/s)")
            acc.zero_()
            acc_kl.zero_()
            n = 0
    else:
        step = cfg.vae_steps
    state["steps_done"] = step
    vae.eval().requires_grad_(False)
    if step >= cfg.vae_steps:
        finish_vae(run, vae, device)
        save_file({k: v.to(torch.bfloat16).contiguous().cpu() for k, v in vae.state_dict().items()},
                  str(run.folder / f".{M.VAE_FILE}.tmp"))
    else:
        save_file({k: v.contiguous().cpu() for k, v in vae.state_dict().items()}, str(run.folder / f".{M.VAE_FILE}.tmp"))
    (run.folder / f".{M.VAE_FILE}.tmp").replace(run.folder / M.VAE_FILE)
    run.save()
    log(f"vae stage: {state['steps_done']}/{cfg.vae_steps} steps{' (done)' if state['done'] else ''}")


@torch.no_grad()
def finish_vae(run: Run, vae: torch.nn.Module, device: torch.device) -> None:
    """Round the weights to bf16 (the shipped dtype), then measure the latent scale and the reconstruction."""
    cfg = run.cfg
    for p in vae.parameters():
        p.data = p.data.to(torch.bfloat16).float()
    x = render(sample_scenes(cfg.stats_samples, stage_seed(cfg, "stats")), device) * 2 - 1
    zs, errs = [], []
    for i in range(0, x.shape[0], 512):
        with autocast(device):
            z = vae.encode(x[i:i + 512]).latent_dist.mode()
            rec = vae.decode(z).sample
        zs.append(z.float())
        errs.append(((rec.float().clamp(-1, 1) - x[i:i + 512]) / 2).pow(2).mean((1, 2, 3)))
    z = torch.cat(zs)
    stats = {"shift_factor": float(z.mean()), "scaling_factor": float(1 / z.std()),
             "recon_mse": float(torch.cat(errs).mean())}
    vae.register_to_config(scaling_factor=stats["scaling_factor"], shift_factor=stats["shift_factor"])
    run.p["vae"].update(done=True, latent_stats=stats)
    log(f"vae latents: shift {stats['shift_factor']:.4f} scale {stats['scaling_factor']:.4f}; "
        f"reconstruction mse {stats['recon_mse']:.5f} (images in [0, 1])")


# -- stage 2: the latent pool ----------------------------------------------------------------------------------------

@torch.no_grad()
def build_pool(run: Run, comps: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    from diffusers import FluxPipeline

    cfg, mcfg = run.cfg, M.config_from_json(run.p["model"])
    vae = comps["vae"].to(device).eval()
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    scenes = sample_scenes(cfg.pool_size, stage_seed(cfg, "pool"))
    captions = scenes.captions()
    unique = sorted(set(captions))
    where = {c: i for i, c in enumerate(unique)}
    clip_u, t5_u = M.tokenize(comps["tokenizer"], comps["tokenizer_2"], unique, mcfg.max_tokens)
    index = torch.tensor([where[c] for c in captions])
    c, side = mcfg.latent_channels, 128 // 8
    latents = torch.empty(cfg.pool_size, (side // 2) ** 2, 4 * c, dtype=torch.bfloat16, device=device)
    for i in range(0, cfg.pool_size, 2048):
        x = render(scenes[i:i + 2048], device) * 2 - 1
        with autocast(device):
            z = vae.encode(x).latent_dist.mode()
        z = (z.float() - shift) * scale
        latents[i:i + x.shape[0]] = FluxPipeline._pack_latents(z, x.shape[0], c, side, side).to(torch.bfloat16)
    log(f"latent pool: {cfg.pool_size} scenes, {len(unique)} distinct captions, latents {list(latents.shape)} "
        f"(std {latents[:4096].float().std():.3f})")
    return {"latents": latents, "clip": clip_u[index].to(device), "t5": t5_u[index].to(device)}


# -- stage 3: the transformer and text encoders ----------------------------------------------------------------------

def save_trainables(run: Run, comps: dict[str, Any]) -> None:
    tensors = {f"{key}.{k}": v for key, mod in M.trainable_modules(comps).items() for k, v in mod.state_dict().items()}
    run.p["transformer"]["files"] = M.save_sharded(tensors, run.folder, M.TRAINABLE_PREFIX)
    run.save()


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN/inf; the run folder keeps its last saved (finite) state."""

    def __init__(self, step: int):
        super().__init__(f"non-finite transformer loss at step {step}")
        self.step = step


TRAIN_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
"""Attention kernels allowed in training forwards/backwards (not cuDNN: see ``train_transformer``)."""


def train_transformer(run: Run, comps: dict[str, Any], pool: dict[str, torch.Tensor], device: torch.device,
                      deadline: float, stop_after: int) -> None:
    from diffusers import FluxPipeline

    cfg, state, mcfg = run.cfg, run.p["transformer"], M.config_from_json(run.p["model"])
    mods = M.trainable_modules(comps)  # weights of earlier invocations are loaded by ``load_run``
    start = state["steps_done"]
    for mod in mods.values():
        mod.to(device).train().requires_grad_(True)
    params = [p for mod in mods.values() for p in mod.parameters()]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.99), fused=device.type == "cuda")
    side = 128 // 16
    img_ids = FluxPipeline._prepare_latent_image_ids(1, side, side, device, torch.float32)
    txt_ids = torch.zeros(mcfg.max_tokens, 3, device=device)
    empty_clip, empty_t5 = (t[0].to(device) for t in M.tokenize(comps["tokenizer"], comps["tokenizer_2"], [""],
                                                                  mcfg.max_tokens))
    n_pool = pool["latents"].shape[0]
    t_start, last_save = time.monotonic(), time.monotonic()
    acc, n, step = torch.zeros((), device=device), 0, start
    for step in range(start, cfg.steps):
        if time.monotonic() >= deadline or step - start >= stop_after:
            break
        lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio, start, cfg.resume_warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        gen = torch.Generator(device).manual_seed(stage_seed(cfg, "transformer", step))
        idx = torch.randint(0, n_pool, (cfg.batch,), generator=gen, device=device)
        x0 = pool["latents"][idx].float()
        drop = torch.rand(cfg.batch, generator=gen, device=device) < cfg.caption_dropout
        clip_ids = torch.where(drop[:, None], empty_clip[None], pool["clip"][idx])
        t5_ids = torch.where(drop[:, None], empty_t5[None], pool["t5"][idx])
        noise = torch.randn(x0.shape, generator=gen, device=device)
        sigma = torch.sigmoid(torch.randn(cfg.batch, generator=gen, device=device))
        xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        # SDPA limited to the flash/efficient/math kernels while training: PyTorch 2.11 (CUDA 13) picks cuDNN
        # attention on an H100/H200, whose backward gave gradient norms ~1e5 times those of the same step on the CPU
        # (6e5 vs 2.5) at Flux's 96-token joint sequence and NaN weights one step later (2026-11-27, H200).
        with autocast(device), sdpa_kernel(TRAIN_SDPA_BACKENDS):
            embeds, pooled = M.encode_text(mods["text_encoder"], mods["text_encoder_2"], clip_ids, t5_ids)
            pred = mods["transformer"](hidden_states=xt, timestep=sigma, pooled_projections=pooled,
                                       encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids,
                                       return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step - start < 3:  # which module's gradients are (non-)finite, before clipping mixes them
            log("grad norms: " + ", ".join(
                f"{k} {float(torch.nn.utils.get_total_norm([p.grad for p in m.parameters() if p.grad is not None])):.3g}"
                for k, m in mods.items()))
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        acc += loss.detach()
        n += 1
        if step - start < 3:  # the first steps of every invocation: fail in seconds, not after the whole budget
            value = float(loss.detach())
            log(f"transformer step {step + 1}/{cfg.steps} loss {value:.4f} (first steps of this invocation)")
            if not math.isfinite(value):
                parts = {"x0": x0, "noise": noise, "pooled": pooled, "embeds": embeds, "pred": pred}
                log("non-finite loss; finite parts: " + ", ".join(
                    f"{k} {bool(torch.isfinite(v).all())} (absmax {float(v.detach().float().abs().nan_to_num().max()):.3g})"
                    for k, v in parts.items()))
                raise NonFiniteLoss(step + 1)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            if not math.isfinite(float(acc)):
                raise NonFiniteLoss(step + 1)
            elapsed = time.monotonic() - t_start
            rate = (step + 1 - start) / elapsed
            state["log"].append([step + 1, float(acc) / n, lr])
            log(f"transformer step {step + 1}/{cfg.steps} loss {float(acc) / n:.4f} lr {lr:.2e} "
                f"({rate:.2f} it/s, {rate * cfg.batch:.0f} samples/s)")
            acc.zero_()
            n = 0
            if time.monotonic() - last_save > cfg.save_every_minutes * 60:
                state["steps_done"] = step + 1
                save_trainables(run, comps)
                last_save = time.monotonic()
    else:
        step = cfg.steps
    state["steps_done"] = step
    state["done"] = step >= cfg.steps
    for mod in mods.values():
        mod.eval().requires_grad_(False)
    save_trainables(run, comps)
    log(f"transformer stage: {step}/{cfg.steps} steps{' (done)' if state['done'] else ''}")


# -- evaluation and plots --------------------------------------------------------------------------------------------

def validation_scenes(cfg: TrainConfig, n: int) -> Scenes:
    """``n`` single-shape, plain-background training-distribution scenes (for choosing the guidance scale)."""
    pool = sample_scenes(max(64, n * 8), stage_seed(cfg, "eval"))
    keep = np.nonzero((pool.colour2 < 0) & (pool.bg2 < 0))[0][:n]
    return pool[keep]


@torch.no_grad()
def evaluate(run: Run, comps: dict[str, Any], device: torch.device) -> None:
    """Generate the held-out and validation captions with FluxPipeline at each guidance scale and score them
    with the committed adherence classifier; writes samples.png (held-out captions at the chosen scale)."""
    cfg, mcfg = run.cfg, M.config_from_json(run.p["model"])
    for key in ("vae", "text_encoder", "text_encoder_2", "transformer"):
        comps[key].to(device).eval()
    pipe = M.make_pipeline(comps)
    clf = load_classifier(device=device)
    sets = {"heldout": heldout_scenes()[: cfg.eval_count], "validation": validation_scenes(cfg, cfg.eval_count)}
    results: dict[str, Any] = {"steps": cfg.eval_steps, "by_guidance": {}}
    images_at: dict[float, torch.Tensor] = {}
    for g in cfg.eval_guidances:
        row = {}
        for name, scenes in sets.items():
            caps = scenes.captions()
            with torch.autocast(device.type, enabled=False):  # fp32 (TF32 matmuls on a GPU), as served
                out = pipe(prompt=caps, negative_prompt=[""] * len(caps), true_cfg_scale=g, height=128, width=128,
                           num_inference_steps=cfg.eval_steps, max_sequence_length=mcfg.max_tokens,
                           generator=torch.Generator("cpu").manual_seed(stage_seed(cfg, "eval")), output_type="pt")
            images = out.images.float().clamp(0, 1)
            row[name] = adherence(classify(clf, images), scenes)
            if name == "heldout":
                images_at[g] = images.cpu()
        results["by_guidance"][str(g)] = row
        log(f"eval guidance {g}: " + "; ".join(f"{k} " + " ".join(f"{a} {v:.2f}" for a, v in r.items())
                                                for k, r in row.items()))
    best = max(cfg.eval_guidances, key=lambda g: (results["by_guidance"][str(g)]["validation"]["all"], -g))
    results["chosen_guidance"] = best
    run.p["eval"] = results
    run.save()
    save_grid(images_at[best], run.folder / "samples.png")
    log(f"chosen guidance {best} (best validation adherence); held-out at it: "
        + " ".join(f"{a} {v:.2f}" for a, v in results["by_guidance"][str(best)]["heldout"].items()))


def save_grid(images: torch.Tensor, path: Path, cols: int = 8) -> None:
    from PIL import Image

    from services.shapes.render import to_uint8

    u = to_uint8(images)
    rows = math.ceil(len(u) / cols)
    h, w = u.shape[1:3]
    canvas = np.full((rows * h, cols * w, 3), 255, dtype=np.uint8)
    for i, im in enumerate(u):
        canvas[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = im
    Image.fromarray(canvas).save(path)


def plot_losses(run: Run, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    vae_log, tf_log = run.p["vae"]["log"], run.p["transformer"]["log"]
    if vae_log:
        axes[0].plot([r[0] for r in vae_log], [r[1] for r in vae_log])
    axes[0].set(title="VAE: L1 reconstruction", xlabel="step", yscale="log")
    if tf_log:
        axes[1].plot([r[0] for r in tf_log], [r[1] for r in tf_log])
    axes[1].set(title="Transformer: flow-matching loss", xlabel="step", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"chitu-shapes-flux training (seed {run.cfg.seed})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ------------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    global T0, _CALLS
    if _CALLS:  # a later call in the same process (tests): its deadline counts from now
        T0 = time.monotonic()
    _CALLS += 1
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="run folder (created, or resumed when it exists)")
    parser.add_argument("--preset", default=None, choices=sorted(PRESET_TRAIN),
                        help="settings of a new run (default demo); a resumed run keeps its own")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="TrainConfig override")
    parser.add_argument("--deadline-minutes", type=float, default=9.0,
                        help="stop training so that this invocation ends within this many minutes of its start")
    parser.add_argument("--reserve-seconds", type=float, default=50.0,
                        help="time kept for saving, evaluation and plots before the deadline")
    parser.add_argument("--stop-after-steps", type=int, default=10**9,
                        help="stop each stage after this many steps in this invocation (tests of resumption)")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto")
    parser.add_argument("--skip-eval", action="store_true", help="no evaluation at the end of this invocation")
    parser.add_argument("--deterministic", action="store_true",
                        help="request deterministic kernels (torch.use_deterministic_algorithms, warn-only); off by "
                             "default: on an H100 (torch 2.11) this mode gave a NaN loss from the first steps")
    args = parser.parse_args(argv)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (read at handle creation)

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    # Deterministic kernels where they exist (warn, never fail, where none does): a second run with the same seed
    # should give the same model, not merely an equally good one, or its scores would differ by sampling noise.
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(args.deterministic, warn_only=True)
    try:
        return _run(args, device)
    except NonFiniteLoss as exc:
        log(f"STATUS FAILED: {exc}; nothing of this invocation's transformer training was saved")
        return 2
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _run(args: argparse.Namespace, device: torch.device) -> int:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.deterministic = args.deterministic
        torch.backends.cudnn.benchmark = False
    deadline = T0 + args.deadline_minutes * 60 - args.reserve_seconds
    run = Run.open(args.run_dir, args.preset, args.set)
    cfg = run.cfg
    record: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "vae_from": run.p["vae"]["steps_done"], "transformer_from": run.p["transformer"]["steps_done"]}
    comps = M.load_run(run.folder)[1] if run.p["vae"]["done"] else _fresh_components(run)
    if not run.p["vae"]["done"]:
        train_vae(run, comps, device, deadline, args.stop_after_steps)
    if run.p["vae"]["done"] and not run.p["transformer"]["done"]:
        if time.monotonic() < deadline - 30:
            pool = build_pool(run, comps, device)
            train_transformer(run, comps, pool, device, deadline, args.stop_after_steps)
            del pool
        else:
            log("too little time left for the transformer stage in this invocation")
    run.p["finished"] = bool(run.p["vae"]["done"] and run.p["transformer"]["done"])
    record.update(vae_to=run.p["vae"]["steps_done"], transformer_to=run.p["transformer"]["steps_done"],
                  train_seconds=round(time.monotonic() - T0, 1))
    if run.p["transformer"]["steps_done"] and not args.skip_eval:
        evaluate(run, comps, device)
    plot_losses(run, run.folder / "loss.png")
    record["seconds"] = round(time.monotonic() - T0, 1)
    run.p["invocations"].append(record)
    run.save()
    files = sorted(p.name for p in run.folder.iterdir() if not p.name.startswith("."))
    log(f"files: {files}")
    status = "FINISHED" if run.p["finished"] else "CONTINUE (run the same command again on this run folder)"
    log(f"STATUS {status}: vae {run.p['vae']['steps_done']}/{cfg.vae_steps}, transformer "
        f"{run.p['transformer']['steps_done']}/{cfg.steps}, this invocation {record['seconds']:.0f}s on {record['device']}")
    return 0


def _fresh_components(run: Run) -> dict[str, Any]:
    """Components of a run whose VAE is not finished (VAE weights, if any, are loaded by ``train_vae``)."""
    mcfg = M.config_from_json(run.p["model"])
    tok, tok2 = M.make_tokenizers(M.TokenizerVocab(**run.p["tokenizers"]), mcfg.max_tokens)
    return M.build_components(mcfg, tok, tok2, seed=run.cfg.seed)


if __name__ == "__main__":
    raise SystemExit(main())
