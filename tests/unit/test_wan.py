"""The Wan adapter's pieces against WanPipeline and diffusers: attention processors, the expert boundary,
the scheduler hand-over, limits, and the real-size configs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from services import codec
from services.attention import LOCAL_SDPA
from services.errors import InvalidArgument
from services.families.base import SamplingParams
from services.registry import load_adapter
from services.tiny.wan import real_size_configs
from tests.step_constant_helpers import count_calls

CPU = torch.device("cpu")


def _denoise(adapter, model, enc, params: SamplingParams, lo: int, hi: int, latents=None, sched=None):
    state = adapter.prepare(model, params, enc.conditionings, enc.negative_conditionings, latents, lo, hi)
    if sched:
        adapter.import_scheduler_state(state, sched)
    with torch.inference_mode():
        for i in range(lo, hi):
            preds = {b: adapter.forward(model, state, state.latents, i, b) for b in state.branches}
            noise = adapter.combine(state, preds["cond"], preds["uncond"]) if state.do_cfg else preds["cond"]
            state.latents = adapter.scheduler_step(state, noise, i)
    return state


def test_wan_processors_equal_diffusers(tiny_wan22: Path) -> None:
    """Our processors (self-attention via ops.joint, text cross-attention via ops.cross) == diffusers'
    WanAttnProcessor, bitwise on CPU fp32 (same SDPA call on the same [B, H, S, D] views), for both experts."""
    adapter = load_adapter(tiny_wan22)
    enc = adapter.encode(adapter.load_encoder(torch.float32, CPU), "a red circle on the left", "")
    params = SamplingParams(width=32, height=48, steps=3, guidance_scale=5.0, seed=3, frames=5)
    for component in ("transformer", "transformer_2"):
        model = adapter.load_denoiser(torch.float32, CPU, component)
        ref = _denoise(adapter, model, enc, params, 0, 3).latents
        assert adapter.install_attention(model, LOCAL_SDPA) == 4  # 2 blocks x (self + cross)
        ours = _denoise(adapter, model, enc, params, 0, 3).latents
        assert torch.equal(ours, ref), component


def test_step_constants_are_computed_once_per_request(tiny_wan: Path) -> None:
    """The rotary tables and the prompt's text projection are computed in ``prepare`` (once; the text once per CFG
    branch), not in each step's forward, and the result is bit-identical to recomputing them every step."""
    adapter = load_adapter(tiny_wan)
    enc = adapter.encode(adapter.load_encoder(torch.float32, CPU), "a red circle", "")
    model = adapter.load_denoiser(torch.float32, CPU)
    params = SamplingParams(width=32, height=48, steps=3, guidance_scale=5.0, seed=1, frames=5)
    calls = count_calls(model.step_constants)
    lean = _denoise(adapter, model, enc, params, 0, 3).latents
    assert calls == {"rope": 1, "text": 2}, calls  # in prepare: one video shape, two branches
    model.step_constants = None  # the plain path: diffusers' forward computes both in each of the 3 x 2 forwards
    plain = _denoise(adapter, model, enc, params, 0, 3).latents
    assert calls == {"rope": 1 + 6, "text": 2 + 6}, calls
    assert torch.equal(lean, plain)


