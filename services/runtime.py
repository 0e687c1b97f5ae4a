"""How a GPU stage runs its model: attention backend choice, fused projections, regional compilation, CUDA graphs.

``RuntimeConfig`` is the per-stage config; the helpers apply it to a loaded diffusers transformer:

- ``fuse_projections``: one GEMM for Q, K and V (and for the added text projections) instead of three. The
  separate ``to_q``/``to_k``/``to_v`` weights become views of the fused weight, so no memory is added and any code
  that still calls them computes the same thing.
- ``fuse_gelu_epilogues``: the tanh-GELU MLPs (diffusers' ``GELU(approximate="tanh")`` projections of Flux, Wan and
  Qwen-Image feed-forwards, and Flux's single-stream ``proj_mlp``) run as one GEMM with the bias and the GELU in
  its epilogue on CUDA (cuBLASLt's, or QuACK's where ``services.gemm`` routed the layer), instead of a GEMM
  followed by an elementwise kernel that reads and writes the whole (4x wide) hidden activation again; Flux's
  single-stream ``proj_out`` is applied to the attention and MLP parts without concatenating them first. The CPU
  keeps the plain ops (its fused kernel computes the erf GELU, not tanh).
- ``fuse_norm_rope``: marks the attention modules whose query/key RMS norm and rotary embedding
  ``services.norm_rope`` computes in one Triton kernel (Flux.1, FLUX.2 and Wan processors; CUDA).
- ``fuse_norms``: marks the blocks (Flux.1 double- and single-stream, Wan) whose residual adds, layer norms and AdaLN
  modulations ``services.ada_norm`` computes in one Triton kernel each (the families' block forwards read it; CUDA).
- ``regional_compile``: ``torch.compile`` of each instance of the model's repeated block classes (diffusers'
  ``_repeated_blocks``), not of the whole model: one compiled graph serves every block of a class, compile time is
  that of one block, and everything outside the blocks (the step loop, the scheduler, hooks registered on the blocks
  after compilation, the sequence-parallel collectives, which are ``torch.compiler.disable``'d) stays eager.
  CUDA graphs, when enabled, are inductor's CUDA-graph trees around the compiled blocks (static shapes only).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
from collections.abc import Callable
from typing import Any, Literal

import torch

from services.config import ConfigError
from services.gemm import GemmBackend, linear_gelu_tanh
from services.log import get_logger

log = get_logger(__name__)


@dataclasses.dataclass
class RuntimeConfig:
    """Kernel choice and compilation of one stage's model."""

    attention_backend: str = "auto"
    """Attention kernel: ``auto`` (timed on this device at start-up, see docs/performance.md) or a name from
    ``services.attention.backends.BackendName`` (sdpa, sdpa_cudnn, sdpa_flash, sdpa_efficient, sdpa_math, sage,
    flash_attn, flash_attn3, flash_attn4)."""
    allow_lossy: bool = False
    """Let ``auto`` choose lossy kernels (8-bit SageAttention) when they are faster; off means exact kernels only."""
    exact_max_rel_error: float = 1e-2
    """``auto``: largest relative error vs the float32 math kernel for an exact kernel (bf16 kernels measure ~3e-3)."""
    lossy_max_rel_error: float = 5e-2
    """``auto`` with ``allow_lossy``: largest relative error accepted for a lossy kernel."""
    auto_min_gain: float = 0.03
    """``auto``: a backend later in the preference order must be this much faster to replace an earlier one."""
    fuse_qkv: bool = True
    """Fuse the Q/K/V projections (and the added text projections) of every attention module into one GEMM."""
    fuse_mlp: bool = True
    """Run tanh-GELU MLP up-projections as one GEMM with the GELU in its epilogue (CUDA), and Flux's single-stream
    output projection without concatenating its inputs (``fuse_gelu_epilogues``)."""
    fuse_norm_rope: bool = True
    """Compute the attention queries' and keys' RMS norm and rotary embedding in one Triton kernel on CUDA (Flux.1,
    FLUX.2 and Wan; ``services.norm_rope``)."""
    fuse_norms: bool = True
    """Compute each block's residual add, layer norm and modulation in one Triton kernel on CUDA (Flux.1 and Wan;
    ``services.ada_norm``)."""
    merge_repeated_keys: bool = False
    """Cross-attention over keys whose last rows repeat (Wan's zero-padded prompt embeddings) runs over one merged key
    with its logit raised by ln(count): exact, and a prompt of L tokens costs L + 1 keys instead of 512
    (``services.attention.repeated_keys``; a Triton kernel on CUDA, float32 SDPA elsewhere). Off by default: on an
    H200 (2026-11-28) the Triton kernel took 0.135 ms for a 120-token prompt against cuDNN's 0.193 ms over all 512
    keys, but 0.336 ms for a 512-token one, and whole Wan2.1-1.3B forwards moved by -0.4 ms (120 tokens) and +3 to
    +8 ms (512 tokens): see docs/performance.md."""
    compile: Literal["auto", "on", "off"] | bool = "auto"
    """Regional ``torch.compile`` of the repeated transformer blocks; ``auto`` is on for CUDA, off on the CPU.
    (YAML reads a bare on/off as true/false: both spellings are accepted.)"""
    compile_mode: Literal["default", "max-autotune"] = "default"
    """Inductor mode: ``max-autotune`` also benchmarks Triton GEMM templates (longer start-up)."""
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    """Compiler backend; ``eager``/``aot_eager`` only trace (debugging, CPU tests)."""
    cuda_graphs: bool = False
    """Replay the compiled blocks as CUDA graphs (inductor CUDA-graph trees); needs compilation. Each request size
    records its own graphs (at start-up for the default size and ``warmup_sizes``, else on its first request)."""
    gemm_backend: GemmBackend = "auto"
    """GEMM kernel of the blocks' linear layers (``services.gemm``): ``auto`` times cuBLAS and QuACK's persistent
    GEMMs (when quack-kernels is installed, on Hopper) on each layer shape of the warm-up step and routes each to the
    faster; ``cublas`` keeps PyTorch's; ``quack`` routes every candidate layer to QuACK (an error where it cannot
    run)."""
    gemm_min_gain: float = 0.01
    """``gemm_backend: auto``: a QuACK kernel must be this much faster than cuBLAS to be chosen."""
    kernel_cache_dir: str = ""
    """Folder for the persistent caches of compiled kernels: inductor's FX-graph and AOTAutograd caches, Triton's
    (inductor's and ours), FlashAttention-4's and QuACK's CuTe-DSL objects, each in a sub-folder. On a volume that
    outlives the process (the Helm chart mounts one), a restart or a new replica loads what an earlier start compiled
    instead of compiling it again. Empty: each library's default (inductor, Triton and QuACK under /tmp or the home
    folder, lost with the container; FlashAttention-4 keeps no disk cache)."""
    auto_cache: bool = True
    """With ``kernel_cache_dir`` set: keep ``auto``'s attention choice there and reuse it at a later start on the same
    kind of card with the same software and call shapes, skipping the timing (``services.attention.selection``).
    Off: time the kernels at every start."""
    warmup_sizes: list[str] = dataclasses.field(default_factory=list)
    """Request sizes the warm-up also runs, after the one at the model's default size: ``"WIDTHxHEIGHT"`` (video:
    ``"WIDTHxHEIGHTxFRAMES"``). A request at one of them then pays no compilation: the first other size makes
    ``torch.compile`` recompile every block class once with dynamic shapes (otherwise paid by the first
    request there), and under CUDA graphs each size records its graphs. Each must fit the model's
    limits (a start-up error names the entry otherwise)."""
    warmup_cache_strategies: list[str] = dataclasses.field(default_factory=list)
    """FlexCache strategies (e.g. ``["pab"]``) the warm-up also runs, with their default settings over
    ``CACHE_WARMUP_STEPS`` steps at the default size, then the plain request once more: a strategy whose hooks change
    what the compiled blocks see (PAB's attention broadcast) otherwise compiles on the first request using it, and
    the next plain request compiles again. Each must be usable by the model (a start-up error lists those that are)."""

    def validate(self) -> None:
        from services.attention.backends import AUTO, BackendError, parse_name

        if isinstance(self.compile, bool):
            self.compile = "on" if self.compile else "off"

        if self.attention_backend != AUTO:
            try:
                parse_name(self.attention_backend)
            except BackendError as exc:
                raise ConfigError(f"runtime.attention_backend: {exc}") from None
        for name in ("exact_max_rel_error", "lossy_max_rel_error"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"runtime.{name} must be > 0, got {getattr(self, name)}")
        if self.auto_min_gain < 0:
            raise ConfigError(f"runtime.auto_min_gain must be >= 0, got {self.auto_min_gain}")
        if self.gemm_backend not in ("auto", "cublas", "quack"):
            raise ConfigError(f"runtime.gemm_backend must be auto, cublas or quack, got {self.gemm_backend!r}")
        if self.gemm_min_gain < 0:
            raise ConfigError(f"runtime.gemm_min_gain must be >= 0, got {self.gemm_min_gain}")
        for entry in self.warmup_sizes:
            parse_size(entry, "runtime.warmup_sizes")
        if self.cuda_graphs and self.compile == "off":
            raise ConfigError("runtime.cuda_graphs needs runtime.compile on or auto (graphs wrap the compiled blocks)")

    def compile_enabled(self, device: torch.device) -> bool:
        return self.compile == "on" or (self.compile == "auto" and device.type == "cuda")

    def inductor_mode(self, device: torch.device) -> str | None:
        graphs = self.cuda_graphs and device.type == "cuda"
        if self.compile_mode == "max-autotune":
            return "max-autotune" if graphs else "max-autotune-no-cudagraphs"
        return "reduce-overhead" if graphs else None


