"""Wan2.1 and Wan2.2 through real service processes on loopback ports, against WanPipeline in one process.

One stack serves three tiny checkpoints built with the same seed, so their UMT5 and VAE are identical: one encoder
and one VAE shared by all, a denoiser group for Wan2.1, and two denoiser groups (high- and low-noise expert) for
Wan2.2 and for a copy of it whose boundary_ratio leaves the first expert no step. Tolerances (CPU, float32, same
kernels in the same order as the pipeline): frames within 1/255 (in practice identical), latents within 1e-5
relative.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from clients.client import ChituClient, GenerateOptions
from clients.output import result_summary
from services import codec
from services.media import decode_png
from services.proto.chitu.v1 import (
    common_pb2,
    denoiser_pb2,
    denoiser_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    vae_pb2,
    vae_pb2_grpc,
)
from tests.reference import rel_err, wan_reference
from vae_svc.video import decode_mp4

pytestmark = pytest.mark.e2e

PROMPT = "a small red circle on the left, on a blue background"
NEGATIVE = "blurry, dark"
W, H, FRAMES, SEED = 32, 48, 9, 1234  # non-square, 3 latent frames
WAN = {"steps": 3, "guidance": 5.0}
WAN22 = {"steps": 4, "guidance": 4.0, "guidance_2": 2.5}  # tiny boundary 0.875, shift 3: expert 1 runs steps [0, 2)


@pytest.fixture(scope="module")
def wan22_late(tiny_wan22: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wan2.2 with boundary_ratio 0.9999: every timestep (<= 999) is below the boundary, so the high-noise
    expert's share is empty and the low-noise expert runs the whole schedule."""
    folder = tmp_path_factory.mktemp("late") / "tiny-wan22-late"
    shutil.copytree(tiny_wan22, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": 0.9999}))
    return folder


@pytest.fixture(scope="module")
def wan_stack(tiny_wan: Path, tiny_wan22: Path, wan22_late: Path, tmp_path_factory: pytest.TempPathFactory):
    from clients.stack import LocalStack, StackConfig

    cfg = StackConfig(checkpoints={"tiny-wan": str(tiny_wan), "tiny-wan22": str(tiny_wan22),
                                   "tiny-wan22-late": str(wan22_late)},
                      listen="127.0.0.1:0", device="cpu", dtype="float32", hash_cache="",
                      stage_gpus={"denoiser:tiny-wan22.transformer_2": "1", "vae": "0"})
    stack = LocalStack(cfg, workdir=tmp_path_factory.mktemp("wan-stack"))
    stack.start()
    yield stack
    stack.stop()


def test_stage_gpus_reach_the_service_processes(wan_stack) -> None:
    """``stage_gpus`` sets each named service's ``CUDA_VISIBLE_DEVICES`` (read back from the running processes):
    Wan2.2's second expert group sees GPU 1, the VAE GPU 0, the others what this process sees."""
    import os

    def visible(kind: str, name: str) -> str | None:
        pid = wan_stack.service(kind, name).process.pid
        env = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
        return env.get("CUDA_VISIBLE_DEVICES")

    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    assert visible("denoiser", "tiny-wan22.transformer_2") == "1"
    assert visible("denoiser", "tiny-wan22") == inherited
    assert {visible("vae", svc.name) for svc in wan_stack.services if svc.kind == "vae"} == {"0"}
    assert visible("encoder", "tiny-wan") == inherited


def _frames(result: generation_pb2.GenerationResult) -> np.ndarray:
    raw = [a for a in result.artifacts if a.format == vae_pb2.MEDIA_FORMAT_RAW_RGB8]
    assert len(raw) == 1, [a.name for a in result.artifacts]
    a = raw[0]
    return np.frombuffer(a.data, dtype=np.uint8).reshape(a.frames, a.height, a.width, 3)


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_wan21_video_equals_pipeline(wan_stack, tiny_wan: Path) -> None:
    """Raw frames through four processes == WanPipeline (true CFG, negative prompt); the MP4 and the PNG frames
    hold the same video."""
    opts = GenerateOptions(negative_prompt=NEGATIVE, width=W, height=H, frames=FRAMES, steps=WAN["steps"],
                           guidance_scale=WAN["guidance"], seed=SEED, formats=["raw", "mp4", "png"])
    with ChituClient(wan_stack.address) as c:
        result = c.generate_result(PROMPT, "tiny-wan", opts, timeout=120)
    ours = _frames(result)
    ref = wan_reference(tiny_wan, PROMPT, negative_prompt=NEGATIVE, width=W, height=H, frames=FRAMES,
                        steps=WAN["steps"], guidance=WAN["guidance"], seed=SEED)
    assert ref.shape == (FRAMES, H, W, 3)
    assert ref.std() > 1.0, "the reference video is flat: the comparison would prove nothing"
    assert _max_diff(ours, ref) <= 1
    assert (result.frames, result.fps) == (FRAMES, 16.0)

    mp4 = [a for a in result.artifacts if a.format == vae_pb2.MEDIA_FORMAT_MP4]
    assert len(mp4) == 1 and mp4[0].mime_type == "video/mp4" and mp4[0].frames == FRAMES
    video, fps = decode_mp4(mp4[0].data)
    assert video.shape == (FRAMES, H, W, 3) and fps == 16.0
    # H.264 at crf 18 with 4:2:0 chroma is lossy; it still has to be the same video, not just any video: far closer
    # to ours than ours is to itself moved by half the width (same pixels and statistics, other places); measured
    # 9.7 vs 24.5 /255 (the tiny model's 48x32 frames are noise-like, which 4:2:0 H.264 keeps least well)
    same = np.abs(video.astype(float) - ours.astype(float)).mean()
    moved = np.abs(np.roll(ours, W // 2, axis=2).astype(float) - ours.astype(float)).mean()
    print(f"MP4 vs raw frames: mean abs diff {same:.2f} /255; raw vs itself moved: {moved:.2f}")
    assert same < 12.0 and same < 0.5 * moved, (same, moved)

    pngs = sorted((a for a in result.artifacts if a.format == vae_pb2.MEDIA_FORMAT_PNG), key=lambda a: a.frame_index)
    assert [a.frame_index for a in pngs] == list(range(FRAMES))
    assert np.array_equal(np.stack([decode_png(a.data) for a in pngs]), ours)


def test_wan21_latents_equal_pipeline(wan_stack, tiny_wan: Path) -> None:
    """Encoder + denoiser services give the pipeline's latents to <= 1e-5 relative."""
    enc_addr = wan_stack.service("encoder").address
    with grpc.insecure_channel(enc_addr) as ch:
        enc = encoder_pb2_grpc.TextEncoderServiceStub(ch).Encode(encoder_pb2.EncodeRequest(
            model="tiny-wan", prompt=PROMPT, negative_prompt=NEGATIVE, encode_negative=True), timeout=30)
    assert enc.negative_conditionings, "guidance > 1: the negative prompt must be encoded"
    req = denoiser_pb2.DenoiseRequest(model="tiny-wan", conditionings=enc.conditionings,
                                      negative_conditionings=enc.negative_conditionings, width=W, height=H,
                                      frames=FRAMES, steps=WAN["steps"], guidance_scale=WAN["guidance"], seed=SEED)
    ours, _ = _denoise(wan_stack.service("denoiser", "tiny-wan").address, req)
    ref = wan_reference(tiny_wan, PROMPT, negative_prompt=NEGATIVE, width=W, height=H, frames=FRAMES,
                        steps=WAN["steps"], guidance=WAN["guidance"], seed=SEED, output_type="latent")
    assert tuple(ours.shape) == tuple(ref.shape) == (1, 4, 3, H // 8, W // 8)
    assert rel_err(ours, ref) <= 1e-5


def _denoise(address: str, req: denoiser_pb2.DenoiseRequest):
    assembler, summary = codec.ChunkAssembler(), None
    with grpc.insecure_channel(address) as ch:
        for resp in denoiser_pb2_grpc.DenoiserServiceStub(ch).Denoise(req, timeout=60):
            if resp.WhichOneof("event") == "latents_chunk":
                assembler.add(resp.latents_chunk)
            elif resp.WhichOneof("event") == "summary":
                summary = resp.summary
    return assembler.tensor(), summary


def test_wan22_two_groups_equal_pipeline(wan_stack, tiny_wan22: Path) -> None:
    """Wan2.2 split across two denoiser groups (high-noise expert, then the low-noise one) == WanPipeline with
    both transformers in one process, including guidance_scale_2 for the second expert."""
    opts = GenerateOptions(width=W, height=H, frames=FRAMES, steps=WAN22["steps"], guidance_scale=WAN22["guidance"],
                           guidance_scale_2=WAN22["guidance_2"], seed=SEED, formats=["raw"])
    with ChituClient(wan_stack.address) as c:
        events = list(c.generate(PROMPT, "tiny-wan22", opts, timeout=120))
    result = events[-1].result
    ref = wan_reference(tiny_wan22, PROMPT, negative_prompt=None, width=W, height=H, frames=FRAMES,
                        steps=WAN22["steps"], guidance=WAN22["guidance"], guidance_2=WAN22["guidance_2"], seed=SEED)
    assert ref.std() > 1.0
    assert _max_diff(_frames(result), ref) <= 1
    assert result.guidance_scale_2 == pytest.approx(WAN22["guidance_2"])
    # guidance_scale_2 must move the output beyond the match's tolerance, or the match would not show that the
    # second expert used it (measured: 4/255 at most on the tiny model)
    without = wan_reference(tiny_wan22, PROMPT, negative_prompt=None, width=W, height=H, frames=FRAMES,
                            steps=WAN22["steps"], guidance=WAN22["guidance"], seed=SEED)
    assert _max_diff(without, ref) > 1

    started = [e.stage_started for e in events if e.HasField("stage_started")]
    denoisers = [s.endpoint for s in started if s.stage == common_pb2.STAGE_DENOISE]
    assert denoisers == [wan_stack.service("denoiser", "tiny-wan22").address,
                         wan_stack.service("denoiser", "tiny-wan22.transformer_2").address]
    assert [e.step.step for e in events if e.HasField("step")] == list(range(1, WAN22["steps"] + 1))
    assert [t.stage for t in result.timings.stages].count(common_pb2.STAGE_DENOISE) == 2
    sidecar = result_summary(result, {"model": "tiny-wan22"})
    assert sidecar["timings"]["stages"]["denoise_2"]["endpoint"] == denoisers[1]
    assert sidecar["guidance_scale_2"] == pytest.approx(WAN22["guidance_2"])


@pytest.mark.parametrize(("model", "steps", "groups"), [("tiny-wan22", 1, 1), ("tiny-wan22-late", 3, 2)])
def test_wan22_when_one_expert_has_no_step(wan_stack, tiny_wan22: Path, wan22_late: Path, model: str, steps: int,
                                           groups: int) -> None:
    """One step: the high-noise expert runs it and the second group is skipped. Boundary above every timestep: the
    first group hands back the seeded noise untouched and the second runs every step. Both equal the pipeline."""
    opts = GenerateOptions(width=W, height=H, frames=5, steps=steps, guidance_scale=4.0, seed=SEED, formats=["raw"])
    with ChituClient(wan_stack.address) as c:
        events = list(c.generate(PROMPT, model, opts, timeout=120))
    checkpoint = tiny_wan22 if model == "tiny-wan22" else wan22_late
    ref = wan_reference(checkpoint, PROMPT, negative_prompt=None, width=W, height=H, frames=5, steps=steps,
                        guidance=4.0, seed=SEED)
    assert ref.std() > 1.0  # not a flat image: the match below means something
    assert _max_diff(_frames(events[-1].result), ref) <= 1
    started = [e.stage_started.stage for e in events if e.HasField("stage_started")]
    assert started.count(common_pb2.STAGE_DENOISE) == groups
    assert [e.step.step for e in events if e.HasField("step")] == list(range(1, steps + 1))


def test_wan22_handover_carries_scheduler_state(wan_stack, tiny_wan22: Path) -> None:
    """At the service level: group 1 stops at the boundary it computes and reports, group 2 resumes from the
    latents and UniPC's history (latents <= 1e-5 relative to the pipeline); without the history it differs."""
    with grpc.insecure_channel(wan_stack.service("encoder").address) as ch:
        enc = encoder_pb2_grpc.TextEncoderServiceStub(ch).Encode(encoder_pb2.EncodeRequest(
            model="tiny-wan22", prompt=PROMPT, negative_prompt="", encode_negative=True), timeout=30)
    base = dict(model="tiny-wan22", conditionings=enc.conditionings, negative_conditionings=enc.negative_conditionings,
                width=W, height=H, frames=FRAMES, steps=WAN22["steps"], guidance_scale=WAN22["guidance"],
                guidance_scale_2=WAN22["guidance_2"], seed=SEED)
    first, summary = _denoise(wan_stack.service("denoiser", "tiny-wan22").address,
                              denoiser_pb2.DenoiseRequest(**base, return_scheduler_state=True))
    assert summary.end_step == 2 and summary.scheduler_state
    second_addr = wan_stack.service("denoiser", "tiny-wan22.transformer_2").address
    resumed = dict(base, start_step=summary.end_step, initial_latents=codec.to_proto(first))
    ours, summary_2 = _denoise(second_addr, denoiser_pb2.DenoiseRequest(**resumed,
                                                                        scheduler_state=summary.scheduler_state))
    assert summary_2.end_step == WAN22["steps"]
    ref = wan_reference(tiny_wan22, PROMPT, negative_prompt="", width=W, height=H, frames=FRAMES,
                        steps=WAN22["steps"], guidance=WAN22["guidance"], guidance_2=WAN22["guidance_2"], seed=SEED,
                        output_type="latent")
    assert rel_err(ours, ref) <= 1e-5
    stateless, _ = _denoise(second_addr, denoiser_pb2.DenoiseRequest(**resumed))
    assert rel_err(stateless, ref) > 1e-3, "the scheduler history made no difference: the test proves nothing"


def test_shared_encoder_and_vae(wan_stack) -> None:
    """Identical UMT5 and VAE weights: one encoder and one VAE serve both models (the others' name as alias);
    ListModels shows every model's stages, Wan2.2 with its two denoiser groups."""
    kinds = [s.kind for s in wan_stack.services]
    assert kinds.count("encoder") == 1 and kinds.count("vae") == 1 and kinds.count("denoiser") == 5
    with ChituClient(wan_stack.address) as c:
        models = {m.name: m for m in c.list_models().models}
    assert set(models) == {"tiny-wan", "tiny-wan22", "tiny-wan22-late"}
    by_stage = {name: {} for name in models}
    for name, m in models.items():
        assert m.family == "wan" and m.serving and m.limits.supports_video
        for e in m.endpoints:
            by_stage[name].setdefault(e.stage, []).append(e)
    for stage in (common_pb2.STAGE_ENCODE, common_pb2.STAGE_DECODE):
        shared = {e.address for name in models for e in by_stage[name][stage]}
        assert len(shared) == 1, f"{common_pb2.Stage.Name(stage)} is not shared: {shared}"
        info = by_stage["tiny-wan"][stage][0].info
        assert {info.model, *info.aliases} == set(models)
    components = sorted(e.info.metadata["component"] for e in by_stage["tiny-wan22"][common_pb2.STAGE_DENOISE])
    assert components == ["transformer", "transformer_2"]
    assert models["tiny-wan22"].limits.experts == 2 and models["tiny-wan"].limits.experts == 1


def test_cli_generate_writes_mp4_with_sidecar(wan_stack, tmp_path: Path) -> None:
    """`chitu generate` on a video model: an MP4 with a sidecar JSON that records frames, fps and timings."""
    cmd = [sys.executable, "-m", "clients.cli", "generate", PROMPT, "--model", "tiny-wan", "--server",
           wan_stack.address, "--width", str(W), "--height", str(H), "--frames", "5", "--steps", "2", "--seed", "3",
           "--fps", "12", "--output", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    mp4 = Path(proc.stdout.strip().splitlines()[-1])
    assert mp4.suffix == ".mp4"
    video, fps = decode_mp4(mp4.read_bytes())
    assert video.shape == (5, H, W, 3) and fps == 12.0
    meta = json.loads(mp4.with_suffix(".json").read_text())
    assert (meta["model"], meta["prompt"], meta["seed"], meta["steps"]) == ("tiny-wan", PROMPT, 3, 2)
    assert (meta["width"], meta["height"], meta["frames"], meta["fps"]) == (W, H, 5, 12.0)
    assert meta["timings"]["stages"]["denoise"]["seconds"] > 0 and len(meta["timings"]["step_seconds"]) == 2


# -- bad input ------------------------------------------------------------------------------------------------------

BAD = [
    ({"frames": 6}, "frames=6"),
    ({"frames": 0}, "frames=0"),
    ({"frames": 37}, "frames=37"),  # over the tiny checkpoint's max_frames (33)
    ({"width": 40}, "width=40"),  # not a multiple of 16 (VAE 8x * patch 2)
    ({"height": 512}, "height=512"),  # over max_size
    ({"guidance_scale_2": 3.0}, "guidance_scale_2"),  # tiny-wan has one transformer
    ({"fps": 0.0}, "fps=0"),
]


@pytest.mark.parametrize(("fields", "needle"), BAD, ids=[str(b[0]) for b in BAD])
def test_bad_input_is_invalid_argument(wan_stack, fields: dict, needle: str) -> None:
    req = {"model": "tiny-wan", "prompt": PROMPT, "width": W, "height": H, "frames": 5, "steps": 2, **fields}
    with grpc.insecure_channel(wan_stack.address) as ch:
        stub = generation_pb2_grpc.GenerationServiceStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(generation_pb2.GenerateRequest(**req), timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert needle in info.value.details()


def test_expert_group_refuses_the_other_experts_steps(wan_stack) -> None:
    """A Wan2.2 expert's group runs only its share of the schedule; asking for other steps names the range."""
    with grpc.insecure_channel(wan_stack.service("encoder").address) as ch:
        enc = encoder_pb2_grpc.TextEncoderServiceStub(ch).Encode(
            encoder_pb2.EncodeRequest(model="tiny-wan22", prompt=PROMPT), timeout=30)
    req = denoiser_pb2.DenoiseRequest(model="tiny-wan22", conditionings=enc.conditionings, width=W, height=H,
                                      frames=5, steps=4, guidance_scale=1.0, seed=0, start_step=0)
    address = wan_stack.service("denoiser", "tiny-wan22.transformer_2").address
    with grpc.insecure_channel(address) as ch, pytest.raises(grpc.RpcError) as info:
        list(denoiser_pb2_grpc.DenoiserServiceStub(ch).Denoise(req, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "transformer_2" in info.value.details() and "[2, 4)" in info.value.details()
    # the stack still serves
    with ChituClient(wan_stack.address) as c:
        result = c.generate_result(PROMPT, "tiny-wan22", GenerateOptions(width=W, height=H, frames=5, steps=2, seed=1),
                                   timeout=120)
    assert result.artifacts[0].format == vae_pb2.MEDIA_FORMAT_MP4


def test_two_expert_model_without_second_group_is_failed_precondition(wan_stack) -> None:
    """A route for Wan2.2 that lists no denoiser_2: the first group stops at the boundary and the orchestrator says
    what is missing instead of decoding half-denoised latents."""
    import signal

    s = wan_stack
    route = {"model": "tiny-wan22", "encoder": [s.service("encoder").address], "vae": [s.service("vae").address],
             "denoiser": [s.service("denoiser", "tiny-wan22").address]}
    orch = s._write("orchestrator", "partial", {"server": {"host": "127.0.0.1", "port": 0}, "routes": [route]})
    s._launch(orch)
    try:
        s._wait_ready([orch])
        with grpc.insecure_channel(orch.address) as ch, pytest.raises(grpc.RpcError) as info:
            list(generation_pb2_grpc.GenerationServiceStub(ch).Generate(generation_pb2.GenerateRequest(
                model="tiny-wan22", prompt=PROMPT, width=W, height=H, frames=5, steps=4, seed=0), timeout=60))
    finally:
        s.kill(orch, signal.SIGTERM)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "[0, 2) of 4" in info.value.details() and "denoiser_2" in info.value.details()


def test_mp4_without_pyav_fails_before_any_stage_works(wan_stack, tmp_path: Path) -> None:
    """A VAE service where PyAV does not import (here: an ``av`` package that raises ImportError shadows the real
    one) reports MP4 as unavailable; the orchestrator refuses a request whose (default) format is MP4 with
    FAILED_PRECONDITION naming the stage and the fix, before queueing it (no event at all), and PNG frames still
    work through the same services."""
    import os
    import signal

    import yaml

    s = wan_stack
    shadow = tmp_path / "shadow" / "av"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('PyAV hidden by the test')\n")
    cfg = yaml.safe_load(s.service("vae").config_path.read_text())
    vae = s._write("vae", "no-pyav", {**cfg, "server": {**cfg["server"], "port": 0}})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow.parent), os.environ.get("PYTHONPATH", "")])}
    s._launch(vae, env=env)
    route = {"model": "tiny-wan", "encoder": [s.service("encoder").address], "vae": [],
             "denoiser": [s.service("denoiser", "tiny-wan").address]}
    orch = None
    try:
        s._wait_ready([vae])
        route["vae"] = [vae.address]
        orch = s._write("orchestrator", "no-pyav", {"server": {"host": "127.0.0.1", "port": 0}, "routes": [route]})
        s._launch(orch)
        s._wait_ready([orch])
        with grpc.insecure_channel(vae.address) as ch:
            info = vae_pb2_grpc.VaeServiceStub(ch).GetVaeInfo(vae_pb2.GetVaeInfoRequest(), timeout=30).info
        assert "pip install av" in info.metadata["unavailable_format.MEDIA_FORMAT_MP4"]
        stub_args = dict(model="tiny-wan", prompt=PROMPT, width=W, height=H, frames=5, steps=2, seed=0)
        events = []
        with grpc.insecure_channel(orch.address) as ch, pytest.raises(grpc.RpcError) as err:
            for ev in generation_pb2_grpc.GenerationServiceStub(ch).Generate(
                    generation_pb2.GenerateRequest(**stub_args), timeout=60):
                events.append(ev)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
        details = err.value.details()
        assert "MEDIA_FORMAT_MP4" in details and "pip install av" in details and "vae stage" in details, details
        assert events == []  # refused before queueing: no stage worked on it
        with grpc.insecure_channel(orch.address) as ch:
            result = [ev for ev in generation_pb2_grpc.GenerationServiceStub(ch).Generate(
                generation_pb2.GenerateRequest(**stub_args, output_formats=[vae_pb2.MEDIA_FORMAT_PNG]), timeout=120)
                if ev.WhichOneof("event") == "result"][0].result
        assert [a.frame_index for a in result.artifacts] == list(range(5))
        assert all(a.format == vae_pb2.MEDIA_FORMAT_PNG for a in result.artifacts)
    finally:
        for svc in (orch, vae):
            if svc is not None and svc.process is not None and svc.process.poll() is None:
                s.kill(svc, signal.SIGTERM)
