"""FLUX.2-klein, Qwen-Image and Z-Image without processes: our attention processors against diffusers' (bitwise on
CPU fp32: the same projections, norms, RoPE and the same SDPA call), the klein *base* model's CFG path against
Flux2KleinPipeline, the CFG rule each family reports, and the tiny checkpoints' real-size configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.server import resolve_settings
from services.attention import LOCAL_SDPA, AttentionOps, sdpa_attention
from services.errors import InvalidArgument
from services.families.base import SamplingParams
from services.families.processors.qwen_image import install as install_qwen
from services.families.processors.z_image import install as install_z
from services.proto.chitu.v1 import generation_pb2
from services.registry import load_adapter
from tests.image_family_helpers import pipeline_reference
from tests.step_constant_helpers import count_calls

CPU = torch.device("cpu")


def _denoise(adapter, model, conds, negs, params: SamplingParams) -> torch.Tensor:
    state = adapter.prepare(model, params, conds, negs, None, 0, params.steps)
    with torch.inference_mode():
        for i in range(params.steps):
            preds = {b: adapter.forward(model, state, state.latents, i, b) for b in state.branches}
            noise = adapter.combine(state, preds["cond"], preds["uncond"]) if state.do_cfg else preds["cond"]
            state.latents = adapter.scheduler_step(state, noise, i)
    return state.latents


class CountingOps:
    """LOCAL_SDPA that counts its calls (proves the model's attention really goes through our ops)."""

    def __init__(self) -> None:
        self.calls = 0

    def joint(self, q, k, v, key_mask=None):
        self.calls += 1
        return sdpa_attention(q, k, v, key_mask)

    def ops(self) -> AttentionOps:
        return AttentionOps(joint=self.joint, cross=self.joint)


@pytest.mark.parametrize(("fixture", "modules", "calls_per_forward", "once_per_branch"), [
    ("tiny_flux2_klein_base", 3, 3, 0),  # 1 double-stream + 2 single-stream blocks
    ("tiny_qwen_image", 2, 2, 0),  # 2 double-stream blocks
    ("tiny_z_image", 4, 4, 1),  # 1 noise refiner + 1 context refiner (first step only) + 2 main blocks
])
def test_processors_equal_diffusers_bitwise(fixture: str, modules: int, calls_per_forward: int, once_per_branch: int,
                                            request: pytest.FixtureRequest) -> None:
    """A whole CFG denoising run with our processors == with diffusers' processors, bitwise (CPU fp32)."""
    checkpoint: Path = request.getfixturevalue(fixture)
    adapter = load_adapter(checkpoint)
    model = adapter.load_denoiser(torch.float32, CPU)
    conds, negs = adapter.warmup_conditionings(model)
    params = SamplingParams(width=64, height=48, steps=3, guidance_scale=3.0, seed=11)
    ref = _denoise(adapter, model, conds, negs, params)
    counting = CountingOps()
    assert adapter.install_attention(model, counting.ops()) == modules
    ours = _denoise(adapter, model, conds, negs, params)
    # both CFG branches, every step (Z-Image's context refiner: the first step of each branch, see ContextRefinerCache)
    assert counting.calls == (calls_per_forward - once_per_branch) * 2 * params.steps + once_per_branch * 2
    assert torch.equal(ours, ref)


def test_qwen_image_step_constants_are_computed_once_per_request(tiny_qwen_image: Path) -> None:
    """The text's input norm and projection and the rotary tables are computed in ``prepare`` (once per CFG
    branch), not in each step's forward; bit-identical to recomputing them every step."""
    adapter = load_adapter(tiny_qwen_image)
    model = adapter.load_denoiser(torch.float32, CPU)
    conds, negs = adapter.warmup_conditionings(model)
    params = SamplingParams(width=64, height=48, steps=3, guidance_scale=3.0, seed=11)
    calls = count_calls(model.step_constants)
    lean = _denoise(adapter, model, conds, negs, params)
    assert set(calls.values()) == {2}, calls  # in prepare, once per branch
    del model.step_constants  # the plain path: diffusers' forward computes them in each of the 3 x 2 forwards
    plain = _denoise(adapter, model, conds, negs, params)
    assert set(calls.values()) == {2 + 6}, calls
    assert torch.equal(lean, plain)


def test_z_image_context_refiner_runs_once_per_request_and_branch(tiny_z_image: Path) -> None:
    """The context refiner (unmodulated blocks over the caption) runs on a request's first step per CFG branch; its
    kept output is served on the later steps; bit-identical to running it every step."""
    adapter = load_adapter(tiny_z_image)
    model = adapter.load_denoiser(torch.float32, CPU)
    conds, negs = adapter.warmup_conditionings(model)
    params = SamplingParams(width=64, height=48, steps=3, guidance_scale=3.0, seed=11)
    refiners = list(model.transformer.context_refiner)
    assert refiners, "the tiny Z-Image checkpoint has a context refiner"
    calls = [0] * len(refiners)
    for i, layer in enumerate(refiners):
        layer.register_forward_pre_hook(lambda *_, _i=i: calls.__setitem__(_i, calls[_i] + 1))
    lean = _denoise(adapter, model, conds, negs, params)
    assert calls == [2] * len(refiners), calls  # the first step of each branch
    assert list(model.transformer.context_refiner) == refiners  # the blocks are back after every forward
    del model.context_refiner_cache  # the plain path: every forward runs the refiner
    plain = _denoise(adapter, model, conds, negs, params)
    assert calls == [2 + 2 * params.steps] * len(refiners), calls
    assert torch.equal(lean, plain)


def test_qwen_image_text_mask_reaches_the_attention_call(tiny_qwen_image: Path) -> None:
    """A padded text mask (the pipeline's batched case) becomes the key-padding mask [B, L + N]; same output as
    diffusers' processor, bitwise, and different from the unmasked call (the mask is not dropped)."""
    adapter = load_adapter(tiny_qwen_image)
    transformer = adapter.load_denoiser(torch.float32, CPU).transformer
    gen = torch.Generator().manual_seed(0)
    n_txt, h, w = 7, 3, 4
    inputs = {"hidden_states": torch.randn(1, h * w, transformer.config.in_channels, generator=gen),
              "encoder_hidden_states": torch.randn(1, n_txt, transformer.config.joint_attention_dim, generator=gen),
              "encoder_hidden_states_mask": torch.tensor([[1, 1, 1, 1, 1, 0, 0]]),
              "timestep": torch.tensor([0.5]), "img_shapes": [[(1, h, w)]], "return_dict": False}
    with torch.inference_mode():
        ref = transformer(**inputs)[0]
        unmasked = transformer(**{**inputs, "encoder_hidden_states_mask": None})[0]
        masks = []

        def joint(q, k, v, key_mask=None):
            masks.append(key_mask)
            return sdpa_attention(q, k, v, key_mask)

        assert install_qwen(transformer, AttentionOps(joint)) == 2
        ours = transformer(**inputs)[0]
    assert torch.equal(ours, ref) and not torch.equal(ours, unmasked)
    assert masks[0].dtype == torch.bool and masks[0].tolist() == [[True] * 5 + [False] * 2 + [True] * (h * w)]


def test_z_image_batched_mask_path_equals_diffusers(tiny_z_image: Path) -> None:
    """Two captions of different padded lengths in one call (the pipeline's batched CFG) use the key mask."""
    adapter = load_adapter(tiny_z_image)
    transformer = adapter.load_denoiser(torch.float32, CPU).transformer
    gen = torch.Generator().manual_seed(1)
    c = transformer.config
    x = [torch.randn(c.in_channels, 1, 6, 8, generator=gen) for _ in range(2)]
    caps = [torch.randn(n, c.cap_feat_dim, generator=gen) for n in (40, 9)]  # pads to 64 and 32 tokens
    t = torch.tensor([0.3, 0.3])
    with torch.inference_mode():
        ref = transformer(x, t, caps, return_dict=False)[0]
        assert install_z(transformer, LOCAL_SDPA) == 4
        ours = transformer(x, t, caps, return_dict=False)[0]
    assert all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True))


