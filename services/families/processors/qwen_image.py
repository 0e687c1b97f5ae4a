"""Qwen-Image attention (double-stream blocks) through ``AttentionOps.joint``.

Joint sequence order: **text first, then image** — ``[txt_0 .. txt_{L-1}, img_0 .. img_{N-1}]``. Rotary embeddings
are applied per stream before the concatenation (text and image have their own tables). When the transformer gets
an ``encoder_hidden_states_mask`` the call carries the key-padding mask ``[B, L + N]`` (bool, True = attend): the
text mask followed by all-True for the image tokens; otherwise no mask.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock, apply_rotary_emb_qwen

from services.attention import AttentionOps


class QwenImageJointAttnProcessor:
    """Same math as diffusers' ``QwenDoubleStreamAttnProcessor2_0``."""

    def __init__(self, ops: AttentionOps):
        self.ops = ops

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 encoder_hidden_states_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is None:
            raise ValueError("Qwen-Image joint attention needs encoder_hidden_states (the text stream)")
        if attention_mask is not None:
            raise ValueError("Qwen-Image joint attention builds its mask from encoder_hidden_states_mask; "
                             "attention_mask must be None")
        key_mask = None
        if encoder_hidden_states_mask is not None:
            image_mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            key_mask = torch.cat([encoder_hidden_states_mask.to(torch.bool), image_mask], dim=1)
        n_txt = encoder_hidden_states.shape[1]
        head_dim = attn.inner_dim // attn.heads
        q = attn.to_q(hidden_states).unflatten(-1, (-1, head_dim))
        k = attn.to_k(hidden_states).unflatten(-1, (-1, head_dim))
        v = attn.to_v(hidden_states).unflatten(-1, (-1, head_dim))
        tq = attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        tk = attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        tv = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if attn.norm_added_q is not None:
            tq = attn.norm_added_q(tq)
        if attn.norm_added_k is not None:
            tk = attn.norm_added_k(tk)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            q = apply_rotary_emb_qwen(q, img_freqs, use_real=False)
            k = apply_rotary_emb_qwen(k, img_freqs, use_real=False)
            tq = apply_rotary_emb_qwen(tq, txt_freqs, use_real=False)
            tk = apply_rotary_emb_qwen(tk, txt_freqs, use_real=False)
        jq, jk, jv = torch.cat([tq, q], dim=1), torch.cat([tk, k], dim=1), torch.cat([tv, v], dim=1)
        out = self.ops.joint(jq, jk, jv, key_mask).flatten(2, 3).to(jq.dtype)
        img = attn.to_out[0](out[:, n_txt:, :].contiguous())
        if len(attn.to_out) > 1:
            img = attn.to_out[1](img)
        return img, attn.to_add_out(out[:, :n_txt, :].contiguous())


def install(transformer: torch.nn.Module, ops: AttentionOps) -> int:
    """Put our processor on the attention of every Qwen-Image block; returns how many were replaced."""
    n = 0
    for module in transformer.modules():
        if isinstance(module, QwenImageTransformerBlock):
            module.attn.set_processor(QwenImageJointAttnProcessor(ops))
            n += 1
    return n
