"""FlexCache benchmark: every strategy over 2-3 settings against full compute of the same model in the same run.

Per setting it reports the speed-up over full compute (wall time of the whole denoising run, same process, same
inputs), PSNR and SSIM of the output against the full-compute output (``services.quality``), the fraction of
transformer block compute the cache skipped, the cache's own memory and the device's peak memory. Per model it
writes a markdown table and a speed-vs-PSNR plot (PNG, when matplotlib is installed) under ``--out``.

Models (``--models``):

- ``demo``: the trained demo model (``services.assets.EMBEDDED_CHECKPOINT``, once trained), with its own encoder
  and VAE: PSNR/SSIM on the decoded images, averaged over a few prompts and seeds. The honest quality reference.
- ``flux-dev``: the real-size Flux.1-dev transformer at 1024^2 (4096 image + 512 text tokens) with RANDOM weights
  (bf16): speed at the real shape. Quality numbers of random weights are reported on the latents and are labelled
  as such; they say nothing about image quality.
- ``tiny``: the tiny random-weight Flux checkpoint (``--device cpu --tiny`` runs only this, as a CI smoke test).

    python benchmarks/cache.py                                   # GPU: demo (if trained) + flux-dev, 50 steps
    python benchmarks/cache.py --device cpu --tiny               # CPU smoke test on the tiny checkpoint
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from denoiser_svc.cache import policy_from_dict  # noqa: E402
from denoiser_svc.config import DenoiserServiceConfig  # noqa: E402
from denoiser_svc.types import DenoiseJob  # noqa: E402
from denoiser_svc.worker import Worker  # noqa: E402
from services.config import load_config  # noqa: E402
from services.families.base import SamplingParams  # noqa: E402
from services.quality import psnr, ssim  # noqa: E402

FLUX_DEV = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
            "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
            "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}
FLUX_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                  "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
PROMPTS = ("a large red circle on the left, on a blue background",
           "a small yellow star in the center, on a black background",
           "a green triangle at the top right, on a white background",
           "two purple squares near the bottom, on an orange background")


def settings(blocks: int) -> dict[str, list[dict[str, Any]]]:
    """2-3 settings per strategy, from conservative to aggressive (block counts fitted to the model's depth)."""
    f, b = max(1, blocks // 8), max(0, blocks // 16)
    return {
        "teacache": [{"threshold": 0.25}, {"threshold": 0.4}, {"threshold": 0.6}],
        "first_block": [{"threshold": 0.05}, {"threshold": 0.08}, {"threshold": 0.12}],
        "magcache": [{"threshold": 0.06, "max_consecutive_hits": 2}, {"threshold": 0.12, "max_consecutive_hits": 3},
                     {"threshold": 0.24, "max_consecutive_hits": 5, "retention_fraction": 0.1}],
        "meancache": [{"fresh_fraction": 0.5}, {"fresh_fraction": 0.35}, {"fresh_fraction": 0.25}],
        "taylorseer": [{"interval": 3, "order": 1}, {"interval": 4, "order": 2}, {"interval": 6, "order": 2}],
        "blockdance": [{"interval": 2, "reuse_fraction": 0.5}, {"interval": 3, "reuse_fraction": 0.6}],
        "dbcache": [{"threshold": 0.08, "front_blocks": f, "back_blocks": b, "max_consecutive_hits": 3},
                    {"threshold": 0.12, "front_blocks": f, "back_blocks": b, "max_consecutive_hits": 4},
                    {"threshold": 0.2, "front_blocks": 1, "back_blocks": 0, "max_consecutive_hits": 0}],
        "pab": [{"interval": 2}, {"interval": 3}, {"interval": 4, "start_fraction": 0.1, "end_fraction": 0.95}],
    }


@dataclass
class Sample:
    """One request of a model's benchmark (a prompt and seed)."""

    conditionings: dict[str, torch.Tensor]
    negative_conditionings: dict[str, torch.Tensor]
    seed: int


@dataclass
class Model:
    name: str
    worker: Worker
    params: SamplingParams
    samples: list[Sample]
    random_weights: bool
    decode: Any = None
    """latents -> uint8 images [F, H, W, 3] (None: quality is measured on the latents)."""


@dataclass
class Row:
    model: str
    strategy: str
    setting: str
    seconds: float
    speedup: float = 1.0
    psnr_db: float = math.inf
    ssim: float = 1.0
    skipped: float = 0.0
    hit_steps: int = 0
    cache_mib: float = 0.0
    peak_gib: float = float("nan")
    notes: list[str] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(model: Model, policy: dict[str, Any] | None) -> tuple[list[torch.Tensor], float, dict[str, str], float]:
    """Every sample once under ``policy``: (latents per sample, seconds, cache metadata of the last, peak bytes)."""
    worker, device = model.worker, model.worker.device
    cache = None if policy is None else policy_from_dict(policy)
    outs, meta = [], {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    for i, sample in enumerate(model.samples):
        job = DenoiseJob(request_id=f"bench-{i}", params=dataclass_replace(model.params, seed=sample.seed),
                         conditionings=sample.conditionings, negative_conditionings=sample.negative_conditionings,
                         start_step=0, end_step=model.params.steps, cache=cache)
        worker.add_request(job)
        for step in range(model.params.steps):
            worker.execute_step(job.request_id, step)
        done = worker.finish_request(job.request_id)
        outs.append(done.latents)
        meta = done.metadata
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
    return outs, seconds, meta, peak


def dataclass_replace(params: SamplingParams, **kw: Any) -> SamplingParams:
    return SamplingParams(**{**params.__dict__, **kw})


def quality(model: Model, outs: list[torch.Tensor], refs: list[torch.Tensor]) -> tuple[float, float]:
    """Mean PSNR (dB) and SSIM over the samples: on decoded images, or on the latents for random weights."""
    ps, ss = [], []
    for out, ref in zip(outs, refs, strict=True):
        if model.decode is not None:
            a, b = model.decode(out), model.decode(ref)
            ps.append(psnr(a, b))
            ss.append(ssim(a, b))
        else:  # latents as an image: [B, S, C] tokens -> [S, C] "pixels"; data range of the reference
            a, b = out.float().reshape(-1, out.shape[-1]), ref.float().reshape(-1, ref.shape[-1])
            rng = float(b.max() - b.min())
            ps.append(psnr(a[None], b[None], data_range=rng))
            side = int(math.isqrt(a.shape[0]))
            ss.append(ssim(a[: side * side].reshape(side, side, -1), b[: side * side].reshape(side, side, -1),
                           data_range=rng) if side >= 4 else float("nan"))
    finite = [p for p in ps if math.isfinite(p)]
    return (sum(finite) / len(finite) if len(finite) == len(ps) else math.inf), sum(ss) / len(ss)


def benchmark(model: Model, repeats: int) -> list[Row]:
    """Full compute (timed before and after the sweep: the faster one is the reference), then every setting."""
    blocks = model.worker.runner.cache.spec.total_blocks
    run(model, None)  # warm-up (kernel selection, allocator, lazy init)
    full_times, refs, peak_full = [], None, float("nan")
    for _ in range(repeats):
        refs, seconds, _, peak_full = run(model, None)
        full_times.append(seconds)
    rows = [Row(model.name, "full", "-", min(full_times), peak_gib=peak_full / 2**30)]
    print(f"[{model.name}] full compute: {min(full_times):.3f} s for {len(model.samples)} x {model.params.steps} "
          f"steps", flush=True)
    rows += sweep(model, blocks, refs, repeats)
    again = [run(model, None)[1] for _ in range(repeats)]
    full = min(*full_times, *again)
    rows[0].seconds = full
    rows[0].notes.append(f"full compute timed {min(full_times):.3f} s before and {min(again):.3f} s after the sweep")
    for row in rows[1:]:
        row.speedup = full / row.seconds if math.isfinite(row.seconds) else float("nan")
    return rows


def sweep(model: Model, blocks: int, refs: list[torch.Tensor], repeats: int) -> list[Row]:
    rows = []
    for strategy, variants in settings(blocks).items():
        for setting in variants:
            policy = {"strategy": strategy, **setting}
            try:
                times, outs, meta, peak = [], None, {}, float("nan")
                for _ in range(repeats):
                    outs, seconds, meta, peak = run(model, policy)
                    times.append(seconds)
            except Exception as exc:  # noqa: BLE001 - a setting the model cannot use is reported, not fatal
                rows.append(Row(model.name, strategy, _describe(setting), float("nan"), notes=[str(exc)[:120]]))
                continue
            p, s = quality(model, outs, refs)
            row = Row(model.name, strategy, _describe(setting), min(times), psnr_db=p,
                      ssim=s, skipped=float(meta.get("cache.skipped_fraction", 0)),
                      hit_steps=int(meta.get("cache.hit_steps", 0)),
                      cache_mib=int(meta.get("cache.memory_bytes", 0)) / 2**20, peak_gib=peak / 2**30)
            rows.append(row)
            print(f"[{model.name}] {strategy:11s} {row.setting:55s} {row.seconds:8.3f} s  PSNR {row.psnr_db:6.2f} dB  "
                  f"SSIM {row.ssim:.4f}  skipped {row.skipped:.2f}  cache {row.cache_mib:9.3f} MiB", flush=True)
    return rows


def _describe(setting: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in setting.items())


# -- models -------------------------------------------------------------------------------------------------------
def make_worker(checkpoint: Path, device: str, dtype: str, compile_blocks: bool, handle: Any = None) -> Worker:
    overrides = [f"model.checkpoint={checkpoint}", f"model.device={device}", f"model.dtype={dtype}", "warmup=false",
                 f"runtime.compile={'on' if compile_blocks else 'off'}"]
    worker = Worker(load_config(DenoiserServiceConfig, overrides=overrides))
    worker.init_device()
    worker.load_model(handle)
    if compile_blocks:
        from services.runtime import regional_compile

        regional_compile(worker.transformer_of(worker.runner.model), worker.config.runtime, worker.device)
    return worker


def checkpoint_model(name: str, checkpoint: Path, args: argparse.Namespace, random_weights: bool) -> Model:
    """A model from a checkpoint folder with encoder and VAE (the demo model, the tiny checkpoint)."""
    worker = make_worker(checkpoint, args.device, args.dtype, args.compile)
    adapter = worker.adapter
    lim = adapter.limits()
    encoder = adapter.load_encoder(torch.float32, torch.device("cpu"))
    vae = adapter.load_vae(worker.dtype, worker.device)
    prompts = PROMPTS[: args.samples]
    samples = []
    for i, prompt in enumerate(prompts):
        enc = adapter.encode(encoder, prompt, "" if lim.guidance_kind == "cfg" else None)
        samples.append(Sample(enc.conditionings, enc.negative_conditionings, seed=1000 + i))
    params = SamplingParams(width=lim.default_width, height=lim.default_height, steps=args.steps,
                            guidance_scale=lim.default_guidance_scale, seed=0, frames=lim.default_frames)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        return adapter.decode(vae, latents, params)

    return Model(name, worker, params, samples, random_weights, decode)


def flux_dev_model(args: argparse.Namespace, workdir: Path) -> Model:
    """The real-size Flux.1-dev transformer with random weights, built on the device."""
    import diffusers

    from services.families.flux import FluxAdapter
    from services.tiny.flux import flux_scheduler

    folder = workdir / "flux-dev-config"
    index = {"_class_name": "FluxPipeline", "_diffusers_version": diffusers.__version__,
             "transformer": ["diffusers", "FluxTransformer2DModel"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    for comp, cls, cfg, fname in (("transformer", "FluxTransformer2DModel", FLUX_DEV, "config.json"),
                                  ("scheduler", "FlowMatchEulerDiscreteScheduler", FLUX_SCHEDULER,
                                   "scheduler_config.json")):
        (folder / comp).mkdir(parents=True, exist_ok=True)
        (folder / comp / fname).write_text(json.dumps({"_class_name": cls, **cfg}))
    (folder / "model_index.json").write_text(json.dumps(index))
    adapter = FluxAdapter(folder)
    dtype = torch.bfloat16 if args.dtype in ("auto", "bfloat16") else getattr(torch, args.dtype)
    device = torch.device("cuda" if args.device in ("auto", "cuda") else args.device)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = diffusers.FluxTransformer2DModel(**FLUX_DEV)
    finally:
        torch.set_default_dtype(previous)
    transformer.eval().requires_grad_(False)
    pipe = diffusers.FluxPipeline(scheduler=flux_scheduler(), vae=None, text_encoder=None, tokenizer=None,
                                  text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    worker = make_worker(folder, args.device, args.dtype, args.compile, adapter.denoiser_handle(pipe))
    gen = torch.Generator("cpu").manual_seed(0)
    sample = Sample({"prompt_embeds": torch.randn(1, 512, FLUX_DEV["joint_attention_dim"], generator=gen),
                     "pooled_prompt_embeds": torch.randn(1, FLUX_DEV["pooled_projection_dim"], generator=gen)}, {}, 7)
    params = SamplingParams(width=1024, height=1024, steps=args.steps, guidance_scale=3.5, seed=0)
    return Model("flux-dev (random weights)", worker, params, [sample], True, None)


# -- reporting -------------------------------------------------------------------------------------------------------
def markdown(rows: list[Row], model: Model, device: str, args: argparse.Namespace) -> str:
    where = "decoded images" if model.decode is not None else "latents"
    label = " RANDOM WEIGHTS: quality numbers are not image quality." if model.random_weights else ""
    lines = [f"## {model.name}: {model.params.width}x{model.params.height}, {model.params.steps} steps, "
             f"{len(model.samples)} sample(s), {device}, {model.worker.dtype}, compile={'on' if args.compile else 'off'}",
             "", f"PSNR/SSIM vs full compute on the {where}.{label}", "",
             "| strategy | setting | speed-up | PSNR (dB) | SSIM | skipped | hit steps | cache MiB | peak GiB | s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        note = f" ({'; '.join(r.notes)})" if r.notes else ""
        peak = f"{r.peak_gib:.2f}" if math.isfinite(r.peak_gib) else "n/a"
        lines.append(f"| {r.strategy} | {r.setting}{note} | {r.speedup:.2f} | {r.psnr_db:.2f} | {r.ssim:.4f} | "
                     f"{r.skipped:.2f} | {r.hit_steps} | {r.cache_mib:.3f} | {peak} | {r.seconds:.3f} |")
    ok30 = [r for r in rows if r.skipped > 0 and r.psnr_db >= 30]
    ok25 = [r for r in rows if r.skipped > 0 and r.psnr_db >= 25]
    best30 = max(ok30, key=lambda r: r.speedup, default=None)
    best25 = max(ok25, key=lambda r: r.speedup, default=None)
    lines += ["", f"Fastest at PSNR >= 30 dB: {_best(best30)}; fastest at PSNR >= 25 dB: {_best(best25)}."]
    return "\n".join(lines) + "\n"


def _best(row: Row | None) -> str:
    return "none" if row is None else f"{row.strategy} ({row.setting}) x{row.speedup:.2f} at {row.psnr_db:.1f} dB"


def plot(rows: list[Row], path: Path, title: str) -> bool:
    """Speed-up vs PSNR, one colour per strategy; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for strategy in dict.fromkeys(r.strategy for r in rows if r.strategy != "full"):
        pts = [(r.speedup, min(r.psnr_db, 60.0)) for r in rows if r.strategy == strategy and math.isfinite(r.speedup)]
        if pts:
            ax.plot(*zip(*sorted(pts), strict=True), marker="o", label=strategy)
    ax.axvline(2.0, color="gray", lw=0.6, ls="--")
    ax.axvline(3.0, color="gray", lw=0.6, ls="--")
    ax.axhline(30.0, color="gray", lw=0.6, ls=":")
    ax.axhline(25.0, color="gray", lw=0.6, ls=":")
    ax.set_xlabel("speed-up vs full compute (same run)")
    ax.set_ylabel("PSNR vs full compute (dB, capped at 60)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--tiny", action="store_true", help="only the tiny checkpoint (CPU smoke test)")
    p.add_argument("--models", default="demo,flux-dev", help="comma list of demo, flux-dev, tiny")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; 8 with --tiny)")
    p.add_argument("--samples", type=int, default=4, help="prompts per checkpoint model (demo)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per setting, the fastest kept (default 3 on a GPU, where a small model's step is "
                        "host-bound and noisy; 1 on the CPU)")
    p.add_argument("--compile", action="store_true", help="regional torch.compile of the blocks (both sides)")
    p.add_argument("--out", default=str(REPO / "outputs" / "bench-cache"), help="folder for tables, plots, JSON")
    p.add_argument("--threads", type=int, default=1, help="CPU threads on --device cpu (1: steadier timings)")
    args = p.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.tiny:
        args.models, args.samples = "tiny", min(args.samples, 2)
    args.steps = args.steps or (8 if args.tiny else 50)
    args.repeats = args.repeats or (3 if args.device.startswith("cuda") else 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from services.assets import EMBEDDED_CHECKPOINT, build_tiny

    with tempfile.TemporaryDirectory(prefix="chitu-bench-cache-") as tmp:
        for name in args.models.split(","):
            if name == "demo":
                if not (EMBEDDED_CHECKPOINT / "model_index.json").is_file():
                    print(f"[demo] skipped: the trained demo model is not in the tree ({EMBEDDED_CHECKPOINT})")
                    continue
                model = checkpoint_model("demo (chitu-shapes-flux)", EMBEDDED_CHECKPOINT, args, random_weights=False)
            elif name == "flux-dev":
                model = flux_dev_model(args, Path(tmp))
            elif name == "tiny":
                ckpt = build_tiny("flux", Path(tmp) / "tiny-flux")
                model = checkpoint_model("tiny-flux (random weights)", ckpt, args, random_weights=True)
            else:
                raise SystemExit(f"unknown model {name!r}; choose from demo, flux-dev, tiny")
            rows = benchmark(model, args.repeats)
            slug = name
            table = markdown(rows, model, str(model.worker.device), args)
            (out / f"cache-{slug}.md").write_text(table)
            (out / f"cache-{slug}.json").write_text(json.dumps([asdict(r) for r in rows], indent=2, default=str))
            plotted = plot(rows, out / f"cache-{slug}.png", f"FlexCache on {model.name}")
            print(table)
            print(f"wrote {out / f'cache-{slug}.md'}" + (f" and {out / f'cache-{slug}.png'}" if plotted else
                                                          " (no plot: matplotlib is not installed)"))
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