def test_processor_routes_self_and_cross_attention(tiny_wan: Path) -> None:
    """Self-attention goes through ops.joint with q, k, v of the video length; cross-attention through ops.cross
    with K/V of the text length."""
    from services.attention import AttentionOps, sdpa_attention

    calls: list[tuple[str, int, int]] = []

    def recorder(kind):
        def fn(q, k, v, mask):
            calls.append((kind, q.shape[1], k.shape[1]))
            return sdpa_attention(q, k, v, mask)
        return fn

    adapter = load_adapter(tiny_wan)
    enc = adapter.encode(adapter.load_encoder(torch.float32, CPU), "a red circle", None)
    model = adapter.load_denoiser(torch.float32, CPU)
    adapter.install_attention(model, AttentionOps(joint=recorder("joint"), cross=recorder("cross")))
    params = SamplingParams(width=32, height=48, steps=1, guidance_scale=1.0, seed=0, frames=5)
    _denoise(adapter, model, enc, params, 0, 1)
    video_tokens = 2 * (48 // 16) * (32 // 16)  # 2 latent frames, 2x2 patches of 8x latents
    assert calls == [("joint", video_tokens, video_tokens), ("cross", video_tokens, adapter.max_sequence_length)] * 2


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 12])
def test_boundary_matches_the_pipelines_expert_switch(tiny_wan22: Path, steps: int) -> None:
    """expert_range: the high-noise expert's share is exactly the steps WanPipeline runs on ``transformer``."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_wan22, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda *_: seen.append(1))
    pipe.transformer_2.register_forward_pre_hook(lambda *_: seen.append(2))
    pipe("a red circle", width=16, height=16, num_frames=1, num_inference_steps=steps, guidance_scale=1.0,
         generator=torch.Generator("cpu").manual_seed(0), max_sequence_length=16, output_type="latent")
    adapter = load_adapter(tiny_wan22)
    params = SamplingParams(width=16, height=16, steps=steps, guidance_scale=1.0, seed=0)
    b = seen.count(1)
    assert seen == [1] * b + [2] * (steps - b)
    assert adapter.expert_range("transformer", params) == (0, b)
    assert adapter.expert_range("transformer_2", params) == (b, steps)


def test_handover_needs_the_scheduler_history(tiny_wan22: Path) -> None:
    """The second expert resumed with the exported UniPC history (after a trip through the tensor codec) gives the
    one-process result exactly; resumed without it, it does not."""
    adapter = load_adapter(tiny_wan22)
    enc = adapter.encode(adapter.load_encoder(torch.float32, CPU), "a blue square", "")
    params = SamplingParams(width=32, height=32, steps=4, guidance_scale=4.0, seed=5, frames=5, guidance_scale_2=2.0)
    first = adapter.load_denoiser(torch.float32, CPU, "transformer")
    second = adapter.load_denoiser(torch.float32, CPU, "transformer_2")
    lo, b = adapter.expert_range("transformer", params)
    state = _denoise(adapter, first, enc, params, lo, b)
    exported = adapter.export_scheduler_state(state)
    assert {"last_sample", "lower_order_nums#int", "this_order#int", "model_outputs.1"} <= set(exported)
    wire = codec.named_from_proto(codec.named_to_proto(exported))
    handed = state.latents

    # the one-process run: the same scheduler object continues with the second expert, as WanPipeline's loop does
    # (tests/e2e/test_family_wan.py compares the two-group stack with WanPipeline itself)
    state.guidance_scale = params.guidance_scale_2
    with torch.inference_mode():
        for i in range(b, 4):
            preds = {br: adapter.forward(second, state, state.latents, i, br) for br in state.branches}
            state.latents = adapter.scheduler_step(state, adapter.combine(state, preds["cond"], preds["uncond"]), i)
    resumed = _denoise(adapter, second, enc, params, b, 4, latents=handed, sched=wire)
    assert torch.equal(resumed.latents, state.latents)
    stateless = _denoise(adapter, second, enc, params, b, 4, latents=handed)
    assert not torch.allclose(stateless.latents, state.latents, rtol=1e-3, atol=1e-4)


def test_scheduler_state_rejects_foreign_entries(tiny_wan: Path) -> None:
    adapter = load_adapter(tiny_wan)
    enc = adapter.encode(adapter.load_encoder(torch.float32, CPU), "a red circle", None)
    model = adapter.load_denoiser(torch.float32, CPU)
    state = _denoise(adapter, model, enc, SamplingParams(32, 32, 2, 1.0, 0, 5), 0, 0)
    with pytest.raises(InvalidArgument, match="not a scheduler state entry"):
        adapter.import_scheduler_state(state, {"betas": torch.zeros(3)})
    with pytest.raises(InvalidArgument, match="out of range"):
        adapter.import_scheduler_state(state, {"model_outputs.7": torch.zeros(*state.latents.shape)})
    # a state of a run of another size: refused before the run (it had failed inside the first step)
    expected = (f"'last_sample' is a torch.float32 tensor of shape [1, 16, 2, 2, 2]; this request's latents are "
                f"floating point of shape {list(state.latents.shape)}")
    with pytest.raises(InvalidArgument, match=re.escape(expected)):
        adapter.import_scheduler_state(state, {"last_sample": torch.zeros(1, 16, 2, 2, 2)})
    with pytest.raises(InvalidArgument, match="'model_outputs.0' is a torch.int64 tensor"):
        adapter.import_scheduler_state(state, {"model_outputs.0": torch.zeros(*state.latents.shape, dtype=torch.int64)})


def test_limits_and_validation(tiny_wan: Path, tiny_wan22: Path) -> None:
    lim = load_adapter(tiny_wan).limits()
    assert (lim.size_multiple, lim.frame_multiple, lim.guidance_kind, lim.supports_video) == (16, 4, "cfg", True)
    assert (lim.default_frames, lim.default_fps, lim.experts, lim.max_frames) == (5, 16.0, 1, 33)
    assert load_adapter(tiny_wan22).limits().experts == 2
    adapter = load_adapter(tiny_wan)
    for params, needle in ((SamplingParams(32, 32, 2, 5.0, 0, frames=6), "frames=6"),
                           (SamplingParams(40, 32, 2, 5.0, 0, frames=5), "width=40"),
                           (SamplingParams(32, 32, 2, 5.0, 0, frames=5, guidance_scale_2=3.0), "guidance_scale_2")):
        with pytest.raises(InvalidArgument, match=needle):
            adapter.validate_params(params)
    with pytest.raises(InvalidArgument, match="transformer_2"):
        adapter.load_denoiser(torch.float32, CPU, "transformer_2")


def test_ti2v_checkpoint_is_refused(tiny_wan: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ti2v"
    shutil.copytree(tiny_wan, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "expand_timesteps": True}))
    with pytest.raises(InvalidArgument, match="expand_timesteps"):
        load_adapter(folder)


@pytest.mark.parametrize(("variant", "transformer_b", "experts"), [
    ("wan2.1-t2v-1.3b", (1.2, 1.6), 1), ("wan2.1-t2v-14b", (13.0, 15.0), 1), ("wan2.2-t2v-a14b", (13.0, 15.0), 2)])
def test_real_size_configs_build(variant: str, transformer_b: tuple[float, float], experts: int) -> None:
    """The real-size configs instantiate (on the meta device: no memory) with the released parameter counts."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = real_size_configs(variant)
    with torch.device("meta"):
        transformer = WanTransformer3DModel(**cfg["transformer"])
        text_encoder = UMT5EncoderModel(UMT5Config(**cfg["text_encoder"]))
        vae = AutoencoderKLWan(**cfg["vae"])
    billions = sum(p.numel() for p in transformer.parameters()) / 1e9
    assert transformer_b[0] < billions < transformer_b[1], billions
    assert 5.0 < sum(p.numel() for p in text_encoder.parameters()) / 1e9 < 6.5  # UMT5-XXL encoder
    assert vae.config.z_dim == transformer.config.in_channels == 16
    assert (cfg["transformer_2"] is not None) == (experts == 2)
    UniPCMultistepScheduler(**cfg["scheduler"])


def test_linked_experts_folder_loads(tmp_path: Path) -> None:
    """The disk-saving layout for real-size smoke runs: transformer_2 is a symlink to transformer."""
    from diffusers import WanPipeline

    from services.tiny.wan import build_wan, tiny_configs

    folder = build_wan(tmp_path / "linked", tiny_configs(two_experts=True), link_experts=True)
    assert (folder / "transformer_2").is_symlink()
    pipe = WanPipeline.from_pretrained(folder, dtype=torch.float32)
    assert torch.equal(pipe.transformer_2.proj_out.weight, pipe.transformer.proj_out.weight)
    assert load_adapter(folder).expert_components() == ("transformer", "transformer_2")
