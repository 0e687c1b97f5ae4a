"""What FlexCache (``denoiser_svc.cache``) needs to know about a family's transformer.

A ``CacheSpec`` is built from configs only (``FamilyAdapter.cache_spec``), so the denoiser server can validate a
request's cache policy before any weights are touched; ``resolve`` binds it to a loaded transformer. The caches
never look at model classes: every architecture fact they use is a field here.

Block call convention: every block of ``block_lists`` is called with keyword (or positional) arguments that include
``hidden_arg`` (image/video tokens, sharded under sequence parallelism), ``context_arg`` (text tokens, replicated;
None when the blocks do not transform them) and ``temb_arg`` (the timestep embedding), and returns
``block_output``: the names ``"hidden"``/``"context"`` in return order (one name = a bare tensor).
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
        return ResolvedSpec(self, module, tuple(blocks), tuple(attention))


@dataclass(frozen=True)
class ResolvedSpec:
    """A ``CacheSpec`` bound to one loaded transformer."""

    spec: CacheSpec
    transformer: torch.nn.Module
    blocks: tuple[torch.nn.Module, ...]
    attention: tuple[torch.nn.Module, ...]

    def block_inputs(self, block: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> BlockIO:
        """The hidden/context/temb tensors of one block call."""
        bound = _signature(type(block)).bind_partial(block, *args, **kwargs).arguments
        s = self.spec
        return BlockIO(bound[s.hidden_arg], bound.get(s.context_arg) if s.context_arg else None,
                       bound.get(s.temb_arg))

    def read_output(self, output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden, context) of a block's return value."""
        names = self.spec.block_output
        if len(names) == 1:
            return output, None
        values = dict(zip(names, output, strict=True))
        return values["hidden"], values.get("context")

    def make_output(self, hidden: torch.Tensor, context: torch.Tensor | None) -> Any:
        """A block's return value from (hidden, context)."""
        names = self.spec.block_output
        if len(names) == 1:
            return hidden
        return tuple(hidden if n == "hidden" else context for n in names)


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


def block_counts(config: dict[str, Any], keys: Sequence[str]) -> tuple[int, ...]:
    """Block counts read from a transformer config, one per key."""
    return tuple(int(config[k]) for k in keys)