CACHE_WARMUP_STEPS = 8
"""Steps of a ``warmup_cache_strategies`` warm-up: enough for the strategies' default start fractions and intervals
to reach the steps that reuse cached values."""


def parse_size(text: str, field: str) -> tuple[int, int, int]:
    """``"WIDTHxHEIGHT"`` or ``"WIDTHxHEIGHTxFRAMES"`` -> (width, height, frames; 1 for an image)."""
    parts = str(text).lower().split("x")
    if len(parts) not in (2, 3) or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"{field}: {text!r} is not WIDTHxHEIGHT or WIDTHxHEIGHTxFRAMES (positive integers, "
                          f"e.g. 1024x768 or 832x480x81)")
    width, height, *frames = (int(p) for p in parts)
    return width, height, frames[0] if frames else 1


class CompileWatch:
    """Compilations and CUDA-graph recordings that happen after the warm-up, i.e. on a request's path (a request size
    not in ``runtime.warmup_sizes``, or a guard the warm-up did not settle). Reads torch's own counters (process-wide:
    one serving worker per process): dynamo's traced graphs (``stats.unique_graphs``) and the non-static inputs
    inductor's CUDA-graph trees record (``inductor.cudagraph_recorded_non_static_inputs``, which grows with every
    recording). ``check`` after each step returns what that step added."""

    def __init__(self) -> None:
        self._last = self._read()
        self.steps_compiling = 0
        """Steps (after the warm-up) during which dynamo traced at least one graph."""
        self.steps_recording = 0
        """Steps (after the warm-up) during which CUDA-graph trees recorded at least one graph."""

    @staticmethod
    def _read() -> tuple[int, int]:
        from torch._dynamo.utils import counters

        return counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_recorded_non_static_inputs"]

    def check(self) -> tuple[int, int]:
        """(graphs traced, recorded-input count) since the last check."""
        now = self._read()
        compiled, recorded = now[0] - self._last[0], now[1] - self._last[1]
        self._last = now
        self.steps_compiling += compiled > 0
        self.steps_recording += recorded > 0
        return compiled, recorded

    def facts(self) -> dict[str, str]:
        return {"steps_compiling_after_warmup": str(self.steps_compiling),
                "steps_recording_after_warmup": str(self.steps_recording)}


