"""GEMM kernels of the transformer blocks' linear layers: cuBLAS (PyTorch) or QuACK's persistent CuTe-DSL GEMMs,
chosen per layer shape at start-up by timing both on this device (``runtime.gemm_backend``).

Why: on Hopper, QuACK's ping-pong GEMM (two consumer warp groups: one runs its epilogue while the other runs the
main loop) takes the bias, the tanh-GELU, a strided output or a gated residual in its epilogue at no cost, where
cuBLASLt's GELU epilogue costs 3-6 % over its plain GEMM; at the Flux.1 / Wan2.1 shapes it is also 2-4 % faster on
several plain bias GEMMs (``benchmarks/quack_gemms.py``, RESULTS.md). QuACK (``quack-kernels``) ships with
FlashAttention-4 and is optional: without it, or off Hopper, every layer stays on cuBLAS.

How the layers are routed: a candidate ``nn.Linear`` (inside a repeated block, with a bias, 16-bit weights, K and N
multiples of 8) carries ``chitu_gemm``: absent means cuBLAS; a ``GemmRecorder`` while the recording warm-up step runs
(it notes the shape the layer runs at and computes with cuBLAS); a QuACK tile configuration name once
``select_gemms`` chose one. Four entry points read it: the Linear's forward (``route_linear`` installs it), the
families' GELU MLPs (``linear_gelu_tanh``), a feed-forward's output projection with the gated residual after it
(``linear_gated_residual``, via ``feed_forward_residual``: Wan's FFN, Flux's double-stream FFNs), and Flux's
single-stream output projection over [attention; MLP] with its gated residual (``linear_of_concat_gated_residual``;
on cuBLAS ``linear_of_concat``, two GEMMs on the weight's column slices, the second accumulating in place). The
QuACK call is an opaque custom op (``chitu::quack_gemm``), so compiled blocks and CUDA graphs treat it as one
kernel.

Numerics: both accumulate in float32 and round once; QuACK's GELU and residual run on the float32 accumulator (the
residual path rounds once where diffusers rounds the FFN output to bf16 first). ``select_gemms`` rejects a kernel
whose output differs from cuBLAS's by more than ``MAX_REL_DIFF``.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
import types
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from services.log import get_logger

log = get_logger(__name__)

GemmBackend = Literal["auto", "cublas", "quack"]
Epilogue = Literal["bias", "bias_gelu", "gated_residual", "split_gated_residual"]
CUBLAS = "cublas"
QUACK_CONFIGS: dict[str, tuple[int, int, bool, int, int]] = {
    # name: (tile_m, tile_n, ping-pong, cluster_m, cluster_n); the two that won at the Flux / Wan shapes on an H200
    "quack_pp128x192": (128, 192, True, 2, 1),
    "quack_coop256x192": (256, 192, False, 2, 1),
}
MIN_ROWS = 256
"""``auto``: layers that run on fewer rows stay on cuBLAS untimed (``quack`` routes them too)."""
MAX_REL_DIFF = 1e-2
"""Largest relative difference from cuBLAS's output a QuACK kernel may show (measured: 6e-6 to 6e-4)."""
TIMED_CALLS = 10


@dataclasses.dataclass(frozen=True)
class GemmShape:
    """One distinct GEMM of a forward: ``m`` rows of ``k`` features to ``n``, with its epilogue."""

    m: int
    k: int
    n: int
    epilogue: Epilogue
    dtype: torch.dtype

    def describe(self) -> str:
        return f"{self.epilogue} [{self.m}, {self.k}] x [{self.k}, {self.n}]"


class GemmRecorder:
    """Notes the shapes candidate layers run at during one warm-up step (computing with cuBLAS meanwhile)."""

    def __init__(self) -> None:
        self.layers: dict[GemmShape, list[torch.nn.Linear]] = {}
        self.candidates: list[torch.nn.Linear] = []
        """Every layer routed to this recorder (``select_gemms`` takes them all off it, run or not)."""

    def record(self, linear: torch.nn.Linear, x: torch.Tensor, epilogue: Epilogue) -> None:
        self.record_shape(linear, GemmShape(x.numel() // x.shape[-1], x.shape[-1], linear.out_features, epilogue,
                                            x.dtype))

    def record_shape(self, linear: torch.nn.Linear, shape: GemmShape) -> None:
        layers = self.layers.setdefault(shape, [])
        if not any(layer is linear for layer in layers):
            layers.append(linear)


