"""Wan attention (WanTransformer3DModel blocks) through ``AttentionOps``.

Each Wan block has two attention modules:

- ``attn1``, self-attention over the video tokens (with 3-D rotary embeddings): ``ops.joint(q, k, v, None)``.
  Under sequence parallelism q, k, v and the rotary tables are this rank's shard of the video sequence.
- ``attn2``, cross-attention from the video tokens to the text (UMT5) tokens: ``ops.cross(q, k, v, None)``.
  K/V come from the text, which every rank holds in full, so only q is sharded and no communication is needed.
  (Wan2.1-I2V's extra image K/V, when the checkpoint has them, go through ``ops.cross`` too.)

All tensors are ``[B, S, H, D]``. The projections, RMS norms across heads and the rotary embedding are those of
diffusers' ``WanAttnProcessor``; only the attention call changes, and with ``runtime.fuse_norm_rope`` the
self-attention's query/key norm and rotation run as one kernel (``services.norm_rope``; the cross-attention's norms
run in the same kernel without the rotation).

The block forward (``block_forward``) is diffusers' ``WanTransformerBlock.forward``; with ``runtime.fuse_norms`` each
residual add is computed with the layer norm and modulation that follow it in one kernel (``services.ada_norm``).
"""

from __future__ import annotations

import types

import torch
from diffusers.models.transformers.transformer_wan import (
    WanAttention,
    WanTransformerBlock,
    _get_added_kv_projections,
    _get_qkv_projections,
)

from services.ada_norm import add_norm_modulate, norm_modulate
from services.attention import AttentionOps
from services.gemm import feed_forward_residual
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
        if getattr(attn, "chitu_fused_norm_rope", False):  # cross-attention (no rotary_emb): the norms alone
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


def block_forward(self: WanTransformerBlock, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                  temb: torch.Tensor, rotary_emb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``WanTransformerBlock.forward`` (diffusers 0.42); marked ``chitu_fused_norms``, the residual adds, layer norms
    and modulations run as ``services.ada_norm`` kernels: (norm1 + modulation), (gated residual + norm2), (residual +
    norm3 + modulation); the FFN's output projection and its gated residual go through
    ``services.gemm.feed_forward_residual`` (one GEMM with the residual in its epilogue when the layer is routed to
    QuACK, else the GEMM and a pointwise op inductor fuses)."""
    if not getattr(self, "chitu_fused_norms", False):
        return WanTransformerBlock.forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb)
    if temb.ndim == 4:  # Wan2.2-TI2V: one modulation per token, [B, S, 6, D]
        mods = [m.squeeze(2) for m in (self.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)]
    else:  # [B, 6, D]
        mods = (self.scale_shift_table + temb.float()).chunk(6, dim=1)
    shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = mods

    norm_hidden_states = norm_modulate(hidden_states, self.norm1, scale_msa, shift_msa)
    attn_output = self.attn1(norm_hidden_states, None, None, rotary_emb)
    if isinstance(self.norm2, torch.nn.LayerNorm):
        hidden_states, norm_hidden_states = add_norm_modulate(hidden_states, attn_output, gate_msa, self.norm2)
    else:  # cross_attn_norm=False: norm2 is the identity
        hidden_states = (hidden_states.float() + attn_output * gate_msa).type_as(hidden_states)
        norm_hidden_states = hidden_states
    attn_output = self.attn2(norm_hidden_states, encoder_hidden_states, None, None)
    hidden_states, norm_hidden_states = add_norm_modulate(hidden_states, attn_output, None, self.norm3,
                                                          c_scale_msa, c_shift_msa)
    return feed_forward_residual(self.ffn, norm_hidden_states, hidden_states, c_gate_msa)


block_forward.chitu_block_forward = True  # type: ignore[attr-defined]  # removed by remove_block_forwards


def install(transformer: torch.nn.Module, ops: AttentionOps) -> int:
    """Put our processor on every Wan attention module (self and cross) and our forward on every block that still
    runs diffusers' own; returns how many processors were replaced."""
    n = 0
    for module in transformer.modules():
        if isinstance(module, WanAttention):
            module.set_processor(WanAttnProcessor(ops))
            n += 1
        elif isinstance(module, WanTransformerBlock) and "forward" not in vars(module):
            module.forward = types.MethodType(block_forward, module)
    return n
