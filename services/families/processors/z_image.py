"""Z-Image attention (single-stream ``ZImageTransformerBlock``s) through ``AttentionOps.joint``.

Every Z-Image attention is self-attention over one token sequence; three kinds of blocks see three sequences
(``ZImageAttnProcessor.role`` names it, for sequence-parallel plans that need to tell them apart):

- ``noise_refiner`` (role ``image``): the **image** tokens only;
- ``context_refiner`` (role ``text``): the **text** (caption) tokens only;
- ``layers``, the main blocks (role ``joint``): **image first, then text** —
  ``[img_0 .. img_{N-1}, txt_0 .. txt_{L-1}]``.

Each part is padded by the transformer to a multiple of 32 tokens with its learned pad token, and padding is
attended to (as in diffusers). Rotary embeddings (complex, per position) are applied to q and k before the call.
A key-padding mask ``[B, S]`` (True = attend) is passed only when the transformer batches sequences of different
lengths; with batch size 1 it is None.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention

from services.attention import AttentionOps


def _rotate(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Complex rotary embedding of ``x`` ``[B, S, H, D]`` by ``freqs_cis`` ``[B, S, D/2]`` (in float32)."""
    with torch.amp.autocast("cuda", enabled=False):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis.unsqueeze(2)).flatten(3).type_as(x)


class ZImageAttnProcessor:
    """Same math as diffusers' ``ZSingleStreamAttnProcessor``, the attention itself through ``ops.joint``."""

    def __init__(self, ops: AttentionOps, role: str):
        self.ops = ops
        self.role = role
        """``image``, ``text`` or ``joint``: which tokens this block attends over."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, freqs_cis: torch.Tensor | None = None) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("Z-Image attention is self-attention; encoder_hidden_states must be None")
        key_mask = None
        if attention_mask is not None:
            if attention_mask.ndim != 2:
                raise ValueError(f"Z-Image attention takes a [B, S] key mask, got shape {list(attention_mask.shape)}")
            key_mask = attention_mask.to(torch.bool)
        q = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        k = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if freqs_cis is not None:
            q, k = _rotate(q, freqs_cis), _rotate(k, freqs_cis)
        dtype = q.dtype
        out = self.ops.joint(q, k.to(dtype), v, key_mask).flatten(2, 3).to(dtype)
        out = attn.to_out[0](out)
        if len(attn.to_out) > 1:
            out = attn.to_out[1](out)
        return out


ROLES = (("noise_refiner", "image"), ("context_refiner", "text"), ("layers", "joint"))
"""Block list of the transformer -> the tokens its attention covers."""


def install(transformer: torch.nn.Module, ops: AttentionOps) -> int:
    """Put our processor on every Z-Image block; returns how many were replaced. (Omni checkpoints' SigLIP refiner
    keeps diffusers' processor: text-to-image never runs it.)"""
    n = 0
    for name, role in ROLES:
        for block in getattr(transformer, name):
            block.attention.set_processor(ZImageAttnProcessor(ops, role))
            n += 1
    return n