# -- availability ------------------------------------------------------------------------------------------------------
def quack_unavailable_reason(device: torch.device) -> str | None:
    """Why QuACK GEMMs cannot run on ``device`` (None: they can)."""
    if device.type != "cuda":
        return f"QuACK GEMMs need a CUDA device (this stage runs on {device.type})"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) != (9, 0):
        return f"QuACK GEMMs are used on Hopper (sm_90) only; this device is sm_{major}{minor}"
    try:
        quack_epilogues()
    except Exception as exc:  # noqa: BLE001 - ImportError, or a CuTe DSL that does not load: report, stay on cuBLAS
        return f"quack-kernels is not usable here ({type(exc).__name__}: {str(exc)[:120]})"
    return None


@functools.cache
def quack_epilogues() -> dict[str, Any]:
    """QuACK epilogue modules (built once; QuACK caches their compiled kernels per tile configuration)."""
    import quack.activation as qact  # a module: QuACK's epilogue fingerprint keys it by name
    from quack.epilogue.frontend import gemm_epilogue
    from quack.epilogue.ops import RowVecLoad

    # bias and gate are per-output-column vectors: pinned, as QuACK cannot tell row from column vectors when M == N
    @gemm_epilogue(ops={"bias": RowVecLoad("bias")})
    def bias(acc, bias):
        return {"D": acc + bias}

    @gemm_epilogue(ops={"bias": RowVecLoad("bias")})
    def bias_gelu(acc, bias):
        return {"D": qact.gelu_tanh_approx(acc + bias)}

    @gemm_epilogue(ops={"bias": RowVecLoad("bias"), "gate": RowVecLoad("gate")})
    def gated_residual(acc, c, bias, gate):
        return {"D": c + (acc + bias) * gate}

    @gemm_epilogue(ops={"gate": RowVecLoad("gate")})
    def split_gated_residual(acc, c, prev, gate):  # prev: the first part's projection (bias included)
        return {"D": c + (acc + prev) * gate}

    return {"bias": bias, "bias_gelu": bias_gelu, "gated_residual": gated_residual,
            "split_gated_residual": split_gated_residual}


def quack_gemm_config(tile_m: int, tile_n: int, pingpong: bool, cluster_m: int, cluster_n: int) -> Any:
    """QuACK's ``GemmConfig`` for one tile configuration (static persistent scheduling, QuACK's SM90 default)."""
    from quack.gemm_config import GemmConfig

    return GemmConfig(tile_m=tile_m, tile_n=tile_n, pingpong=pingpong, cluster_m=cluster_m, cluster_n=cluster_n,
                      is_dynamic_persistent=False)


@functools.cache
def _quack_config(name: str) -> Any:
    return quack_gemm_config(*QUACK_CONFIGS[name])


@torch.library.custom_op("chitu::quack_gemm", mutates_args=())
def _quack_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
                gate: torch.Tensor | None, prev: torch.Tensor | None, epilogue: str, config: str) -> torch.Tensor:
    """``epilogue(x @ weight.T, ...)`` by QuACK with the named tile configuration; x is [M, K], weight [N, K] (a
    column slice of a wider weight is fine), residual and prev [M, N], bias and gate [N]."""
    operands: dict[str, torch.Tensor] = {}
    if bias is not None:
        operands["bias"] = bias.view(1, -1)
    if gate is not None:
        operands["gate"] = gate.reshape(1, -1)
    if prev is not None:
        operands["prev"] = prev  # a full tile operand, [M, N] like x's M and the output's N
    out = quack_epilogues()[epilogue](x, weight.t(), residual, config=_quack_config(config), tuned=False, **operands)
    return out["D"]


@_quack_gemm.register_fake
def _(x, weight, bias, residual, gate, prev, epilogue, config):
    return x.new_empty((x.shape[0], weight.shape[0]))


