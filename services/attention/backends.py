"""The attention kernel registry: every kernel behind the ``AttentionFn`` signature (``[B, S, H, D]`` in and out,
optional bool ``key_mask [B, S_k]``, True = attend), each registered with the constraints it needs.

Names are ``BackendName`` (a str Enum). ``get_backend(name, spec)`` returns a usable ``Backend`` or raises
``BackendError`` listing the backends usable for that spec; ``usable_backends(spec)`` lists them.

Kernels:

- ``sdpa``: torch SDPA with PyTorch's own kernel choice (the reference path of diffusers' native backend; on the
  CPU this is PyTorch's CPU flash kernel).
- ``sdpa_cudnn``, ``sdpa_flash``, ``sdpa_efficient``: one SDPA kernel each, called through the aten ops so that
  ``torch.compile`` traces them and the log-sum-exp comes back for ring attention.
- ``sdpa_math``: attention written out in float32 (chunked over queries to bound memory); the exact reference,
  usable everywhere.
- ``sage``: SageAttention 1.0.6 (8-bit Q/K, Triton; lossy), when the package is installed.
- ``flash_attn4``: FlashAttention-4 (``flash_attn.cute``, the ``flash-attn-4`` package: CuTe-DSL kernels compiled
  at the first call, Hopper and Blackwell), when installed; an opaque custom op under ``torch.compile``.
- ``flash_attn`` / ``flash_attn3``: the flash-attn packages (FA2 / FA3 on Hopper), when installed.

A kernel with ``supports_lse`` also answers ``fn_lse(q, k, v, key_mask) -> (out [B, S_q, H, D],
lse [B, H, S_q] float32)``: the natural-log sum of exp of the scaled scores, which ring attention needs to merge
partial results. The sequence-parallel wrappers ask ``Backend.constraints.supports_lse`` before using it.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from services.attention import AttentionFn

LseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]

AUTO = "auto"
"""The config value that asks the worker to time the eligible backends on the card and pick the fastest."""


class BackendName(StrEnum):
    """Registered attention kernels, in ``auto``'s preference order: named kernels first (a fixed kernel, whatever
    PyTorch's heuristics would pick), then PyTorch's own choice, then the float32 reference."""

    SDPA_CUDNN = "sdpa_cudnn"
    FLASH_ATTN4 = "flash_attn4"
    FLASH_ATTN3 = "flash_attn3"
    SDPA_FLASH = "sdpa_flash"
    FLASH_ATTN = "flash_attn"
    SDPA_EFFICIENT = "sdpa_efficient"
    SAGE = "sage"
    SDPA = "sdpa"
    SDPA_MATH = "sdpa_math"


class BackendError(ValueError):
    """An unknown or unusable backend name; the message lists the usable ones."""


@dataclass(frozen=True)
class AttentionSpec:
    """What a call needs from a kernel: where it runs, in which dtype, which head dim, mask and LSE needs."""

    device: str
    """``cpu`` or ``cuda``."""
    dtype: torch.dtype
    head_dim: int
    has_mask: bool = False
    needs_lse: bool = False
    capability: tuple[int, int] = (0, 0)
    """CUDA compute capability (``(0, 0)`` on the CPU)."""

    @classmethod
    def for_device(cls, device: torch.device, dtype: torch.dtype, head_dim: int, has_mask: bool = False,
                   needs_lse: bool = False) -> AttentionSpec:
        cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)
        return cls(device.type, dtype, head_dim, has_mask, needs_lse, cap)

    def describe(self) -> str:
        return (f"{self.device}, {str(self.dtype).removeprefix('torch.')}, head_dim {self.head_dim}"
                f"{', key mask' if self.has_mask else ''}{', log-sum-exp' if self.needs_lse else ''}")


_HALF = (torch.float16, torch.bfloat16)
_ALL_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Constraints:
    """What a kernel supports. ``violations`` says, in words, why a spec is not supported."""

    devices: tuple[str, ...] = ("cuda",)
    dtypes: tuple[torch.dtype, ...] = _HALF
    head_dims: tuple[int, ...] | None = None
    """Exact head dims supported; None means any up to ``max_head_dim``."""
    max_head_dim: int = 256
    head_dim_multiple: int = 8
    min_capability: tuple[int, int] = (0, 0)
    supports_mask: bool = False
    supports_lse: bool = False
    lossy: bool = False
    """Approximate by design (8-bit): never chosen by ``auto`` for the exact path."""
    requires: str | None = None
    """Python module that must be importable."""

    def violations(self, spec: AttentionSpec) -> list[str]:
        out = []
        if spec.device not in self.devices:
            out.append(f"runs on {'/'.join(self.devices)} only")
        if spec.dtype not in self.dtypes:
            out.append(f"dtype {str(spec.dtype).removeprefix('torch.')} unsupported")
        if self.head_dims is not None and spec.head_dim not in self.head_dims:
            out.append(f"head_dim {spec.head_dim} not in {list(self.head_dims)}")
        elif spec.head_dim > self.max_head_dim or spec.head_dim % self.head_dim_multiple:
            out.append(f"head_dim {spec.head_dim} must be a multiple of {self.head_dim_multiple} and "
                       f"<= {self.max_head_dim}")
        if spec.device == "cuda" and spec.capability < self.min_capability:
            out.append(f"needs compute capability >= {self.min_capability[0]}.{self.min_capability[1]}")
        if spec.has_mask and not self.supports_mask:
            out.append("no key mask support")
        if spec.needs_lse and not self.supports_lse:
            out.append("returns no log-sum-exp")
        if self.requires and not _importable(self.requires):
            out.append(f"package {self.requires!r} is not installed")
        return out


def _importable(module: str) -> bool:
    """Whether ``module`` (dotted names too: its parents are imported to look) can be imported."""
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package is missing (or fails to import)
        return False


Impl = Callable[..., "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]
"""``impl(q, k, v, key_mask, return_lse: bool)``: ``[B, S, H, D]`` tensors; returns out, or (out, lse)."""


@dataclass(frozen=True)
class Backend:
    name: BackendName
    constraints: Constraints
    impl: Impl = field(repr=False)
    description: str = ""

    @property
    def fn(self) -> AttentionFn:
        """The ``AttentionFn`` (out only)."""
        impl = self.impl

        def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None):
            return impl(q, k, v, key_mask, False)

        attention.__name__ = f"attention_{self.name.value}"
        return attention

    @property
    def fn_lse(self) -> LseFn:
        """``(q, k, v, key_mask) -> (out, lse [B, H, S_q] float32)``; only for kernels with ``supports_lse``."""
        if not self.constraints.supports_lse:
            raise BackendError(f"attention backend {self.name.value!r} returns no log-sum-exp; ring attention needs "
                               f"one of: {[b.value for b in lse_backends()]}")
        impl = self.impl

        def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None):
            return impl(q, k, v, key_mask, True)

        return attention_lse


_REGISTRY: dict[BackendName, Backend] = {}


def register(name: BackendName, constraints: Constraints, description: str = "") -> Callable[[Impl], Impl]:
    """Decorator: register ``impl`` as backend ``name`` with its constraints."""

    def wrap(impl: Impl) -> Impl:
        if name in _REGISTRY:
            raise ValueError(f"attention backend {name.value!r} registered twice")
        _REGISTRY[name] = Backend(name, constraints, impl, description)
        return impl

    return wrap


def all_backends() -> list[Backend]:
    """Every registered backend, in preference order (the order of ``BackendName``)."""
    return [_REGISTRY[n] for n in BackendName if n in _REGISTRY]


def lse_backends() -> list[BackendName]:
    return [b.name for b in all_backends() if b.constraints.supports_lse]


def usable_backends(spec: AttentionSpec) -> list[Backend]:
    return [b for b in all_backends() if not b.constraints.violations(spec)]


def parse_name(name: str) -> BackendName:
    """``BackendName`` for ``name``; an unknown name is an error listing the valid ones."""
    try:
        return BackendName(name)
    except ValueError:
        valid = [AUTO, *(n.value for n in BackendName)]
        raise BackendError(f"unknown attention backend {name!r}; valid names: {valid}") from None


def get_backend(name: str | BackendName, spec: AttentionSpec) -> Backend:
    """The backend ``name`` if it can run ``spec``; otherwise BackendError listing the usable backends."""
    backend = _REGISTRY[parse_name(name) if isinstance(name, str) else name]
    why = backend.constraints.violations(spec)
    if why:
        usable = [b.name.value for b in usable_backends(spec)]
        raise BackendError(f"attention backend {backend.name.value!r} cannot run {spec.describe()}: "
                           f"{'; '.join(why)}. Usable here: {usable}")
    return backend


# ------------------------------------------------------------------------------------------------------------------
# Kernels. Inputs are [B, S, H, D]; SDPA kernels take [B, H, S, D] views (no copies: the kernels accept strides).
# ------------------------------------------------------------------------------------------------------------------


def _bhsd(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(x.transpose(1, 2) for x in xs)


def _mask4d(key_mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if key_mask is None else key_mask[:, None, None, :]


def _lse3(lse: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Kernel LSE (possibly padded or with a trailing 1) -> [B, H, S_q] float32."""
    b, s, h, _ = q.shape
    return lse.reshape(b, h, -1)[:, :, :s].float()


