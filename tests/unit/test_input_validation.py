"""Malformed but well-typed input to the stages' checks: each is INVALID_ARGUMENT naming what to fix, found by probing
every stage with such input (before these checks each one raised inside the model or the scheduler, i.e. INTERNAL,
or produced NaN images without an error). Real parts: the tiny checkpoints' adapters, loaded models and schedulers,
and the VAE servicer's own header check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.config import ModelConfig
from services.errors import InvalidArgument
from services.families.base import SamplingParams
from services.proto.chitu.v1 import vae_pb2
from services.registry import load_adapter
from services.stage import media_formats

CPU = torch.device("cpu")


def test_media_formats_default_dedupe_and_unknown_values() -> None:
    png, mp4, raw = vae_pb2.MEDIA_FORMAT_PNG, vae_pb2.MEDIA_FORMAT_MP4, vae_pb2.MEDIA_FORMAT_RAW_RGB8
    assert media_formats([], False, "f") == [png] and media_formats([], True, "f") == [mp4]
    # UNSPECIFIED lets the service choose (the proto's contract), here the model's default
    assert media_formats([vae_pb2.MEDIA_FORMAT_UNSPECIFIED, raw, raw], True, "f") == [mp4, raw]
    with pytest.raises(InvalidArgument, match=r"output_formats: unknown value\(s\) \[99\]; use one of \['MEDIA_FORMAT_PNG'"):
        media_formats([png, 99], False, "output_formats")


def test_vae_header_limits(tiny_flux: Path, tiny_wan: Path) -> None:
    from vae_svc.config import VaeServiceConfig
    from vae_svc.server import VaeServicer

    for ckpt, fields, needle in (
            (tiny_flux, {"width": 0}, "width=0 must be a positive multiple"),
            (tiny_flux, {"formats": [42]}, "formats: unknown value(s) [42]"),
            (tiny_wan, {"frames": 5}, None),
            (tiny_wan, {"frames": 9 * 4 + 1}, "frames=37 must be k*4+1 and at most 33")):
        servicer = VaeServicer(VaeServiceConfig(model=ModelConfig(checkpoint=str(ckpt), device="cpu")))
        try:
            lim = servicer.adapter.limits()
            header = vae_pb2.DecodeHeader(**{"model": ckpt.name, "width": 32, "height": 32, **fields})
            if needle is None:
                servicer._check(header)
            else:
                with pytest.raises(InvalidArgument) as err:
                    servicer._check(header)
                assert needle in str(err.value), err.value
            too_wide = vae_pb2.DecodeHeader(model=ckpt.name, width=lim.max_size + lim.size_multiple, height=32)
            with pytest.raises(InvalidArgument, match=f"at most {lim.max_size}"):
                servicer._check(too_wide)
        finally:
            servicer.thread.shutdown()


def test_flux_vae_latents_need_the_packed_channels_and_a_batch(tiny_flux: Path) -> None:
    adapter = load_adapter(tiny_flux)
    vae = adapter.load_vae(torch.float32, CPU)
    params = SamplingParams(width=32, height=32, steps=1, guidance_scale=0.0, seed=0)
    tokens = (32 // (vae.vae_scale_factor * 2)) ** 2
    channels = vae.vae.config.latent_channels * 4
    for shape in ((1, tokens, channels - 1), (1, tokens, 4 * channels), (0, tokens, channels)):
        with pytest.raises(InvalidArgument, match=rf"expected \[B >= 1, {tokens}, {channels}\]"):
            adapter.decode(vae, torch.zeros(shape), params)
    assert adapter.decode(vae, torch.zeros(1, tokens, channels), params).shape[0] == 1


def test_qwen_image_needs_two_steps_for_its_terminal_shift(tiny_qwen_image: Path) -> None:
    """One step with shift_terminal divides 0 by 0 in the scheduler: NaN latents, no error, before this check."""
    adapter = load_adapter(tiny_qwen_image)
    assert adapter.component_config("scheduler").get("shift_terminal")
    with pytest.raises(InvalidArgument, match="steps=1: .*shift_terminal.* needs at least 2 steps"):
        adapter.validate_params(SamplingParams(width=32, height=32, steps=1, guidance_scale=4.0, seed=0))
    adapter.validate_params(SamplingParams(width=32, height=32, steps=2, guidance_scale=4.0, seed=0))


@pytest.mark.parametrize("guidance", [float("inf"), float("nan"), -1.0])
def test_guidance_scale_must_be_finite(tiny_flux: Path, guidance: float) -> None:
    with pytest.raises(InvalidArgument, match="must be a finite number >= 0"):
        load_adapter(tiny_flux).validate_params(SamplingParams(32, 32, 2, guidance, 0))


def test_scheduler_state_entries_of_the_wrong_kind_or_range(tiny_wan: Path) -> None:
    """Wan's UniPC scheduler (solver_order 2): each entry below got past admission and failed inside the first step
    (AssertionError, IndexError, TypeError, RuntimeError) before the kind and range checks."""
    from tests.unit.test_wan import _denoise

    adapter = load_adapter(tiny_wan)
    enc = adapter.encode(adapter.load_encoder(torch.float32, CPU), "a red circle", None)
    model = adapter.load_denoiser(torch.float32, CPU)
    state = _denoise(adapter, model, enc, SamplingParams(32, 32, 2, 1.0, 0, 5), 0, 0)
    sample = torch.zeros(*state.latents.shape)
    for entry, needle in (
            ({"this_order#int": torch.tensor(50)}, r"'this_order#int' = 50 must be in \[1, 2\]"),
            ({"this_order#int": torch.tensor(0)}, r"must be in \[1, 2\]"),
            ({"lower_order_nums#int": torch.tensor(-5)}, r"must be in \[0, 2\]"),
            ({"lower_order_nums#int": torch.tensor(float("nan"), dtype=torch.float64)}, "one finite number"),
            ({"this_order#float": torch.tensor(1.5, dtype=torch.float64)}, "holds a number, sent as this_order#int"),
            ({"lower_order_nums": torch.zeros(3)}, "holds a number, sent as lower_order_nums#int"),
            ({"last_sample#float": torch.tensor(1.0, dtype=torch.float64)}, "holds tensors, not numbers"),
            ({"model_outputs": sample}, "model_outputs is a list; send its items as model_outputs.N")):
        with pytest.raises(InvalidArgument, match=needle):
            adapter.import_scheduler_state(state, entry)
    adapter.import_scheduler_state(state, {"this_order#int": torch.tensor(2), "lower_order_nums#int": torch.tensor(1),
                                           "last_sample": sample, "model_outputs.1": sample})


def test_guidance_scale_2_only_for_two_experts(tiny_flux: Path, tiny_wan: Path, tiny_wan22: Path) -> None:
    """The one-transformer families refused it nowhere but Wan2.1 (the others ignored it silently)."""
    params = SamplingParams(32, 32, 2, 4.0, 0, frames=5, guidance_scale_2=3.0)
    for ckpt in (tiny_flux, tiny_wan):
        with pytest.raises(InvalidArgument, match="guidance_scale_2 is only used by two-expert models"):
            load_adapter(ckpt).validate_params(SamplingParams(**{**params.__dict__, "frames": 1 if ckpt == tiny_flux
                                                                 else 5}))
    load_adapter(tiny_wan22).validate_params(params)
    with pytest.raises(InvalidArgument, match="guidance_scale_2=inf must be a finite number"):
        load_adapter(tiny_wan22).validate_params(SamplingParams(**{**params.__dict__, "guidance_scale_2": float("inf")}))


def test_text_conditioning_contents(tiny_wan: Path, tiny_qwen_image: Path) -> None:
    """Wan prompt embeddings need at least one token; a Qwen-Image key mask holds only 0 and 1."""
    from services.families.qwen_image import _branch_conditioning

    wan = load_adapter(tiny_wan)
    model = wan.load_denoiser(torch.float32, CPU)
    width = model.transformer.config.text_dim
    with pytest.raises(InvalidArgument, match=rf"'prompt_embeds'\] has shape \[1, 0, {width}\]"):
        wan.prepare(model, SamplingParams(32, 32, 2, 1.0, 0, 5), {"prompt_embeds": torch.zeros(1, 0, width)}, {}, None,
                    0, 2)
    embeds = torch.zeros(1, 4, 8)
    _branch_conditioning({"prompt_embeds": embeds, "prompt_embeds_mask": torch.tensor([[1, 1, 0, 0]])}, 8, "c")
    with pytest.raises(InvalidArgument, match="must hold only 0 .padding. and 1 .token."):
        _branch_conditioning({"prompt_embeds": embeds, "prompt_embeds_mask": torch.tensor([[1, 2, 0, 0]])}, 8, "c")


def test_vae_header_negative_frames(tiny_wan: Path) -> None:
    from vae_svc.config import VaeServiceConfig
    from vae_svc.server import VaeServicer

    servicer = VaeServicer(VaeServiceConfig(model=ModelConfig(checkpoint=str(tiny_wan), device="cpu")))
    try:
        with pytest.raises(InvalidArgument, match="frames=-3 must be >= 0"):
            servicer._check(vae_pb2.DecodeHeader(model=tiny_wan.name, width=32, height=32, frames=-3))
    finally:
        servicer.thread.shutdown()


def _qwen_limit(model, params: SamplingParams) -> int:
    """Qwen-Image: the text's positions follow the image's (half its wider side, in patches) in a 4096-row table."""
    tokens = max(params.width, params.height) // (model.vae_scale_factor * 2)
    return model.transformer.pos_embed.pos_freqs.shape[0] - tokens // 2


def _z_image_limit(model, params: SamplingParams) -> int:
    """Z-Image: the caption (padded to 32) and the image's index after it must fit ``axes_lens[0]``."""
    return (model.transformer.config.axes_lens[0] - 2) // 32 * 32


