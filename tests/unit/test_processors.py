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


def test_flux_single_block_runs_its_mlp_while_attention_is_in_flight(tiny_flux: Path) -> None:
    """Our single-stream block forward hands its MLP branch to the attention processor, which runs it between
    starting and finishing attention (``AttentionOps.start``: under Ulysses the input exchange is in flight); the
    output is bit-identical to diffusers' block forward (``test_flux_processors_equal_diffusers``), and with a
    FlexCache-style hook answering the attention call the block still computes its MLP itself."""
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

    from services.attention import AttentionOps, sdpa_attention
    from services.families.processors import remove_block_forwards

    adapter = load_adapter(tiny_flux)
    model = adapter.load_denoiser(torch.float32, torch.device("cpu"))
    events: list[str] = []

    def start(q, k, v, key_mask):
        events.append("start")

        def finish():
            events.append("finish")
            return sdpa_attention(q, k, v, key_mask)

        return finish

    ops = AttentionOps(joint=lambda *a: events.append("joint") or sdpa_attention(*a), joint_start=start)
    adapter.install_attention(model, ops)
    blocks = [m for m in model.transformer.modules() if isinstance(m, FluxSingleTransformerBlock)]
    assert len(blocks) == 2 and all("forward" in vars(b) for b in blocks)
    for b in blocks:
        b.proj_mlp.register_forward_hook(lambda *_: events.append("mlp"))
    conds = adapter.warmup_conditionings(model)[0]
    params = SamplingParams(width=64, height=48, steps=1, guidance_scale=3.5, seed=3)
    ours = _denoise(adapter, model, conds, params)
    # one double-stream block (plain joint call), then two single-stream blocks with the MLP inside the attention call
    assert events == ["joint", "start", "mlp", "finish", "start", "mlp", "finish"]

    # a hook that answers the attention call (PAB broadcasting a cached output): the block runs its MLP itself
    cached = {}
    events.clear()
    handles = [b.attn.register_forward_hook(lambda m, a, out: cached.setdefault(m, out)) for b in blocks]
    _denoise(adapter, model, conds, params)
    for h in handles:
        h.remove()
    for b in blocks:
        b.attn.forward = lambda *a, _m=b.attn, **k: cached[_m]
    events.clear()
    assert torch.equal(_denoise(adapter, model, conds, params), ours)
    assert events == ["joint", "mlp", "mlp"]

    # the two single-stream blocks and the double-stream one (``double_block_forward``)
    assert remove_block_forwards(model.transformer) == 3 and not any("forward" in vars(b) for b in blocks)
