"""Our attention processors compute what diffusers' processors compute (same checkpoint, same inputs)."""

from __future__ import annotations

from pathlib import Path

import torch

from services.attention import LOCAL_SDPA
from services.families.base import SamplingParams
from services.registry import load_adapter


def _denoise(adapter, model, conds, params: SamplingParams) -> torch.Tensor:
    state = adapter.prepare(model, params, conds, {}, None, 0, params.steps)
    with torch.inference_mode():
        for i in range(params.steps):
            state.latents = adapter.scheduler_step(state, adapter.forward(model, state, state.latents, i, "cond"), i)
    return state.latents


def test_flux_processors_equal_diffusers(tiny_flux: Path) -> None:
    adapter = load_adapter(tiny_flux)
    cpu = torch.device("cpu")
    conds = adapter.encode(adapter.load_encoder(torch.float32, cpu), "a red circle on the left", None).conditionings
    model = adapter.load_denoiser(torch.float32, cpu)
    params = SamplingParams(width=64, height=48, steps=3, guidance_scale=3.5, seed=3)
    ref = _denoise(adapter, model, conds, params)
    assert adapter.install_attention(model, LOCAL_SDPA) == 3  # 1 double-stream + 2 single-stream blocks
    ours = _denoise(adapter, model, conds, params)
    assert torch.equal(ours, ref)