def test_processor_roles_and_sequence_order_are_documented() -> None:
    from services.families.processors import flux2_klein, qwen_image, z_image

    assert "text first, then image" in flux2_klein.__doc__
    assert "text first, then image" in qwen_image.__doc__
    assert "image first, then text" in z_image.__doc__
    assert dict(z_image.ROLES) == {"noise_refiner": "image", "context_refiner": "text", "layers": "joint"}


def test_flux2_klein_base_cfg_equals_pipeline(tiny_flux2_klein_base: Path) -> None:
    """The undistilled klein runs CFG (guidance > 1) against an empty prompt; a user negative prompt is ignored with
    a warning. Encoder -> denoiser -> VAE adapters in one process == Flux2KleinPipeline (bitwise latents)."""
    adapter = load_adapter(tiny_flux2_klein_base)
    lim = adapter.limits()
    assert lim.guidance_kind == "cfg" and lim.cfg_threshold == 1.0 and not lim.cfg_needs_negative_prompt
    prompt = "a large red circle on the left"
    params = SamplingParams(width=64, height=48, steps=4, guidance_scale=3.0, seed=4)
    encoded = adapter.encode(adapter.load_encoder(torch.float32, CPU), prompt, "blurry")
    assert any("negative_prompt is ignored" in w for w in encoded.warnings)
    model = adapter.load_denoiser(torch.float32, CPU)
    latents = _denoise(adapter, model, encoded.conditionings, encoded.negative_conditionings, params)
    image = adapter.decode(adapter.load_vae(torch.float32, CPU), latents, params)[0].numpy()
    ref = pipeline_reference(tiny_flux2_klein_base, prompt, width=64, height=48, steps=4, guidance=3.0, seed=4)
    no_cfg = pipeline_reference(tiny_flux2_klein_base, prompt, width=64, height=48, steps=4, guidance=1.0, seed=4)
    assert not torch.equal(ref.latents, no_cfg.latents)  # CFG changes the result: both branches ran
    assert torch.equal(latents, ref.latents)
    assert (abs(image.astype(int) - ref.image.astype(int))).max() <= 1
    with pytest.raises(InvalidArgument, match="negative_conditionings are required"):
        adapter.prepare(model, params, encoded.conditionings, {}, None, 0, params.steps)


