"""Flux.1 attention (double- and single-stream blocks) through ``AttentionOps``, and the single-stream block's
forward with its MLP branch overlapping the attention's input exchange.

A single-stream block computes ``proj_out(cat(attention(norm(x)), gelu(proj_mlp(norm(x)))))``: the MLP branch does
not depend on attention. diffusers runs it first, then attention; our block forward hands it to the attention
processor, which starts attention (``AttentionOps.start``: under Ulysses the q/k/v all-to-all is launched), runs the
MLP while the exchange is in flight, then finishes attention. The same operations on the same values, in another
order: outputs are bit-identical (tested); on one GPU there is nothing to overlap and nothing changes.
With ``runtime.fuse_mlp`` (``services.runtime.fuse_gelu_epilogues`` marks the block) the MLP's GELU runs in its GEMM's
epilogue and ``proj_out`` is applied to the two parts without concatenating them. With ``runtime.fuse_norm_rope``
the query/key RMS norms, the text/image concatenation and the rotary embedding run as one kernel per tensor
(``services.norm_rope``). With ``runtime.fuse_norms`` (blocks marked ``chitu_fused_norms``) the double-stream block's
forward (``double_block_forward``, otherwise diffusers' own) and the single-stream one compute each AdaLN layer norm
with its modulation, and the gated attention residual with the norm that follows it, in one kernel
(``services.ada_norm``); the single-stream block normalises text and image into one tensor without concatenating
them first.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import (
    FluxAttention,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
    _get_qkv_projections,
)

from services.ada_norm import add_norm_modulate, norm_modulate
from services.attention import AttentionOps
from services.gemm import feed_forward_residual, linear_gelu_tanh, linear_of_concat_gated_residual
from services.norm_rope import norm_rope


def joint_qkv(attn: torch.nn.Module, image: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
              text: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, rotary: tuple | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``[B, S, H, D]`` q, k, v of Flux-style joint attention from the projections (``[B, S, H*D]``): RMS norms
    per head (the text's own with ``text``), text first in the sequence, rotary embedding over the whole sequence.
    With ``runtime.fuse_norm_rope`` (the module is marked) one kernel per tensor does the norms, the concatenation
    and the rotation (``services.norm_rope``); otherwise diffusers' ops, in diffusers' order. Shared by Flux.1 and
    FLUX.2."""
    q, k, v = (x.unflatten(-1, (-1, attn.head_dim)) for x in image)
    if text is not None:
        eq, ek, ev = (x.unflatten(-1, (-1, attn.head_dim)) for x in text)
    if rotary is not None and getattr(attn, "chitu_fused_norm_rope", False):
        if text is None:
            return norm_rope(q, attn.norm_q, rotary), norm_rope(k, attn.norm_k, rotary), v
        return (norm_rope(eq, attn.norm_added_q, rotary, second=q, second_norm=attn.norm_q),
                norm_rope(ek, attn.norm_added_k, rotary, second=k, second_norm=attn.norm_k),
                torch.cat([ev, v], dim=1))
    q, k = attn.norm_q(q), attn.norm_k(k)
    if text is not None:
        eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
    if rotary is not None:
        q = apply_rotary_emb(q, rotary, sequence_dim=1)
        k = apply_rotary_emb(k, rotary, sequence_dim=1)
    return q, k, v


class FluxJointAttnProcessor:
    """Same math as diffusers' FluxAttnProcessor; text tokens come first in the joint sequence."""

    def __init__(self, ops: AttentionOps):
        self.ops = ops

    def __call__(self, attn: FluxAttention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: tuple | None = None,
                 overlap: Callable[[], Any] | None = None) -> torch.Tensor:
        """``overlap``: work that does not depend on attention, run while attention's input exchange is in flight."""
        if attention_mask is not None:
            raise NotImplementedError("Flux joint attention takes no attention mask")
        q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        text = (eq, ek, ev) if attn.added_kv_proj_dim is not None and encoder_hidden_states is not None else None
        q, k, v = joint_qkv(attn, (q, k, v), text, image_rotary_emb)
        if overlap is None:
            out = self.ops.joint(q, k, v, None)
        else:
            finish = self.ops.start(q, k, v, None)
            overlap()
            out = finish()
        out = out.flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        n_txt = encoder_hidden_states.shape[1]
        txt, img = out[:, :n_txt], out[:, n_txt:]
        img = attn.to_out[1](attn.to_out[0](img.contiguous()))
        return img, attn.to_add_out(txt.contiguous())