KERNEL_CACHES = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton",
                 "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR": "flash_attn_cute", "QUACK_CACHE_DIR": "quack"}
"""The compilers' cache-folder variables and the sub-folder of ``kernel_cache_dir`` each gets."""
FLASH_ATTENTION_CACHE_SWITCH = "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"
"""FlashAttention-4 keeps no disk cache unless this variable is 1; ``use_kernel_cache`` sets it."""


def use_kernel_cache(folder: str) -> dict[str, str]:
    """Point the compilers' persistent caches into ``folder`` (``RuntimeConfig.kernel_cache_dir``); returns what was
    set. These libraries take their cache folders only from environment variables, so this sets them for this
    process and the rank processes it starts; it must run before FlashAttention-4 or QuACK are imported (they read
    them once, at import) and before anything compiles: the worker calls it first thing. FlashAttention-4's disk
    cache is off unless asked for: it is switched on here too."""
    if not folder:
        return {}
    folder = os.path.abspath(folder)
    env = {var: os.path.join(folder, sub) for var, sub in KERNEL_CACHES.items()}
    try:
        for path in env.values():
            os.makedirs(path, exist_ok=True)
            if not os.access(path, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied")
    except OSError as exc:
        raise ConfigError(f"runtime.kernel_cache_dir {folder!r}: cannot write {path!r} ({exc.strerror})") from None
    env[FLASH_ATTENTION_CACHE_SWITCH] = "1"
    os.environ.update(env)
    late = [name for name in ("flash_attn.cute.interface", "quack.cache") if name in sys.modules]
    if late:  # e.g. a benchmark that imported them first: they keep the folders they read at import
        log.warning("kernel_cache_late", modules=",".join(late), kernel_cache_dir=folder)
    return env


def denoiser_module(handle: Any, component: str = "transformer") -> torch.nn.Module:
    """The transformer inside an adapter's denoiser handle (a partial pipeline, or the module itself)."""
    if isinstance(handle, torch.nn.Module):
        return handle
    module = getattr(handle, component, None) or getattr(handle, "transformer", None)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"denoiser handle {type(handle).__name__} has no {component!r} module")
    return module