@pytest.mark.parametrize(("family", "width_key", "limit_of", "guidance"), [
    ("tiny_qwen_image", "joint_attention_dim", _qwen_limit, 1.0),
    ("tiny_z_image", "cap_feat_dim", _z_image_limit, 0.0)], ids=["qwen_image", "z_image"])
def test_text_must_fit_the_rotary_table(family: str, width_key: str, limit_of, guidance: float,
                                        request: pytest.FixtureRequest) -> None:
    """One token more than the rotary table holds failed inside the forward (Qwen-Image: a shape mismatch; Z-Image:
    an out-of-range index); now refused at admission, while exactly as many as fit still run."""
    adapter = load_adapter(request.getfixturevalue(family))
    model = adapter.load_denoiser(torch.float32, CPU)
    width = model.transformer.config[width_key]
    params = SamplingParams(width=64, height=32, steps=2, guidance_scale=guidance, seed=0)
    limit = limit_of(model, params)
    with pytest.raises(InvalidArgument, match=f"has {limit + 1} tokens; at most {limit} fit"):
        adapter.prepare(model, params, {"prompt_embeds": torch.zeros(1, limit + 1, width)}, {}, None, 0, 2)
    state = adapter.prepare(model, params, {"prompt_embeds": torch.zeros(1, limit, width)}, {}, None, 0, 2)
    with torch.inference_mode():
        out = adapter.forward(model, state, state.latents, 0, "cond")
    assert torch.isfinite(out).all()
