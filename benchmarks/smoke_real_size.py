"""Real-size smoke run of every model family through the whole stack (issue 5), one family at a time.

For each family: build a random-weight checkpoint folder at the released model's sizes (the ``services.tiny``
builders with ``real=True``, initialised on the GPU, bf16), bring the four services up (``clients.stack``), generate
at the family's native size with a few steps, read the per-step time from the result and every stage's peak memory
from its info RPC, stop the stack and delete the folder (the GPU machine's disk holds one large model at a time).
A family that fails (out of memory, too large for the card) is recorded with its error, never faked.

    python benchmarks/smoke_real_size.py --results $OUT/RESULTS.md                 # GPU: the default family list
    python benchmarks/smoke_real_size.py --families wan2.2-a14b --results ...      # one family
    python benchmarks/smoke_real_size.py --tiny --device cpu                       # the same code on tiny models (CI)
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass(frozen=True)
class Family:
    """One smoke case: how to build its folder, and what to ask for."""

    name: str
    build: Callable[[Path, bool, str], Path]
    """(folder, real, device) -> folder."""
    width: int
    height: int
    frames: int = 1
    guidance: float | None = None
    negative: str = ""


def _image_builder(module: str, fn: str) -> Callable[[Path, bool, str], Path]:
    def build(out: Path, real: bool, device: str) -> Path:
        import importlib

        import torch

        builder = getattr(importlib.import_module(module), fn)
        return builder(out, real=real, device=device, dtype=torch.bfloat16 if real else torch.float32)
    return build


def _wan_builder(variant: str) -> Callable[[Path, bool, str], Path]:
    def build(out: Path, real: bool, device: str) -> Path:
        import torch

        from services.tiny.wan import build_wan, real_size_configs, tiny_configs

        if not real:
            return build_wan(out, tiny_configs(two_experts=variant.startswith("wan2.2")))
        return build_wan(out, real_size_configs(variant), dtype=torch.bfloat16, device=device,
                         link_experts=variant.startswith("wan2.2"))
    return build


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("flux", _image_builder("services.tiny.flux", "make_tiny_flux"), 1024, 1024, guidance=3.5),
    Family("flux2_klein", _image_builder("services.tiny.flux2_klein", "make_tiny_flux2_klein"), 1024, 1024),
    Family("z_image", _image_builder("services.tiny.z_image", "make_tiny_z_image"), 1024, 1024, guidance=0.0),
    Family("qwen_image", _image_builder("services.tiny.qwen_image", "make_tiny_qwen_image"), 1024, 1024,
           guidance=4.0, negative="blurry"),
    Family("wan2.1-1.3b", _wan_builder("wan2.1-t2v-1.3b"), 832, 480, frames=81, guidance=5.0),
    Family("wan2.2-a14b", _wan_builder("wan2.2-t2v-a14b"), 832, 480, frames=81, guidance=4.0),
)}
DEFAULT_FAMILIES = "flux,flux2_klein,z_image,wan2.1-1.3b,qwen_image,wan2.2-a14b"
TINY_SIZE = {"flux": (64, 64, 1), "flux2_klein": (64, 64, 1), "z_image": (64, 64, 1), "qwen_image": (64, 64, 1),
             "wan2.1-1.3b": (32, 32, 5), "wan2.2-a14b": (32, 32, 5)}


@dataclass
class Row:
    family: str
    width: int
    height: int
    frames: int
    steps: int
    build_s: float = float("nan")
    checkpoint_gb: float = float("nan")
    start_s: float = float("nan")
    step_s_median: float = float("nan")
    step_s_sum: float = float("nan")
    stages_s: dict[str, float] = field(default_factory=dict)
    peak_gb: dict[str, float] = field(default_factory=dict)
    note: str = ""


def _folder_gb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) / 1e9


def run_family(fam: Family, args: argparse.Namespace, workdir: Path) -> Row:
    from clients.client import ChituClient, GenerateOptions
    from clients.stack import LocalStack, StackConfig

    width, height, frames = TINY_SIZE[fam.name] if args.tiny else (fam.width, fam.height, fam.frames)
    row = Row(fam.name, width, height, frames, args.steps)
    folder = workdir / fam.name
    stack = None
    try:
        t0 = time.perf_counter()
        fam.build(folder, not args.tiny, args.device)
        row.build_s, row.checkpoint_gb = time.perf_counter() - t0, _folder_gb(folder)
        overrides = {"denoiser": [f"runtime.compile={args.compile}"]}
        if args.vae_float32:
            overrides["vae"] = ["model.dtype=float32"]
        cfg = StackConfig(checkpoints={fam.name: str(folder)}, listen="127.0.0.1:0", device=args.device,
                          dtype="bfloat16" if args.device == "cuda" else "float32", start_timeout_seconds=1200,
                          stage_overrides=overrides)
        stack = LocalStack(cfg, workdir=workdir / f"stack-{fam.name}")
        t0 = time.perf_counter()
        stack.start()
        row.start_s = time.perf_counter() - t0
        with ChituClient(stack.address) as client:
            opts = GenerateOptions(width=width, height=height, frames=frames if frames > 1 else None,
                                   steps=args.steps, seed=0, guidance_scale=fam.guidance, negative_prompt=fam.negative,
                                   formats=[args.video_format] if frames > 1 else ["png"])
            result = client.generate_result("a red circle on the left, on a blue background", fam.name, opts,
                                            timeout=1800)
            steps = list(result.timings.step_seconds)
            row.step_s_median = statistics.median(steps[1:] or steps)  # the first step may pay lazy set-up
            row.step_s_sum = sum(steps)
            from services.proto.chitu.v1 import common_pb2

            for s in result.timings.stages:  # Wan2.2: one denoise segment per expert group, summed
                name = common_pb2.Stage.Name(s.stage).removeprefix("STAGE_").lower()
                row.stages_s[name] = round(row.stages_s.get(name, 0.0) + s.seconds, 3)
            for model in client.list_models().models:
                for ep in model.endpoints:
                    md = dict(ep.info.metadata)
                    stage = common_pb2.Stage.Name(ep.stage).removeprefix("STAGE_").lower()
                    peak = int(md.get("cuda_peak_allocated_bytes", md.get("peak_rss_bytes", "0")))
                    key = stage if stage not in row.peak_gb else f"{stage}_2"  # Wan2.2's second expert group
                    row.peak_gb[key] = round(peak / 1e9, 2)
    except Exception as exc:  # noqa: BLE001 - a family that does not fit is recorded, and the run goes on
        row.note = f"failed: {type(exc).__name__}: {exc}"[:400]
        traceback.print_exc()
    finally:
        if stack is not None:
            stack.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return row


def table(rows: list[Row]) -> list[str]:
    lines = ["| family | size | steps | build (s) | checkpoint (GB) | stack start (s) | step median (s) | "
             "encode / denoise / decode (s) | peak memory per stage (GB) | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        size = f"{r.width}x{r.height}" + (f"x{r.frames}f" if r.frames > 1 else "")
        stages = " / ".join(f"{r.stages_s.get(k, float('nan')):.2f}" for k in ("encode", "denoise", "decode"))
        peaks = ", ".join(f"{k} {v}" for k, v in r.peak_gb.items())
        lines.append(f"| {r.family} | {size} | {r.steps} | {r.build_s:.0f} | {r.checkpoint_gb:.1f} | {r.start_s:.0f} "
                     f"| {r.step_s_median:.3f} | {stages} | {peaks} | {r.note} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=DEFAULT_FAMILIES, help=f"comma-separated, from {sorted(FAMILIES)}")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny checkpoints and sizes (CPU smoke of this script)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--compile", choices=["on", "off"], default="off", help="regional compile in the denoiser")
    p.add_argument("--vae-float32", action="store_true", help="VAE stage in float32 (bf16 otherwise)")
    p.add_argument("--video-format", choices=["mp4", "raw"], default="mp4",
                   help="what a video family's VAE stage returns (raw: RGB frames, no PyAV needed)")
    p.add_argument("--workdir", default="/tmp/chitu-smoke")
    p.add_argument("--results", default=None, help="append the table to this markdown file")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    names = [n for n in args.families.split(",") if n]
    unknown = sorted(set(names) - set(FAMILIES))
    if unknown:
        p.error(f"unknown families {unknown}; known: {sorted(FAMILIES)}")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        row = run_family(FAMILIES[name], args, workdir)
        rows.append(row)
        print(json.dumps(asdict(row)), flush=True)
        if args.out:  # after every family: a run cut by its time limit keeps what it measured
            Path(args.out).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    lines = table(rows)
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    if args.results:
        import torch

        card = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
        head = (f"\n## Real-size smoke (issue 5): {datetime.date.today().isoformat()}, {card}, torch "
                f"{torch.__version__}{', tiny' if args.tiny else ''}\n\n`python benchmarks/smoke_real_size.py "
                f"{' '.join(argv if argv is not None else sys.argv[1:])}`: random weights at the released sizes, "
                f"bf16, the four services as processes on one GPU; step median excludes the first step.\n\n")
        with Path(args.results).open("a") as f:
            f.write(head + "\n".join(lines) + "\n")
    return 0 if all(not r.note for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