_FUSED = (("to_qkv", ("to_q", "to_k", "to_v")), ("to_kv", ("to_k", "to_v")),
          ("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")))


@torch.no_grad()
def fuse_projections(model: torch.nn.Module) -> int:
    """Fuse Q/K/V projections of every diffusers attention module that supports it; returns how many are fused."""
    from diffusers.models.attention import AttentionModuleMixin

    n = 0
    for module in model.modules():
        if not isinstance(module, AttentionModuleMixin) or not module._supports_qkv_fusion:
            continue
        if getattr(module, "fused_projections", False):
            n += 1
            continue
        if not hasattr(module, "to_q"):
            continue
        module.fuse_projections()
        n += 1
        for fused_name, parts in _FUSED:
            fused = getattr(module, fused_name, None)
            if fused is None or not all(getattr(module, p, None) is not None for p in parts):
                continue
            # the separate projections become views of the fused weight: no extra memory, same results
            offset = 0
            for p in parts:
                lin = getattr(module, p)
                rows = lin.weight.shape[0]
                lin.weight.data = fused.weight.data[offset:offset + rows]
                if lin.bias is not None and fused.bias is not None:
                    lin.bias.data = fused.bias.data[offset:offset + rows]
                offset += rows
    return n


def _gelu_projection_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """diffusers' ``GELU(approximate="tanh").forward`` (projection, then GELU) as one fused GEMM."""
    return linear_gelu_tanh(hidden_states, self.proj)


_gelu_projection_forward.chitu_block_forward = True  # type: ignore[attr-defined]  # removed by remove_block_forwards


def _single_stream_mlp(module: torch.nn.Module) -> bool:
    """A Flux-style single-stream block: ``proj_out(cat(attention, gelu_tanh(proj_mlp(x))))``."""
    act, up, out = (getattr(module, n, None) for n in ("act_mlp", "proj_mlp", "proj_out"))
    return (isinstance(act, torch.nn.GELU) and act.approximate == "tanh" and isinstance(up, torch.nn.Linear)
            and isinstance(out, torch.nn.Linear) and out.in_features > up.out_features)


def fuse_gelu_epilogues(model: torch.nn.Module) -> int:
    """Route every tanh-GELU MLP of ``model`` through ``linear_gelu_tanh`` (see the module doc); returns how many.

    diffusers' ``GELU`` modules (feed-forward up-projections) get a fused forward; Flux-style single-stream blocks
    are marked ``chitu_fused_mlp``, which the family's block forward reads (it also applies ``proj_out`` with
    ``services.gemm.linear_of_concat``). Idempotent; ``unfuse_gelu_epilogues`` undoes it."""
    from diffusers.models.activations import GELU

    n = 0
    for module in model.modules():
        if isinstance(module, GELU) and module.approximate == "tanh" and isinstance(module.proj, torch.nn.Linear):
            if "forward" not in vars(module):
                module.forward = types.MethodType(_gelu_projection_forward, module)
            n += 1
        elif _single_stream_mlp(module):
            module.chitu_fused_mlp = True
            n += 1
    return n


def unfuse_gelu_epilogues(model: torch.nn.Module) -> None:
    """Back to diffusers' own MLP forwards."""
    for module in model.modules():
        if getattr(vars(module).get("forward"), "__func__", None) is _gelu_projection_forward:
            del module.forward
        vars(module).pop("chitu_fused_mlp", None)