def _sdpa_with(kernel: torch.nn.attention.SDPBackend, q, k, v, key_mask):
    from torch.nn.attention import sdpa_kernel

    qt, kt, vt = _bhsd(q, k, v)
    with sdpa_kernel([kernel]):
        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=_mask4d(key_mask)).transpose(1, 2)


@register(BackendName.SDPA, Constraints(devices=("cpu", "cuda"), dtypes=_ALL_FLOAT, head_dim_multiple=1,
                                       supports_mask=True),
          "torch SDPA, PyTorch's own kernel choice")
def _sdpa(q, k, v, key_mask, return_lse):
    qt, kt, vt = _bhsd(q, k, v)
    return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=_mask4d(key_mask)).transpose(1, 2)


@register(BackendName.SDPA_CUDNN, Constraints(min_capability=(8, 0), max_head_dim=128, supports_lse=True),
          "cuDNN fused attention (aten._scaled_dot_product_cudnn_attention)")
def _sdpa_cudnn(q, k, v, key_mask, return_lse):
    qt, kt, vt = _bhsd(q, k, v)
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, return_lse, 0.0, False, False)[:2]
    out = out.transpose(1, 2)
    return (out, _lse3(lse, q)) if return_lse else out


@register(BackendName.SDPA_FLASH, Constraints(min_capability=(8, 0), supports_lse=True),
          "FlashAttention-2 as built into PyTorch (aten._scaled_dot_product_flash_attention)")