def single_block_forward(self: FluxSingleTransformerBlock, hidden_states: torch.Tensor,
                         encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                         image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                         joint_attention_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``FluxSingleTransformerBlock.forward`` (diffusers 0.42), the MLP branch run by the attention processor while
    attention's input exchange is in flight (see the module doc). When the attention call does not run its
    computation (a FlexCache hook answered it), the MLP runs here."""
    text_len = encoder_hidden_states.shape[1]
    if getattr(self, "chitu_fused_norms", False):
        shift, scale, gate = self.norm.linear(self.norm.silu(temb)).chunk(3, dim=1)
        norm_hidden_states = norm_modulate(encoder_hidden_states, self.norm.norm, scale, shift, second=hidden_states)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    else:
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
    residual = hidden_states
    mlp: list[torch.Tensor] = []
    fused = getattr(self, "chitu_fused_mlp", False)

    def run_mlp() -> None:
        mlp.append(linear_gelu_tanh(norm_hidden_states, self.proj_mlp) if fused
                   else self.act_mlp(self.proj_mlp(norm_hidden_states)))

    attn_output = self.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb, overlap=run_mlp,
                            **(joint_attention_kwargs or {}))
    if not mlp:
        run_mlp()
    if fused:  # float32, rounded once (as inductor computes the pointwise residual); one QuACK GEMM where routed
        hidden_states = linear_of_concat_gated_residual(self.proj_out, (attn_output, mlp[0]), residual,
                                                        gate.unsqueeze(1))
    else:
        hidden_states = residual + gate.unsqueeze(1) * self.proj_out(torch.cat([attn_output, mlp[0]], dim=2))
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text_len], hidden_states[:, text_len:]


single_block_forward.chitu_block_forward = True  # type: ignore[attr-defined]


def _ada_zero(norm: torch.nn.Module, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """AdaLayerNormZero's six modulation vectors (shift, scale, gate of the attention, then of the MLP); the
    projection module is called as the block would call it (a step table serves its rows)."""
    return norm.linear(norm.silu(temb)).chunk(6, dim=1)


def double_block_forward(self: FluxTransformerBlock, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                         temb: torch.Tensor, image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                         joint_attention_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``FluxTransformerBlock.forward`` (diffusers 0.42); marked ``chitu_fused_norms``, each stream's AdaLN norm +
    modulation and its gated attention residual + norm2 + modulation run as ``services.ada_norm`` kernels; each
    stream's FFN output projection and gated residual go through ``services.gemm.feed_forward_residual`` (float32,
    rounded once, as inductor computes the fused pointwise op; one QuACK GEMM where the layer is routed there)."""
    if not getattr(self, "chitu_fused_norms", False):
        return FluxTransformerBlock.forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                            joint_attention_kwargs)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _ada_zero(self.norm1, temb)
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = _ada_zero(self.norm1_context, temb)
    norm_hidden_states = norm_modulate(hidden_states, self.norm1.norm, scale_msa, shift_msa)
    norm_encoder_hidden_states = norm_modulate(encoder_hidden_states, self.norm1_context.norm, c_scale_msa,
                                               c_shift_msa)
    attention_outputs = self.attn(hidden_states=norm_hidden_states, encoder_hidden_states=norm_encoder_hidden_states,
                                  image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))
    attn_output, context_attn_output = attention_outputs[:2]

    hidden_states, norm_hidden_states = add_norm_modulate(hidden_states, attn_output, gate_msa, self.norm2,
                                                          scale_mlp, shift_mlp)
    hidden_states = feed_forward_residual(self.ff, norm_hidden_states, hidden_states, gate_mlp.unsqueeze(1))
    if len(attention_outputs) == 3:  # IP-adapter output
        hidden_states = hidden_states + attention_outputs[2]

    encoder_hidden_states, norm_encoder_hidden_states = add_norm_modulate(
        encoder_hidden_states, context_attn_output, c_gate_msa, self.norm2_context, c_scale_mlp, c_shift_mlp)
    encoder_hidden_states = feed_forward_residual(self.ff_context, norm_encoder_hidden_states, encoder_hidden_states,
                                                  c_gate_mlp.unsqueeze(1))
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


double_block_forward.chitu_block_forward = True  # type: ignore[attr-defined]


def install(transformer: torch.nn.Module, ops: AttentionOps) -> int:
    """Put our processor on every Flux attention module and our forwards on every block that still runs diffusers'
    own (a block whose forward was already replaced, by us or by compilation of ours, keeps it); returns how many
    processors were replaced."""
    n = 0
    for module in transformer.modules():
        if isinstance(module, FluxAttention):
            module.set_processor(FluxJointAttnProcessor(ops))
            n += 1
        elif isinstance(module, FluxSingleTransformerBlock) and "forward" not in vars(module):
            module.forward = types.MethodType(single_block_forward, module)
        elif isinstance(module, FluxTransformerBlock) and "forward" not in vars(module):
            module.forward = types.MethodType(double_block_forward, module)
    return n