def fuse_norm_rope(model: torch.nn.Module) -> int:
    """Mark every Flux.1, FLUX.2 and Wan attention module (the processors that read the mark) whose query and key
    norms are RMS norms ``services.norm_rope`` can fuse with the rotary embedding (``chitu_fused_norm_rope``);
    returns how many. Registers the CUDA kernel first when the model is on a GPU, so a compiled block finds it.
    ``unfuse_norm_rope`` undoes it."""
    from diffusers.models.normalization import RMSNorm
    from diffusers.models.transformers.transformer_flux import FluxAttention
    from diffusers.models.transformers.transformer_flux2 import Flux2Attention, Flux2ParallelSelfAttention
    from diffusers.models.transformers.transformer_wan import WanAttention

    readers = (FluxAttention, Flux2Attention, Flux2ParallelSelfAttention, WanAttention)

    from services.norm_rope import register_cuda_kernel

    def fits(module: torch.nn.Module) -> bool:
        return isinstance(module, readers) and all(
            isinstance(getattr(module, name, None), RMSNorm | torch.nn.RMSNorm) for name in ("norm_q", "norm_k"))

    return _mark(model, "chitu_fused_norm_rope", fits, register_cuda_kernel)


def unfuse_norm_rope(model: torch.nn.Module) -> None:
    _unmark(model, "chitu_fused_norm_rope")


def _mark(model: torch.nn.Module, attr: str, fits: Callable[[torch.nn.Module], bool],
          register_kernel: Callable[[], object]) -> int:
    """Set ``attr`` on every module of ``model`` that ``fits``; returns how many. Registers the fusion's CUDA kernel
    first when the model is on a GPU (``register_kernel``), so a compiled block finds the op."""
    marked = [m for m in model.modules() if fits(m)]
    for module in marked:
        setattr(module, attr, True)
    if marked and any(p.is_cuda for p in model.parameters()):
        register_kernel()
    return len(marked)


def _unmark(model: torch.nn.Module, attr: str) -> None:
    for module in model.modules():
        vars(module).pop(attr, None)


def _layer_norms(*norms: Any) -> bool:
    return all(isinstance(n, torch.nn.LayerNorm) for n in norms)


def fuse_norms(model: torch.nn.Module) -> int:
    """Mark every Flux.1 and Wan block whose norms are layer norms ``services.ada_norm`` can fuse with the residual
    adds and modulations around them (``chitu_fused_norms``, read by the families' block forwards); returns how many.
    Registers the CUDA kernel first when the model is on a GPU, so a compiled block finds it. ``unfuse_norms`` undoes
    it."""
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    from services.ada_norm import register_cuda_kernel

    def fits(m: torch.nn.Module) -> bool:
        if isinstance(m, WanTransformerBlock):
            return _layer_norms(m.norm1, m.norm3)
        if isinstance(m, FluxTransformerBlock):
            return (m.norm1.emb is None and m.norm1_context.emb is None
                    and _layer_norms(m.norm1.norm, m.norm1_context.norm, m.norm2, m.norm2_context))
        return isinstance(m, FluxSingleTransformerBlock) and _layer_norms(m.norm.norm)

    return _mark(model, "chitu_fused_norms", fits, register_cuda_kernel)


def unfuse_norms(model: torch.nn.Module) -> None:
    _unmark(model, "chitu_fused_norms")


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Instances of the model's repeated block classes (diffusers' ``_repeated_blocks``)."""
    names = set(getattr(model, "_repeated_blocks", None) or ())
    if not names:
        raise ValueError(f"{type(model).__name__} declares no _repeated_blocks; regional compilation needs them")
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__}: none of {sorted(names)} found among its modules")
    return blocks


def regional_compile(model: torch.nn.Module, cfg: RuntimeConfig, device: torch.device) -> dict[str, int]:
    """``torch.compile`` the forward of every repeated block (see module doc); returns blocks compiled per class."""
    # dynamic=None (torch's default): a second resolution recompiles once with dynamic shapes instead of one
    # static graph per resolution
    kwargs: dict[str, Any] = {"backend": cfg.compile_backend, "fullgraph": False}
    if cfg.compile_backend == "inductor":
        kwargs["mode"] = cfg.inductor_mode(device)
    counts: dict[str, int] = {}
    for block in repeated_blocks(model):
        if getattr(block, "_chitu_compiled", False):
            continue
        block.forward = torch.compile(block.forward, **kwargs)
        block._chitu_compiled = True
        counts[type(block).__name__] = counts.get(type(block).__name__, 0) + 1
    log.info("regional_compile", blocks=counts, **{k: str(v) for k, v in kwargs.items()})
    return counts


def undo_regional_compile(model: torch.nn.Module) -> None:
    """Back to the eager block forwards."""
    for block in repeated_blocks(model):
        if getattr(block, "_chitu_compiled", False):
            del block.forward
            block._chitu_compiled = False


def graph_breaks() -> int:
    """Graph breaks ``torch.compile`` has recorded in this process so far (dynamo's counters, summed over reasons):
    the warm-up reports how many the compiled blocks hit (0 means each block is one graph)."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())