def _sdpa_flash(q, k, v, key_mask, return_lse):
    qt, kt, vt = _bhsd(q, k, v)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, False, False)[:2]
    out = out.transpose(1, 2)
    return (out, _lse3(lse, q)) if return_lse else out


@register(BackendName.SDPA_EFFICIENT, Constraints(dtypes=_ALL_FLOAT, min_capability=(5, 0), supports_mask=True,
                                                  supports_lse=True),
          "memory-efficient attention (xformers-derived) built into PyTorch")
def _sdpa_efficient(q, k, v, key_mask, return_lse):
    if key_mask is not None:
        if return_lse:
            raise BackendError("sdpa_efficient returns no log-sum-exp together with a key mask")
        return _sdpa_with(torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION, q, k, v, key_mask)
    qt, kt, vt = _bhsd(q, k, v)
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, return_lse, 0.0, False)[:2]
    out = out.transpose(1, 2)
    return (out, _lse3(lse, q)) if return_lse else out


MATH_QUERY_CHUNK = 1024
"""Queries per chunk of the math kernel: bounds its float32 score matrix to chunk x S_k x H."""


@register(BackendName.SDPA_MATH, Constraints(devices=("cpu", "cuda"), dtypes=_ALL_FLOAT, max_head_dim=1024,
                                             head_dim_multiple=1, supports_mask=True, supports_lse=True),
          "attention written out in float32 (the exact reference)")