@pytest.mark.parametrize(("fixture", "guidance", "negative", "active"), [
    ("tiny_qwen_image", 4.0, "blurry", True),
    ("tiny_qwen_image", 4.0, "", False),  # true CFG needs a negative prompt
    ("tiny_qwen_image", 1.0, "blurry", False),
    ("tiny_z_image", 0.5, "", True),  # Z-Image: guidance > 0, default negative ""
    ("tiny_z_image", 0.0, "blurry", False),
    ("tiny_flux2_klein", 4.0, "blurry", False),  # distilled: no CFG at all
    ("tiny_flux2_klein_base", 1.5, "", True),
])
def test_cfg_rule_per_family(fixture: str, guidance: float, negative: str, active: bool,
                             request: pytest.FixtureRequest) -> None:
    lim = load_adapter(request.getfixturevalue(fixture)).limits()
    assert lim.cfg_active(guidance, negative) is active


def test_orchestrator_warns_when_guidance_has_no_effect(tiny_qwen_image: Path) -> None:
    lim = load_adapter(tiny_qwen_image).limits()
    req = generation_pb2.GenerateRequest(model="m", prompt="a red circle", guidance_scale=4.0)
    assert any("no effect without a negative_prompt" in w for w in resolve_settings(req, lim).warnings)
    req = generation_pb2.GenerateRequest(model="m", prompt="a red circle", guidance_scale=4.0, negative_prompt="x")
    assert resolve_settings(req, lim).warnings == []


@pytest.mark.parametrize("family", ["flux2_klein", "qwen_image", "z_image"])
def test_real_size_configs_build_the_real_classes(family: str) -> None:
    """The configs handed to the GPU smoke test name real classes and are accepted by them (built on the meta
    device: no memory, no weights)."""
    import importlib

    import diffusers
    import transformers

    configs = importlib.import_module(f"services.tiny.{family}").real_size_configs()
    assert {"transformer", "vae", "text_encoder"} <= set(configs)
    for name, spec in configs.items():
        if name == "text_encoder":
            cls = getattr(transformers, spec["class"])
            cfg = cls.config_class.from_dict(spec["config"]) if family != "qwen_image" else \
                cls.config_class(**spec["config"])
            with torch.device("meta"):
                model = cls(cfg)
        elif name == "scheduler":
            getattr(diffusers, spec["class"]).from_config(spec["config"])
            continue
        else:
            with torch.device("meta"):
                model = getattr(diffusers, spec["class"])(**spec["config"])
        assert sum(p.numel() for p in model.parameters()) > 10_000_000