# -- the entry points ----------------------------------------------------------------------------------------
def _choice(linear: torch.nn.Linear) -> str | GemmRecorder | None:
    return getattr(linear, "chitu_gemm", None)


def _cublas(x: torch.Tensor, linear: torch.nn.Linear, epilogue: Epilogue) -> torch.Tensor:
    if epilogue == "bias_gelu":
        if x.is_cuda and linear.bias is not None and x.dtype == linear.weight.dtype:
            flat = torch._addmm_activation(linear.bias, x.reshape(-1, x.shape[-1]), linear.weight.t(), use_gelu=True)
            return flat.view(*x.shape[:-1], flat.shape[-1])
        return F.gelu(F.linear(x, linear.weight, linear.bias), approximate="tanh")
    return F.linear(x, linear.weight, linear.bias)


def _routed(x: torch.Tensor, linear: torch.nn.Linear, epilogue: Epilogue, residual: torch.Tensor | None = None,
            gate: torch.Tensor | None = None) -> torch.Tensor | None:
    """The QuACK output when ``linear`` is routed there (None: the caller computes with cuBLAS)."""
    choice = _choice(linear)
    if isinstance(choice, GemmRecorder):
        choice.record(linear, x, epilogue)
        return None
    if choice is None or not x.is_cuda or x.dtype != linear.weight.dtype or (
            residual is not None and residual.dtype != x.dtype):
        return None  # QuACK runs one 16-bit dtype end to end; anything else stays on cuBLAS
    flat = x.reshape(-1, x.shape[-1])
    res = None if residual is None else residual.reshape(flat.shape[0], -1)
    out = torch.ops.chitu.quack_gemm(flat, linear.weight, linear.bias, res, gate, None, epilogue, choice)
    return out.view(*x.shape[:-1], out.shape[-1])