def _sdpa_math(q, k, v, key_mask, return_lse):
    scale = 1.0 / math.sqrt(q.shape[-1])
    kt = k.float().permute(0, 2, 3, 1)  # [B, H, D, S_k]
    vt = v.float().transpose(1, 2)  # [B, H, S_k, D]
    bias = None
    if key_mask is not None:
        bias = torch.zeros(key_mask.shape, dtype=torch.float32, device=q.device)
        bias = bias.masked_fill(~key_mask, float("-inf"))[:, None, None, :]
    outs, lses = [], []
    for start in range(0, q.shape[1], MATH_QUERY_CHUNK):
        qc = q[:, start:start + MATH_QUERY_CHUNK].float().transpose(1, 2)  # [B, H, s, D]
        scores = torch.matmul(qc * scale, kt)
        if bias is not None:
            scores = scores + bias
        lse = torch.logsumexp(scores, dim=-1)  # [B, H, s]
        outs.append(torch.matmul(torch.exp(scores - lse[..., None]), vt).transpose(1, 2))
        lses.append(lse)
    out = torch.cat(outs, dim=1).to(q.dtype)
    return (out, torch.cat(lses, dim=-1)) if return_lse else out


# -- optional packages: opaque custom ops, so torch.compile keeps them out of its graph ----------------------------


@torch.library.custom_op("chitu::sage_attention", mutates_args=())
def _sage_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from sageattention import sageattn

    # K smoothing (subtracting the mean key) is exact for softmax; done here because sageattn would do it in place
    k = k - k.mean(dim=1, keepdim=True)
    return sageattn(q, k, v, tensor_layout="NHD", is_causal=False, smooth_k=False)


@_sage_op.register_fake
def _(q, k, v):
    return torch.empty_like(q)


@register(BackendName.SAGE, Constraints(min_capability=(8, 0), head_dims=(64, 96, 128), lossy=True,
                                        requires="sageattention"),
          "SageAttention 1.0.6: 8-bit Q/K, Triton (lossy)")
def _sage(q, k, v, key_mask, return_lse):
    return _sage_op(q, k, v)


@torch.library.custom_op("chitu::flash_attn4", mutates_args=())
def _fa4_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from flash_attn.cute import flash_attn_func

    out, lse = flash_attn_func(q, k, v, causal=False, return_lse=True)
    return out, lse.float()


@_fa4_op.register_fake
def _(q, k, v):
    b, s, h, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, s), dtype=torch.float32)


@register(BackendName.FLASH_ATTN4, Constraints(min_capability=(9, 0), supports_lse=True, requires="flash_attn.cute"),
          "FlashAttention-4 (flash-attn-4 package: CuTe-DSL kernels for Hopper and Blackwell)")
def _flash_attn4(q, k, v, key_mask, return_lse):
    out, lse = _fa4_op(q, k, v)
    return (out, lse) if return_lse else out


# FA2's own module: the flash-attn-4 wheel installs ``flash_attn/cute`` alone, so ``flash_attn`` can exist without FA2
@register(BackendName.FLASH_ATTN, Constraints(min_capability=(8, 0), supports_lse=True,
                                              requires="flash_attn.flash_attn_interface"),
          "flash-attn 2 package")
def _flash_attn(q, k, v, key_mask, return_lse):
    from flash_attn import flash_attn_func

    res = flash_attn_func(q, k, v, dropout_p=0.0, causal=False, return_attn_probs=return_lse)
    return (res[0], res[1].float()) if return_lse else res


@register(BackendName.FLASH_ATTN3, Constraints(min_capability=(9, 0), supports_lse=True,
                                               requires="flash_attn_interface"),
          "flash-attn 3 (Hopper) package")
def _flash_attn3(q, k, v, key_mask, return_lse):
    from flash_attn_interface import flash_attn_func

    res = flash_attn_func(q, k, v, causal=False)
    out, lse = (res[0], res[1]) if isinstance(res, tuple) else (res, None)
    if return_lse:
        if lse is None:
            raise BackendError("this flash_attn_interface build returns no log-sum-exp")
        return out, lse.float()
    return out
