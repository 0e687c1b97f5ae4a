"""Wan attention (WanTransformer3DModel blocks) through ``AttentionOps``.

Each Wan block has two attention modules:

- ``attn1``, self-attention over the video tokens (with 3-D rotary embeddings): ``ops.joint(q, k, v, None)``.
  Under sequence parallelism q, k, v and the rotary tables are this rank's shard of the video sequence.
- ``attn2``, cross-attention from the video tokens to the text (UMT5) tokens: ``ops.cross(q, k, v, None)``.
  K/V come from the text, which every rank holds in full, so only q is sharded and no communication is needed.
  (Wan2.1-I2V's extra image K/V, when the checkpoint has them, go through ``ops.cross`` too.)

All tensors are ``[B, S, H, D]``. The projections, RMS norms across heads and the rotary embedding are those of
diffusers' ``WanAttnProcessor``; only the attention call changes, and with ``runtime.fuse_norm_rope`` the
self-attention's query/key norm and rotation run as one kernel (``services.norm_rope``).
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_wan import WanAttention, _get_added_kv_projections, _get_qkv_projections

from services.attention import AttentionOps
from services.norm_rope import norm_rope

TEXT_CONTEXT_LENGTH = 512
"""I2V checkpoints prepend image tokens to the 512 text tokens (the length diffusers' processor assumes too)."""


def apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding (pairs (0, 1), (2, 3), ... rotated), as in diffusers' processor."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanAttnProcessor:
    """Same math as diffusers' WanAttnProcessor; the attention itself goes through ``AttentionOps``."""

    def __init__(self, ops: AttentionOps):
        self.ops = ops

    def __call__(self, attn: WanAttention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if attention_mask is not None:
            raise NotImplementedError("Wan attention takes no attention mask")
        is_cross = encoder_hidden_states is not None
        image_context = None
        if attn.add_k_proj is not None:
            n_img = encoder_hidden_states.shape[1] - TEXT_CONTEXT_LENGTH
            image_context = encoder_hidden_states[:, :n_img]
            encoder_hidden_states = encoder_hidden_states[:, n_img:]

        q, k, v = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        v = v.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None and getattr(attn, "chitu_fused_norm_rope", False):
            q = norm_rope(q.unflatten(2, (attn.heads, -1)), attn.norm_q, rotary_emb)
            k = norm_rope(k.unflatten(2, (attn.heads, -1)), attn.norm_k, rotary_emb)
        else:
            q = attn.norm_q(q).unflatten(2, (attn.heads, -1))
            k = attn.norm_k(k).unflatten(2, (attn.heads, -1))
            if rotary_emb is not None:
                q = apply_rotary_emb(q, *rotary_emb)
                k = apply_rotary_emb(k, *rotary_emb)

        image_out = None
        if image_context is not None:
            k_img, v_img = _get_added_kv_projections(attn, image_context)
            k_img = attn.norm_added_k(k_img).unflatten(2, (attn.heads, -1))
            v_img = v_img.unflatten(2, (attn.heads, -1))
            image_out = self.ops.cross(q, k_img, v_img, None).flatten(2, 3).type_as(q)

        if is_cross:
            out = self.ops.cross(q, k, v, None)
        else:
            out = self.ops.joint(q, k, v, None)
        out = out.flatten(2, 3).type_as(q)
        if image_out is not None:
            out = out + image_out
        return attn.to_out[1](attn.to_out[0](out))


def install(transformer: torch.nn.Module, ops: AttentionOps) -> int:
    """Put our processor on every Wan attention module (self and cross); returns how many were replaced."""
    n = 0
    for module in transformer.modules():
        if isinstance(module, WanAttention):
            module.set_processor(WanAttnProcessor(ops))
            n += 1
    return n
