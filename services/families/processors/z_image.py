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


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` with the standard strides of its shape, including its size-1 dimensions (``is_contiguous`` ignores those:
    a ``[1, S, D]`` slice of a ``[1, S', D]`` table counts as contiguous with a row stride of ``S' * D``)."""
    standard, step = [], 1
    for size in reversed(t.shape):
        standard.append(step)
        step *= size
    return t if list(t.stride()) == standard[::-1] else t.clone(memory_format=torch.contiguous_format)


def _contiguous_rotary(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of every block: its rotary table (``freqs_cis``, the third argument) with standard strides.

    The transformer hands each block a slice of a padded table whose batch stride depends on the table's length
    rather than on the block's sequence, so compiled blocks (dynamic shapes) guarded on a stride that the next caption
    length broke: every new length recompiled the block class, up to dynamo's recompile limit, after which it ran
    uncompiled. With standard strides one dynamic graph serves every length (``tests/unit/test_warmup_sizes.py``).
    Runs outside the compiled forward; same values (a copy of ``[1, S, D/2]`` complex numbers)."""
    if len(args) > 2 and isinstance(args[2], torch.Tensor):
        args = (*args[:2], _dense(args[2]), *args[3:])
    elif isinstance(kwargs.get("freqs_cis"), torch.Tensor):
        kwargs = {**kwargs, "freqs_cis": _dense(kwargs["freqs_cis"])}
    return args, kwargs


def install(transformer: torch.nn.Module, ops: AttentionOps) -> int:
    """Put our processor on every Z-Image block (and the rotary-table hook, ``_contiguous_rotary``, once); returns how
    many were replaced. (Omni checkpoints' SigLIP refiner keeps diffusers' processor: text-to-image never runs it.)"""
    n = 0
    for name, role in ROLES:
        for block in getattr(transformer, name):
            block.attention.set_processor(ZImageAttnProcessor(ops, role))
            if not getattr(block, "_chitu_contiguous_rotary", False):
                block.register_forward_pre_hook(_contiguous_rotary, with_kwargs=True)
                block._chitu_contiguous_rotary = True
            n += 1
    return n
