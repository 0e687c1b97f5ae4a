"""``auto`` backend selection: time the eligible kernels on the model's real attention shapes, on this device.

1. ``ShapeRecorder`` is an ``AttentionOps`` that records every call (kind, q/k shapes, dtype, mask) while the
   warm-up forward runs, computing with PyTorch's SDPA meanwhile.
2. ``measure`` runs every usable backend on fresh random inputs of each recorded shape: the median time per call
   (CUDA events; wall clock on the CPU) and the relative error ``||out - ref|| / ||ref||`` against the float32 math
   kernel on a spread of query rows (rows are independent, so a subset checks the whole kernel at any length).
3. ``choose`` picks, per call kind (``joint``, ``cross``), the fastest backend whose error is under the exact bound;
   lossy kernels (8-bit) are candidates only when ``allow_lossy`` is set, under their own bound. Backends earlier in
   the preference order (``BackendName``) win ties within ``min_gain``, so noise cannot flip the choice.

The report (choice, per-backend timings and errors, lossy kernels listed separately) is logged and goes into the
denoiser's info metadata.
"""

from __future__ import annotations

import collections
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from services.attention import AttentionOps, sdpa_attention
from services.attention.backends import AttentionSpec, Backend, BackendName, get_backend, usable_backends

Kind = Literal["joint", "cross"]
KINDS: tuple[Kind, Kind] = ("joint", "cross")


@dataclass(frozen=True)
class CallShape:
    """One distinct attention call of a forward."""

    kind: Kind
    q: tuple[int, ...]
    k: tuple[int, ...]
    dtype: torch.dtype
    has_mask: bool

    def describe(self) -> str:
        b, sq, h, d = self.q
        return f"{self.kind} B={b} Sq={sq} Sk={self.k[1]} H={h} D={d}{' masked' if self.has_mask else ''}"


class ShapeRecorder:
    """Records the attention calls of forwards run with ``ops()``; computes with torch SDPA."""

    def __init__(self) -> None:
        self.calls: collections.Counter[CallShape] = collections.Counter()

    def _fn(self, kind: Kind):
        def record(q, k, v, key_mask=None):
            self.calls[CallShape(kind, tuple(q.shape), tuple(k.shape), q.dtype, key_mask is not None)] += 1
            return sdpa_attention(q, k, v, key_mask)

        return record

    def ops(self) -> AttentionOps:
        return AttentionOps(joint=self._fn("joint"), cross=self._fn("cross"))


@dataclass
class Measurement:
    """One backend on one kind of call (all its recorded shapes)."""

    kind: Kind
    backend: BackendName
    lossy: bool
    ms_per_forward: float = float("nan")
    """Sum over the kind's shapes of calls per forward x median ms per call."""
    rel_err: float = float("nan")
    """Worst relative error over the shapes, against the float32 math kernel."""
    status: str = "ok"
    """``ok``, ``unusable: <why>``, ``failed: <error>`` or ``slow: ...`` (stopped after one call)."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class AutoReport:
    choice: dict[Kind, BackendName]
    measurements: list[Measurement]
    shapes: dict[CallShape, int]
    exact_max_rel_error: float
    lossy_max_rel_error: float
    allow_lossy: bool
    seconds: float = 0.0
    device_name: str = ""
    notes: list[str] = field(default_factory=list)

    def rows(self, kind: Kind, lossy: bool) -> list[Measurement]:
        return [m for m in self.measurements if m.kind == kind and m.lossy == lossy]

    def metadata(self) -> dict[str, str]:
        """Flat strings for the info RPC's metadata map."""
        out = {"attention_auto_device": self.device_name,
               "attention_auto_bounds": f"exact rel err <= {self.exact_max_rel_error:g}; lossy <= "
                                        f"{self.lossy_max_rel_error:g} (allow_lossy={str(self.allow_lossy).lower()})"}
        for kind in self.choice:
            out[f"attention_{kind}_backend"] = self.choice[kind].value
            out[f"attention_{kind}_timings"] = _fmt(self.rows(kind, False))
            lossy = self.rows(kind, True)
            if lossy:
                out[f"attention_{kind}_lossy_timings"] = _fmt(lossy)
        out["attention_shapes"] = "; ".join(f"{s.describe()} x{n}" for s, n in self.shapes.items())
        return out