def linear_gelu_tanh(x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    """``gelu(linear(x), approximate="tanh")``: QuACK when the layer is routed there, else one cuBLASLt GEMM with
    the bias and the GELU in its epilogue on CUDA (one rounding of the float32 accumulator instead of two);
    elsewhere the plain ops (the CPU's fused kernel computes the erf GELU, which is not this function)."""
    out = _routed(x, linear, "bias_gelu")
    return _cublas(x, linear, "bias_gelu") if out is None else out


def linear_gated_residual(x: torch.Tensor, linear: torch.nn.Linear, residual: torch.Tensor,
                          gate: torch.Tensor) -> torch.Tensor:
    """``residual + gate * linear(x)`` in float32, rounded to the residual's dtype (a feed-forward's output and the
    block's gated residual): QuACK computes it in the GEMM's epilogue when the layer is routed there and the batch is
    one (the gate is one row)."""
    if gate.numel() == linear.out_features:
        out = _routed(x, linear, "gated_residual", residual, gate.float())
        if out is not None:
            return out
    return (residual.float() + F.linear(x, linear.weight, linear.bias).float() * gate).type_as(residual)


def linear_of_concat(linear: torch.nn.Linear, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``linear(torch.cat(parts, -1))`` without the concatenation: one GEMM per part on the matching columns of the
    weight (views, no copy), each accumulated into the output in place (the first adds the bias). An opaque custom
    op (``chitu::linear_of_concat``): written as out-of-place ``addmm(out, ...)`` calls, every accumulation first
    copied the whole output into a new buffer (a 28 MB device-to-device copy per Flux single-stream block, 0.5 ms a
    forward on an H200), also inside compiled blocks, where an in-place accumulation is turned back into that."""
    widths = [part.shape[-1] for part in parts]
    if not parts or sum(widths) != linear.weight.shape[1]:
        raise ValueError(f"parts of widths {widths} do not cover the {linear.weight.shape[1]} input features of "
                         f"{linear}")
    out = torch.ops.chitu.linear_of_concat(list(parts), linear.weight, linear.bias)
    return out.view(*parts[0].shape[:-1], out.shape[-1])


@torch.library.custom_op("chitu::linear_of_concat", mutates_args=())
def _linear_of_concat_op(parts: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out, offset = None, 0
    for part in parts:
        k = part.shape[-1]
        cols = weight[:, offset:offset + k].t()
        flat = part.reshape(-1, k)
        if out is None:
            out = flat @ cols if bias is None else torch.addmm(bias, flat, cols)
        else:
            out.addmm_(flat, cols)  # cuBLAS accumulates into the output (beta = 1): no copy of it first
        offset += k
    return out


@_linear_of_concat_op.register_fake
def _(parts, weight, bias):
    return parts[0].new_empty((parts[0].numel() // parts[0].shape[-1], weight.shape[0]))


def linear_of_concat_gated_residual(linear: torch.nn.Linear, parts: tuple[torch.Tensor, torch.Tensor],
                                    residual: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``residual + gate * linear(cat(parts, -1))`` in float32, rounded to the residual's dtype (Flux's single-stream
    output projection over [attention; MLP] and its gated residual). On cuBLAS: ``linear_of_concat`` and the
    residual as a pointwise op. Routed to QuACK (batch 1): the first part's GEMM on cuBLAS, the second (the MLP's,
    K=12288) by QuACK with the first's output, the gate and the residual in its epilogue: no pass of its own over the
    projection and the residual stream."""
    first, last = parts
    choice = _choice(linear)
    if gate.numel() == linear.out_features and first.shape[-1] + last.shape[-1] == linear.in_features:
        m, k1 = first.numel() // first.shape[-1], first.shape[-1]
        if isinstance(choice, GemmRecorder):
            choice.record_shape(linear, GemmShape(m, last.shape[-1], linear.out_features, "split_gated_residual",
                                                  last.dtype))
        elif (isinstance(choice, str) and last.is_cuda and last.dtype == first.dtype == residual.dtype
              == linear.weight.dtype and linear.bias is not None):
            return _split_quack(linear, first.reshape(m, k1), last.reshape(m, -1), residual.reshape(m, -1),
                                gate.float(), choice).view(residual.shape)
    return (residual.float() + linear_of_concat(linear, parts).float() * gate).type_as(residual)


def _split_quack(linear: torch.nn.Linear, first: torch.Tensor, last: torch.Tensor, residual: torch.Tensor,
                 gate: torch.Tensor, config: str) -> torch.Tensor:
    k1 = first.shape[-1]
    prev = torch.addmm(linear.bias, first, linear.weight[:, :k1].t())
    return torch.ops.chitu.quack_gemm(last, linear.weight[:, k1:], None, residual, gate, prev,
                                      "split_gated_residual", config)


def feed_forward_residual(ff: torch.nn.Module, x: torch.Tensor, residual: torch.Tensor,
                          gate: torch.Tensor) -> torch.Tensor:
    """``residual + gate * ff(x)`` in float32, rounded to the residual's dtype, for diffusers' ``FeedForward``
    (``net``: activation projection, dropout(s), output Linear): the output Linear and the residual through
    ``linear_gated_residual`` (one QuACK GEMM where routed). Other modules: their forward, then the residual."""
    net = getattr(ff, "net", None)
    if net is None or not isinstance(net[-1], torch.nn.Linear):
        return (residual.float() + ff(x).float() * gate).type_as(residual)
    hidden = x
    for module in net[:-1]:
        hidden = module(hidden)
    return linear_gated_residual(hidden, net[-1], residual, gate)


def _linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    out = _routed(x, self, "bias")
    return F.linear(x, self.weight, self.bias) if out is None else out


_linear_forward.chitu_block_forward = True  # type: ignore[attr-defined]  # removed by remove_block_forwards


# -- candidates, recording, selection ----------------------------------------------------------------------------
def candidate_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The linear layers of the repeated blocks a QuACK GEMM can take: with a bias, 16-bit, K and N multiples of 8
    (16-byte rows for its TMA loads and stores)."""
    from services.runtime import repeated_blocks

    try:
        blocks = repeated_blocks(model)
    except ValueError:  # a model without declared repeated blocks: nothing is routed
        return []
    seen: dict[int, torch.nn.Linear] = {}
    for block in blocks:
        for module in block.modules():
            if (isinstance(module, torch.nn.Linear) and module.bias is not None
                    and module.weight.dtype in (torch.bfloat16, torch.float16)
                    and module.in_features % 8 == 0 and module.out_features % 8 == 0):
                seen.setdefault(id(module), module)
    return list(seen.values())


def route_linear(linear: torch.nn.Linear, choice: str | GemmRecorder | None) -> None:
    """Send ``linear`` to a QuACK configuration (its name), to a recorder, or back to cuBLAS (None)."""
    if choice is None:
        vars(linear).pop("chitu_gemm", None)
        if getattr(vars(linear).get("forward"), "__func__", None) is _linear_forward:
            del linear.forward
        return
    linear.chitu_gemm = choice
    if "forward" not in vars(linear):
        linear.forward = types.MethodType(_linear_forward, linear)


def start_recording(model: torch.nn.Module) -> GemmRecorder:
    """Route every candidate layer of ``model`` through a new recorder (run one forward, then ``select_gemms``)."""
    recorder = GemmRecorder()
    recorder.candidates = candidate_linears(model)
    for linear in recorder.candidates:
        route_linear(linear, recorder)
    return recorder


def routes(model: torch.nn.Module) -> list[tuple[torch.nn.Linear, str]]:
    """The layers of ``model`` routed to QuACK, with their configurations."""
    return [(m, m.chitu_gemm) for m in model.modules()
            if isinstance(m, torch.nn.Linear) and isinstance(getattr(m, "chitu_gemm", None), str)]


def clear_routes(model: torch.nn.Module) -> None:
    """Every layer back to cuBLAS (the Linear's own forward)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            route_linear(module, None)


@dataclasses.dataclass
class GemmChoice:
    shape: GemmShape
    layers: int
    choice: str
    timings_us: dict[str, float]
    notes: dict[str, str]

    def describe(self) -> str:
        times = " ".join(f"{k}={v:.0f}" for k, v in self.timings_us.items())
        notes = "".join(f" [{k}: {v}]" for k, v in self.notes.items())
        return f"{self.shape.describe()} x{self.layers} -> {self.choice}" + (f" (us: {times})" if times else "") + notes


@dataclasses.dataclass
class GemmSelection:
    backend: str
    choices: list[GemmChoice]
    unavailable: str | None = None
    seconds: float = 0.0
    """Start-up time the selection took (QuACK's kernel compilation and the timing)."""

    def metadata(self) -> dict[str, str]:
        routed = sum(c.layers for c in self.choices if c.choice != CUBLAS)
        facts = {"gemm_backend": self.backend, "gemm_quack_layers": str(routed),
                 "gemm_choices": "; ".join(c.describe() for c in self.choices),
                 "gemm_select_seconds": f"{self.seconds:.2f}"}
        if self.unavailable:
            facts["gemm_quack_unavailable"] = self.unavailable
        return facts


def _inputs(shape: GemmShape, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(shape.m, shape.k, generator=gen, device=device).to(shape.dtype)
    residual = torch.randn(shape.m, shape.n, generator=gen, device=device).to(shape.dtype)
    gate = torch.randn(1, shape.n, generator=gen, device=device) * 0.1
    return x, residual, gate


def _time_us(fn: Callable[[], object], device: torch.device) -> float:
    from services.attention.autotune import _timer

    timer = _timer(device)
    fn()
    fn()
    return statistics.median(timer(fn) for _ in range(TIMED_CALLS)) * 1000.0


def select_gemms(backend: str, recorder: GemmRecorder, device: torch.device, min_gain: float) -> GemmSelection:
    """Route each recorded layer shape to the fastest kernel on ``device`` (``auto``), to QuACK's fastest
    configuration (``quack``, at any row count; an error when QuACK cannot run here; a shape no configuration runs
    stays on cuBLAS, noted) or to cuBLAS (``cublas``); returns the report."""
    from services.config import ConfigError

    t0 = time.perf_counter()
    layers = recorder.layers
    for linear in recorder.candidates:  # off the recorder; the chosen ones are routed again below
        route_linear(linear, None)
    reason = quack_unavailable_reason(device) if backend != CUBLAS else "runtime.gemm_backend is cublas"
    if backend == "quack" and reason is not None:
        raise ConfigError(f"runtime.gemm_backend=quack: {reason}; use auto or cublas")
    choices: list[GemmChoice] = []
    for shape, mods in sorted(layers.items(), key=lambda kv: (kv[0].epilogue, kv[0].m, kv[0].k, kv[0].n)):
        if reason is not None or (shape.m < MIN_ROWS and backend != "quack"):
            note = {"why": "fewer rows than MIN_ROWS"} if reason is None else {}
            choices.append(GemmChoice(shape, len(mods), CUBLAS, {}, note))
            continue
        choices.append(_measure(shape, mods, device, min_gain, force_quack=backend == "quack"))
    selection = GemmSelection(backend, choices, reason if backend != CUBLAS else None,
                              seconds=time.perf_counter() - t0)
    log.info("gemm_selection", **selection.metadata())
    return selection


def _gated_residual(residual: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return (residual.float() + y.float() * gate).to(residual.dtype)


def residual_pass(device: torch.device) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The gated residual after a cuBLAS GEMM as the compiled blocks run it: one kernel inductor generates (eager
    float32 ops would make three passes and flatter QuACK's fused epilogue)."""
    return torch.compile(_gated_residual, dynamic=False) if device.type == "cuda" else _gated_residual


def _contenders(shape: GemmShape, linear: torch.nn.Linear, device: torch.device
                ) -> tuple[Callable[[], torch.Tensor], Callable[[str], torch.Tensor]]:
    """(cuBLAS as the compiled blocks run the layer, QuACK with a named configuration) on random inputs of ``shape``
    and the layer's own weights."""
    x, residual, gate = _inputs(shape, device)
    epi = shape.epilogue
    if epi == "split_gated_residual":  # x is the MLP part; the attention part comes first in the weight's columns
        k1 = linear.in_features - shape.k
        first = torch.randn(shape.m, k1, generator=torch.Generator(device).manual_seed(1), device=device
                            ).to(shape.dtype)
        add_residual = residual_pass(device)

        def cublas() -> torch.Tensor:
            return add_residual(residual, linear_of_concat(linear, (first, x)), gate)

        def quack(name: str) -> torch.Tensor:
            return _split_quack(linear, first, x, residual, gate, name)

        return cublas, quack
    if epi == "gated_residual":
        add_residual = residual_pass(device)

        def cublas() -> torch.Tensor:
            return add_residual(residual, F.linear(x, linear.weight, linear.bias), gate)

        def quack(name: str) -> torch.Tensor:
            return _quack_gemm(x, linear.weight, linear.bias, residual, gate, None, epi, name)

        return cublas, quack

    def plain() -> torch.Tensor:
        return _cublas(x, linear, epi)

    def quack_plain(name: str) -> torch.Tensor:
        return _quack_gemm(x, linear.weight, linear.bias, None, None, None, epi, name)

    return plain, quack_plain


def _measure(shape: GemmShape, mods: list[torch.nn.Linear], device: torch.device, min_gain: float,
             force_quack: bool) -> GemmChoice:
    linear = mods[0]
    cublas, quack = _contenders(shape, linear, device)
    with torch.no_grad():
        ref = cublas().float()
        timings = {CUBLAS: _time_us(cublas, device)}
        notes: dict[str, str] = {}
        for name in QUACK_CONFIGS:
            try:
                out = quack(name).float()
                diff = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                if not diff <= MAX_REL_DIFF:
                    notes[name] = f"rel diff {diff:.1e} > {MAX_REL_DIFF}"
                    continue
                timings[name] = _time_us(lambda name=name: quack(name), device)
            except Exception as exc:  # noqa: BLE001 - a configuration this shape cannot take is skipped, noted
                notes[name] = f"{type(exc).__name__}: {str(exc)[:80]}"
    quack_times = {k: v for k, v in timings.items() if k != CUBLAS}
    choice = CUBLAS
    if quack_times:
        best = min(quack_times, key=quack_times.__getitem__)
        if force_quack or quack_times[best] * (1.0 + min_gain) < timings[CUBLAS]:
            choice = best
    for layer in mods:
        route_linear(layer, None if choice == CUBLAS else choice)
    return GemmChoice(shape, len(mods), choice, timings, notes)
