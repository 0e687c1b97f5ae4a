"""The VAE stage warms up at start-up: one decode of latents of the model's default size, whose shape every family
derives from its configs alone (``FamilyAdapter.latent_shape``) and which must be the shape the denoiser makes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from services.config import ModelConfig
from services.registry import load_adapter
from tests.flexcache_cases import make_job
from vae_svc.config import VaeServiceConfig
from vae_svc.server import VaeServicer

FAMILIES = ["tiny_flux", "tiny_flux2_klein", "tiny_qwen_image", "tiny_z_image", "tiny_wan"]


@pytest.mark.parametrize("family", FAMILIES)
def test_latent_shape_is_the_shape_prepare_makes(family: str, request: pytest.FixtureRequest) -> None:
    checkpoint: Path = request.getfixturevalue(family)
    adapter = load_adapter(checkpoint)
    model = adapter.load_denoiser(torch.float32, torch.device("cpu"))
    lim = adapter.limits()
    for size in ((lim.default_width, lim.default_height), (96, 64), (48, 112)):
        job = make_job(checkpoint, None, steps=2, size=size)
        state = adapter.prepare(model, job.params, job.conditionings, job.negative_conditionings, None, 0, 2)
        assert adapter.latent_shape(job.params) == tuple(state.latents.shape), size


@pytest.mark.parametrize("family", ["tiny_flux", "tiny_wan"])
def test_vae_service_decodes_once_at_start_up(family: str, request: pytest.FixtureRequest) -> None:
    checkpoint: Path = request.getfixturevalue(family)
    servicer = VaeServicer(VaeServiceConfig(model=ModelConfig(checkpoint=str(checkpoint), device="cpu")))
    calls = []
    decode = servicer.adapter.decode

    def counting(model, latents, params):
        calls.append((tuple(latents.shape), params.width, params.height, params.frames))
        return decode(model, latents, params)

    servicer.adapter.decode = counting
    asyncio.run(servicer.load())
    lim = servicer.adapter.limits()
    assert len(calls) == 1 and calls[0][1:] == (lim.default_width, lim.default_height, lim.default_frames)
    assert servicer.warmup_seconds is not None and servicer.warmup_seconds > 0
    info = asyncio.run(servicer.GetVaeInfo(None, None)).info
    assert float(info.metadata["warmup_seconds"]) >= 0

    off = VaeServicer(VaeServiceConfig(model=ModelConfig(checkpoint=str(checkpoint), device="cpu"), warmup=False))
    off.adapter.decode = counting
    asyncio.run(off.load())
    assert len(calls) == 1 and off.warmup_seconds is None
