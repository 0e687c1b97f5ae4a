"""What FlexCache (``denoiser_svc.cache``) needs to know about a family's transformer.

A ``CacheSpec`` is built from configs only (``FamilyAdapter.cache_spec``), so the denoiser server can validate a
request's cache policy before any weights are touched; ``resolve`` binds it to a loaded transformer. The caches
never look at model classes: every architecture fact they use is a field here.

Block call convention: every block of ``block_lists`` is called with keyword (or positional) arguments that include
``hidden_arg`` (image/video tokens, sharded under sequence parallelism), ``context_arg`` (text tokens, replicated;
None when the blocks do not transform them) and ``temb_arg`` (the timestep embedding), and returns
``block_output``: the names ``"hidden"``/``"context"`` in return order (one name = a bare tensor). A list whose
blocks follow another convention names it in ``list_calls`` (a ``BlockCall``): FLUX.2's single-stream blocks take
one *joint* sequence, the text tokens then the image tokens concatenated, and return that concatenation.

The caches see every block call in one canonical form, ``BlockIO`` (hidden = image tokens, context = text tokens):
a joint sequence is split at the text length of the same forward's last separate-stream block call (under sequence
parallelism each rank's joint sequence is its text shard then its image shard, so the local text length splits it),
and joined again for the block's output. A residual cached across lists (front in the double-stream blocks, back in
the single-stream ones) is therefore the same tensor pair on either side.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

ModulatedInput = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(first block, hidden, temb) -> the timestep-modulated input the block's attention sees`` (TeaCache)."""
CostFn = Callable[[int, int, int], float]
"""``(block list index, image tokens, text tokens) -> FLOPs of one call`` (per batch element; only ratios are
reported)."""


def _unit_cost(block_list: int, image_tokens: int, text_tokens: int) -> float:
    return 1.0


def _half_cost(block_list: int, image_tokens: int, text_tokens: int) -> float:
    return 0.5


@dataclass(frozen=True)
class BlockCall:
    """How the blocks of one list are called and what they return (``CacheSpec.list_calls``)."""

    hidden_arg: str = "hidden_states"
    """Block argument with the image tokens (with ``joint``: the text tokens then the image tokens)."""
    context_arg: str | None = "encoder_hidden_states"
    """Block argument with the text tokens when the blocks transform them separately; None otherwise."""
    temb_arg: str = "temb"
    """Block argument with the timestep embedding (or its modulation)."""
    output: tuple[str, ...] = ("context", "hidden")
    """What a block returns, in order (one name = a bare tensor; with ``joint``: ``("hidden",)``)."""
    joint: bool = False
    """``hidden_arg`` holds ``[text; image]`` concatenated along dim 1 and the block returns that concatenation."""


