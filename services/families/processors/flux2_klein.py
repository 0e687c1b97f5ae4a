"""FLUX.2 attention (double-stream ``Flux2Attention`` and single-stream ``Flux2ParallelSelfAttention`` blocks)
through ``AttentionOps.joint``.

Joint sequence order: **text first, then image** — ``[txt_0 .. txt_{L-1}, img_0 .. img_{N-1}]`` — in both block
kinds (the single-stream blocks see the concatenation the transformer built in the same order). The rotary
embedding is applied to q and k of the whole joint sequence before the call (its table is laid out text first too).
No attention mask: FLUX.2 attends to every position, padding included (the pipeline pads prompts to a fixed length).
The norms, concatenation and rotation are Flux.1's (``joint_qkv``), fused into one kernel per tensor with
``runtime.fuse_norm_rope``.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_flux2 import (
    Flux2Attention,
    Flux2ParallelSelfAttention,
    _get_qkv_projections,
)

from services.attention import AttentionOps
from services.families.processors.flux import joint_qkv


class Flux2JointAttnProcessor:
    """Same math as diffusers' ``Flux2AttnProcessor`` (double-stream blocks)."""

    def __init__(self, ops: AttentionOps):
        self.ops = ops

    def __call__(self, attn: Flux2Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise NotImplementedError("FLUX.2 joint attention takes no attention mask")
        q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        text = (eq, ek, ev) if attn.added_kv_proj_dim is not None else None
        q, k, v = joint_qkv(attn, (q, k, v), text, image_rotary_emb)
        out = self.ops.joint(q, k, v, None).flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        n_txt = encoder_hidden_states.shape[1]
        txt, img = out.split_with_sizes([n_txt, out.shape[1] - n_txt], dim=1)
        return attn.to_out[1](attn.to_out[0](img)), attn.to_add_out(txt)


class Flux2SingleStreamAttnProcessor:
    """Same math as diffusers' ``Flux2ParallelSelfAttnProcessor``: fused QKV+MLP input projection, attention over
    the joint sequence, fused output projection of ``[attention, MLP]``."""

    def __init__(self, ops: AttentionOps):
        self.ops = ops

    def __call__(self, attn: Flux2ParallelSelfAttention, hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if attention_mask is not None:
            raise NotImplementedError("FLUX.2 single-stream attention takes no attention mask")
        x = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        n_qkv = x.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp = torch.split(x, [n_qkv, x.shape[-1] - n_qkv], dim=-1)
        q, k, v = joint_qkv(attn, qkv.chunk(3, dim=-1), None, image_rotary_emb)
        out = self.ops.joint(q, k, v, None).flatten(2, 3).to(q.dtype)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


def install(transformer: torch.nn.Module, ops: AttentionOps) -> int:
    """Put our processors on every FLUX.2 attention module; returns how many were replaced."""
    n = 0
    for module in transformer.modules():
        if isinstance(module, Flux2Attention):
            module.set_processor(Flux2JointAttnProcessor(ops))
            n += 1
        elif isinstance(module, Flux2ParallelSelfAttention):
            module.set_processor(Flux2SingleStreamAttnProcessor(ops))
            n += 1
    return n