def _fmt(rows: list[Measurement]) -> str:
    parts = []
    for m in rows:
        if m.ok:
            parts.append(f"{m.backend.value}={m.ms_per_forward:.2f}ms err={m.rel_err:.1e}")
        else:
            parts.append(f"{m.backend.value}={m.status}")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------------------------------


HOST_COVER_CYCLES = 2_000_000
"""GPU clock cycles (~1 ms) of ``torch.cuda._sleep`` queued before each timed call: the host queues the call's
kernels while the device sleeps, so the events time the kernels, not the host work of a Python-level launcher.
Measured on an H200 (FlashAttention-4 at Flux's 4608 x 24 x 128): 0.73 ms a call timed from an idle device, 0.46 ms
of kernel; inside a model's forward the host runs ahead of the device and that overhead is hidden."""


def _timer(device: torch.device, cover_cycles: int = HOST_COVER_CYCLES) -> Callable[[Callable[[], object]], float]:
    """Milliseconds of device time one call takes (device events on CUDA, the host's launch work covered by
    ``cover_cycles`` of queued sleep: see HOST_COVER_CYCLES); wall time on the CPU."""
    if device.type == "cuda":
        def cuda_ms(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(cover_cycles)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

        return cuda_ms

    def cpu_ms(fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000.0

    return cpu_ms


def _inputs(shape: CallShape, device: torch.device, seed: int):
    gen = torch.Generator(device).manual_seed(seed)
    q = torch.randn(shape.q, generator=gen, device=device, dtype=shape.dtype)
    k = torch.randn(shape.k, generator=gen, device=device, dtype=shape.dtype)
    v = torch.randn(shape.k, generator=gen, device=device, dtype=shape.dtype)
    mask = None
    if shape.has_mask:
        mask = torch.rand(shape.k[:2], generator=gen, device=device) < 0.7
        mask[:, 0] = True  # every row keeps at least one key
    return q, k, v, mask


REFERENCE_ROWS = 256
"""Query rows checked against the float32 math kernel."""


def rel_error(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> float:
    """``||out - ref|| / ||ref||`` on up to REFERENCE_ROWS query rows spread over the sequence."""
    from services.attention.backends import _sdpa_math

    rows = torch.linspace(0, q.shape[1] - 1, min(q.shape[1], REFERENCE_ROWS), device=q.device).round().long()
    ref = _sdpa_math(q.float()[:, rows], k.float(), v.float(), mask, False).double()
    got = out[:, rows].double()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def measure(shapes: dict[CallShape, int], device: torch.device, reps: int = 10, warmup_ms: float = 200.0,
            slow_factor: float = 3.0, seed: int = 0, needs_lse: bool = False) -> list[Measurement]:
    """Time and check every usable backend on every kind's shapes (see module doc). ``needs_lse``: only kernels
    that return the log-sum-exp (ring attention) are usable for joint attention.

    Per shape: each backend is checked against the math kernel and timed once (a backend ``slow_factor`` times
    slower than the best so far stops there); the device is then kept busy for ``warmup_ms`` (clocks ramp up from
    idle) and the remaining backends are timed ``reps`` times in turns, so clock drift hits them all alike."""
    timer = _timer(device)
    out: list[Measurement] = []
    for kind in KINDS:
        kind_shapes = {s: n for s, n in shapes.items() if s.kind == kind}
        if not kind_shapes:
            continue
        first = next(iter(kind_shapes))
        spec = AttentionSpec.for_device(device, first.dtype, first.q[-1], any(s.has_mask for s in kind_shapes),
                                        needs_lse and kind == "joint")
        usable = {b.name for b in usable_backends(spec)}
        rows: dict[BackendName, tuple[Backend, Measurement]] = {}
        for backend in _all():
            m = Measurement(kind, backend.name, backend.constraints.lossy, ms_per_forward=0.0, rel_err=0.0)
            out.append(m)
            if backend.name not in usable:
                m.status = "unusable: " + "; ".join(backend.constraints.violations(spec))
            else:
                rows[backend.name] = (backend, m)
        for i, (shape, count) in enumerate(kind_shapes.items()):
            q, k, v, mask = _inputs(shape, device, seed + i)
            live = [(b, m) for b, m in rows.values() if m.ok]
            best = float("inf")
            for backend, m in live:
                try:
                    m.rel_err = max(m.rel_err, rel_error(backend.fn(q, k, v, mask), q, k, v, mask))
                    first_ms = timer(lambda: backend.fn(q, k, v, mask))  # noqa: B023 - called immediately
                except Exception as exc:  # noqa: BLE001 - a kernel that fails here is reported and not chosen
                    m.status = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    continue
                if count * first_ms > slow_factor * best:
                    m.status = f"slow: {count * first_ms:.2f}ms on the first call, > {slow_factor:g}x the best"
                elif not m.lossy:
                    best = min(best, count * first_ms)
            live = [(b, m) for b, m in live if m.ok]
            if not live:
                continue
            spent = 0.0 if device.type == "cuda" else warmup_ms
            while spent < warmup_ms:  # bring the clocks up before the timed turns
                spent += timer(lambda: live[0][0].fn(q, k, v, mask))  # noqa: B023
            times: dict[BackendName, list[float]] = {b.name: [] for b, _ in live}
            for _ in range(reps):
                for backend, _m in live:
                    times[backend.name].append(timer(lambda: backend.fn(q, k, v, mask)))  # noqa: B023
            for backend, m in live:
                m.ms_per_forward += count * statistics.median(times[backend.name])
    for m in out:
        if not m.ok:
            m.ms_per_forward = m.rel_err = float("nan")
    return out


def _all() -> list[Backend]:
    from services.attention.backends import all_backends

    return all_backends()


def choose(measurements: list[Measurement], kind: Kind, *, allow_lossy: bool, exact_max_rel_error: float,
           lossy_max_rel_error: float, min_gain: float = 0.03) -> BackendName:
    """The backend for ``kind``: the fastest within its error bound; a backend earlier in the preference order
    wins unless a later one is more than ``min_gain`` faster. Raises ValueError if none qualifies."""
    def qualifies(m: Measurement) -> bool:
        if m.kind != kind or not m.ok:
            return False
        if m.lossy:
            return allow_lossy and m.rel_err <= lossy_max_rel_error
        return m.rel_err <= exact_max_rel_error

    candidates = [m for m in measurements if qualifies(m)]
    if not candidates:
        raise ValueError(f"no attention backend met the error bound for {kind} attention: "
                         f"{_fmt([m for m in measurements if m.kind == kind])}")
    order = list(BackendName)
    candidates.sort(key=lambda m: order.index(m.backend))
    fastest = min(m.ms_per_forward for m in candidates)
    return next(m.backend for m in candidates if m.ms_per_forward <= fastest * (1 + min_gain))


def auto_select(shapes: dict[CallShape, int], device: torch.device, *, allow_lossy: bool, exact_max_rel_error: float,
                lossy_max_rel_error: float, min_gain: float = 0.03, reps: int = 10,
                needs_lse: bool = False) -> AutoReport:
    t0 = time.perf_counter()
    measurements = measure(shapes, device, reps=reps, needs_lse=needs_lse)
    kinds = [k for k in KINDS if any(s.kind == k for s in shapes)]
    choice = {k: choose(measurements, k, allow_lossy=allow_lossy, exact_max_rel_error=exact_max_rel_error,
                        lossy_max_rel_error=lossy_max_rel_error, min_gain=min_gain) for k in kinds}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return AutoReport(choice=choice, measurements=measurements, shapes=dict(shapes),
                      exact_max_rel_error=exact_max_rel_error, lossy_max_rel_error=lossy_max_rel_error,
                      allow_lossy=allow_lossy, seconds=time.perf_counter() - t0, device_name=name)


def resolve_fixed(name: str, shapes: dict[CallShape, int], device: torch.device,
                  needs_lse: bool = False) -> dict[Kind, Backend]:
    """A configured (non-auto) backend checked against every recorded call kind."""
    out: dict[Kind, Backend] = {}
    for kind in KINDS:
        kind_shapes = [s for s in shapes if s.kind == kind]
        if kind_shapes:
            s = kind_shapes[0]
            spec = AttentionSpec.for_device(device, s.dtype, s.q[-1], any(x.has_mask for x in kind_shapes),
                                            needs_lse and kind == "joint")
            out[kind] = get_backend(name, spec)
    return out