@dataclass(frozen=True)
class CacheSpec:
    """Per-architecture facts for feature caching (see the module doc for the block call convention)."""

    block_lists: tuple[str, ...]
    """Attribute paths (under the transformer) of the block lists, in execution order."""
    num_blocks: tuple[int, ...]
    """Blocks in each list (from the transformer config)."""
    transformer: str = "transformer"
    """Attribute of the denoiser handle that holds the transformer (the module called once per branch and step)."""
    hidden_arg: str = "hidden_states"
    """Block argument with the image/video tokens."""
    context_arg: str | None = "encoder_hidden_states"
    """Block argument with the text tokens when the blocks transform them (joint attention); None otherwise."""
    temb_arg: str = "temb"
    """Block argument with the timestep embedding."""
    block_output: tuple[str, ...] = ("context", "hidden")
    """What a block returns, in order."""
    attention: str | None = "attn"
    """Attribute of each block that holds its attention module (Pyramid Attention Broadcast); None: no PAB."""
    modulated_input: ModulatedInput | None = None
    """The first block's timestep-modulated input (TeaCache); None: no TeaCache."""
    teacache_coefficients: tuple[float, ...] = ()
    """TeaCache's rescaling polynomial for this family, highest power first (fitted on the released weights)."""
    block_cost: CostFn = _unit_cost
    """FLOPs of one call of a block of each list."""
    attention_cost: CostFn = _half_cost
    """FLOPs of one call of the attention module of a block of each list, same units as ``block_cost``."""
    tokens: Callable[[Any], tuple[int, int]] | None = None
    """``DenoiseState -> (image tokens, text tokens)`` of the whole (unsharded) sequence, for the costs."""
    unsupported: dict[str, str] = field(default_factory=dict)
    """Strategy name -> why this family cannot use it (beyond what the fields above imply)."""
    list_calls: tuple[BlockCall | None, ...] = ()
    """Per block list, its call convention where it differs from the fields above (None or absent: those)."""

    def __post_init__(self) -> None:
        separate = False
        for index, count in enumerate(self.num_blocks):
            call = self.call(index)
            if call.joint and count and not separate:
                raise ValueError(f"block list {self.block_lists[index]!r} takes a joint text+image sequence, but no "
                                 f"list with a separate text argument runs before it (its text length is unknown)")
            separate = separate or bool(count and not call.joint and call.context_arg)

    def call(self, index: int) -> BlockCall:
        """The call convention of block list ``index``."""
        own = self.list_calls[index] if index < len(self.list_calls) else None
        if own is not None:
            return own
        return BlockCall(self.hidden_arg, self.context_arg, self.temb_arg, self.block_output)

    @property
    def total_blocks(self) -> int:
        return sum(self.num_blocks)

    def costs(self, image_tokens: int, text_tokens: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(per-block costs, per-block attention costs) in execution order."""
        blocks: list[float] = []
        attention: list[float] = []
        for index, count in enumerate(self.num_blocks):
            blocks += [self.block_cost(index, image_tokens, text_tokens)] * count
            attention += [self.attention_cost(index, image_tokens, text_tokens)] * count
        return tuple(blocks), tuple(attention)

    def resolve(self, handle: Any) -> ResolvedSpec:
        """Bind to a loaded denoiser handle (or the transformer module itself)."""
        module = handle if isinstance(handle, torch.nn.Module) else getattr(handle, self.transformer)
        blocks: list[torch.nn.Module] = []
        for path, count in zip(self.block_lists, self.num_blocks, strict=True):
            lst = module.get_submodule(path)
            if len(lst) != count:
                raise ValueError(f"{type(module).__name__}.{path} has {len(lst)} blocks, the config says {count}")
            blocks.extend(lst)
        attention = [getattr(b, self.attention) for b in blocks] if self.attention else []
        calls = tuple(self.call(i) for i, count in enumerate(self.num_blocks) for _ in range(count))
        return ResolvedSpec(self, module, tuple(blocks), tuple(attention), calls)


@dataclass(frozen=True)
class ResolvedSpec:
    """A ``CacheSpec`` bound to one loaded transformer. Blocks are numbered in execution order over all lists;
    ``text_len`` (joint lists only) is the local text length of the forward (``text_length`` of an earlier block)."""

    spec: CacheSpec
    transformer: torch.nn.Module
    blocks: tuple[torch.nn.Module, ...]
    attention: tuple[torch.nn.Module, ...]
    calls: tuple[BlockCall, ...] = ()
    """The call convention of each block."""

    @property
    def has_joint(self) -> bool:
        """Some block takes a joint text+image sequence (the hooks must track the forward's text length)."""
        return any(c.joint for c in self.calls)

    def _bound(self, i: int, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        block = self.blocks[i]
        return _signature(type(block)).bind_partial(block, *args, **kwargs).arguments

    def text_length(self, i: int, args: tuple, kwargs: dict[str, Any]) -> int | None:
        """Length of the separate text argument of block ``i``'s call (None for joint or text-free blocks)."""
        call = self.calls[i]
        if call.joint or call.context_arg is None:
            return None
        context = self._bound(i, args, kwargs).get(call.context_arg)
        return None if context is None else int(context.shape[1])

    def block_inputs(self, i: int, args: tuple, kwargs: dict[str, Any], text_len: int | None = None) -> BlockIO:
        """The (canonical) hidden/context/temb tensors of block ``i``'s call."""
        call = self.calls[i]
        bound = self._bound(i, args, kwargs)
        temb = bound.get(call.temb_arg)
        if call.joint:
            joined = bound[call.hidden_arg]
            n = _need_text_len(text_len, i)
            return BlockIO(joined[:, n:], joined[:, :n], temb)
        return BlockIO(bound[call.hidden_arg], bound.get(call.context_arg) if call.context_arg else None, temb)

    def read_output(self, i: int, output: Any, text_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden, context) of block ``i``'s return value."""
        call = self.calls[i]
        if call.joint:
            n = _need_text_len(text_len, i)
            return output[:, n:], output[:, :n]
        if len(call.output) == 1:
            return output, None
        values = dict(zip(call.output, output, strict=True))
        return values["hidden"], values.get("context")

    def make_output(self, i: int, hidden: torch.Tensor, context: torch.Tensor | None) -> Any:
        """Block ``i``'s return value from (hidden, context)."""
        call = self.calls[i]
        if call.joint:
            if context is None:
                raise RuntimeError(f"block {i} returns a joint text+image sequence, but no text tokens were given")
            return torch.cat([context, hidden], dim=1)
        if len(call.output) == 1:
            return hidden
        return tuple(hidden if n == "hidden" else context for n in call.output)


def _need_text_len(text_len: int | None, i: int) -> int:
    if text_len is None:
        raise RuntimeError(f"block {i} takes a joint text+image sequence, but this forward's text length is unknown")
    return text_len


@dataclass
class BlockIO:
    """The tensors FlexCache reads from one block call."""

    hidden: torch.Tensor
    context: torch.Tensor | None
    temb: torch.Tensor | None


@functools.cache
def _signature(cls: type) -> inspect.Signature:
    """``cls.forward``'s signature (a pure function of the class, computed once per class)."""
    return inspect.signature(cls.forward)


NO_TEACACHE_POLYNOMIAL = (
    "no TeaCache rescaling polynomial has been fitted on this family's released weights, and without one the "
    "threshold would mean something else than for Flux.1 (the identity polynomial accumulates the raw input change "
    "and skips far more at the same threshold); first_block is the polynomial-free variant of the same rule")
"""Why a family without a fitted polynomial refuses TeaCache (``CacheSpec.unsupported``)."""


def block_counts(config: dict[str, Any], keys: Sequence[str]) -> tuple[int, ...]:
    """Block counts read from a transformer config, one per key."""
    return tuple(int(config[k]) for k in keys)
