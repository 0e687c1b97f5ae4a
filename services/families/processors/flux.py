"""Flux.1 attention (double- and single-stream blocks) through ``AttentionOps.joint``."""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttention, _get_qkv_projections

from services.attention import AttentionOps


class FluxJointAttnProcessor:
    """Same math as diffusers' FluxAttnProcessor; text tokens come first in the joint sequence."""

    def __init__(self, ops: AttentionOps):
        self.ops = ops

    def __call__(self, attn: FluxAttention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: tuple | None = None) -> torch.Tensor:
        if attention_mask is not None:
            raise NotImplementedError("Flux joint attention takes no attention mask")
        q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q = attn.norm_q(q.unflatten(-1, (-1, attn.head_dim)))
        k = attn.norm_k(k.unflatten(-1, (-1, attn.head_dim)))
        v = v.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None and encoder_hidden_states is not None:
            eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
            ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
            ev = ev.unflatten(-1, (-1, attn.head_dim))
            q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = self.ops.joint(q, k, v, None).flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        n_txt = encoder_hidden_states.shape[1]
        txt, img = out[:, :n_txt], out[:, n_txt:]
        img = attn.to_out[1](attn.to_out[0](img.contiguous()))
        return img, attn.to_add_out(txt.contiguous())


def install(transformer: torch.nn.Module, ops: AttentionOps) -> int:
    """Put our processor on every Flux attention module; returns how many were replaced."""
    n = 0
    for module in transformer.modules():
        if isinstance(module, FluxAttention):
            module.set_processor(FluxJointAttnProcessor(ops))
            n += 1
    return n
