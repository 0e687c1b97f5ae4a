"""The worker's attention kernels: a configured backend name, or ``auto`` (see ``autotune``), per call kind.

``auto``'s choice is kept in ``runtime.kernel_cache_dir`` (``attention_auto/<key>.json``, when that folder is set and
``runtime.auto_cache`` is on) and reused by a later start whose key matches: the card (name, compute capability),
the software that decides the timings (torch, CUDA, cuDNN and the versions of the kernel packages: Triton,
FlashAttention 2/3/4, SageAttention, the CuTe DSL), the recorded call shapes and auto's settings (bounds, minimum gain,
lossy switch, log-sum-exp need). A restart or a new replica on the same kind of card then skips the timing: on an
H200 it took 25-28 s of a tiny Flux worker's 31-38 s start-up (2026-11-28, ``benchmarks/startup.py``; not profiled:
FlashAttention-4's and SageAttention's first-call compilation of every candidate kernel is the likely part). A cached choice whose backend
cannot run here (a constraint no longer holds) or a file that does not parse is ignored and the timing runs again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from services.attention.autotune import KINDS, AutoReport, CallShape, Kind, auto_select, resolve_fixed
from services.attention.backends import AUTO, Backend, BackendName, all_backends, parse_name
from services.log import get_logger

if TYPE_CHECKING:
    from services.runtime import RuntimeConfig

log = get_logger(__name__)


@dataclass
class KernelSelection:
    """Kernel per call kind; kinds the model never called fall back to torch SDPA (PyTorch's choice)."""

    kernels: dict[Kind, Backend]
    source: str
    """``auto``, ``auto (cached)``, ``config`` or ``auto without recorded shapes``."""
    report: AutoReport | None = None
    notes: list[str] = field(default_factory=list)
    cached: dict[str, str] = field(default_factory=dict)
    """``auto (cached)``: the metadata of the start that timed the kernels (its timings, bounds, shapes)."""

    def get(self, kind: Kind) -> Backend:
        if kind in self.kernels:
            return self.kernels[kind]
        return next(b for b in all_backends() if b.name == BackendName.SDPA)

    def metadata(self) -> dict[str, str]:
        out = {"attention_source": self.source}
        for kind in KINDS:
            if kind in self.kernels:
                out[f"attention_{kind}_backend"] = self.kernels[kind].name.value
        if self.report is not None:
            out.update(self.report.metadata())
            out["attention_auto_seconds"] = f"{self.report.seconds:.2f}"
        for key, value in self.cached.items():
            out.setdefault(key, value)
        if self.notes:
            out["attention_notes"] = "; ".join(self.notes)
        return out


def select_kernels(runtime: RuntimeConfig, shapes: dict[CallShape, int], device: torch.device,
                   needs_lse: bool = False) -> KernelSelection:
    """Resolve ``runtime.attention_backend`` for the recorded call ``shapes`` on ``device``; BackendError (listing
    the usable backends) when a configured backend cannot run them."""
    name = runtime.attention_backend
    if name != AUTO:
        if not shapes:
            backend = next(b for b in all_backends() if b.name == parse_name(name))
            sel = KernelSelection({k: backend for k in KINDS}, "config",
                                  notes=["no warm-up shapes recorded; constraints not checked against the model"])
        else:
            sel = KernelSelection(resolve_fixed(name, shapes, device, needs_lse), "config")
    elif not shapes:
        sel = KernelSelection({}, "auto without recorded shapes",
                              notes=["auto needs the warm-up forward to record shapes; torch SDPA is used"])
    else:
        path, facts = None, {}
        if runtime.kernel_cache_dir and runtime.auto_cache:
            key, facts = auto_cache_key(runtime, shapes, device, needs_lse)
            path = Path(runtime.kernel_cache_dir) / "attention_auto" / f"{key}.json"
        sel = _load_cached(path, facts, shapes, device, needs_lse) if path is not None else None
        if sel is None:
            report = auto_select(shapes, device, allow_lossy=runtime.allow_lossy,
                                 exact_max_rel_error=runtime.exact_max_rel_error,
                                 lossy_max_rel_error=runtime.lossy_max_rel_error, min_gain=runtime.auto_min_gain,
                                 needs_lse=needs_lse)
            by_name = {b.name: b for b in all_backends()}
            sel = KernelSelection({k: by_name[n] for k, n in report.choice.items()}, "auto", report=report)
            if path is not None:
                _store(path, facts, sel)
    log.info("attention_kernels", **sel.metadata())
    return sel


AUTO_CACHE_FORMAT = 2
KERNEL_PACKAGES = ("triton", "flash-attn-4", "flash-attn", "flash-attn-3", "flash_attn_3", "sageattention",
                   "nvidia-cutlass-dsl")
"""Distributions whose version is part of the cache key (absent ones count as ``None``)."""


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def auto_cache_key(runtime: RuntimeConfig, shapes: dict[CallShape, int], device: torch.device,
                   needs_lse: bool) -> tuple[str, dict[str, Any]]:
    """``(key, facts)``: everything ``auto``'s choice depends on, and its hash (the cache file's name)."""
    cuda = device.type == "cuda"
    facts = {
        "format": AUTO_CACHE_FORMAT,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "capability": list(torch.cuda.get_device_capability(device)) if cuda else [0, 0],
        "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda and torch.backends.cudnn.is_available() else None,
        "packages": {name: _version(name) for name in KERNEL_PACKAGES},
        "shapes": sorted(f"{sh.kind} q={list(sh.q)} k={list(sh.k)} {sh.dtype} mask={sh.has_mask} x{n}"
                         for sh, n in shapes.items()),
        "allow_lossy": runtime.allow_lossy, "exact_max_rel_error": runtime.exact_max_rel_error,
        "lossy_max_rel_error": runtime.lossy_max_rel_error, "auto_min_gain": runtime.auto_min_gain,
        "needs_lse": needs_lse,
    }
    key = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]
    return key, facts


def _load_cached(path: Path, facts: dict[str, Any], shapes: dict[CallShape, int], device: torch.device,
                 needs_lse: bool) -> KernelSelection | None:
    """The selection stored at ``path`` if it was made under ``facts`` and its kernels still run these shapes here."""
    if not path.is_file():
        return None
    t0 = time.perf_counter()
    try:
        data = json.loads(path.read_text())
        if data["facts"] != facts:
            raise ValueError("stored for other facts (hash collision or an edited file)")
        kernels: dict[Kind, Backend] = {}
        for kind, name in data["choice"].items():
            kind_shapes = {sh: n for sh, n in shapes.items() if sh.kind == kind}
            kernels.update(resolve_fixed(name, kind_shapes, device, needs_lse))  # BackendError if it cannot run
        if set(kernels) != {sh.kind for sh in shapes}:
            raise ValueError(f"choice for {sorted(kernels)}, calls of {sorted({sh.kind for sh in shapes})}")
        cached = {str(k): str(v) for k, v in data["report"].items()}  # the measuring start's timings, bounds, shapes
        cached["attention_auto_timed_seconds"] = f"{float(data['seconds']):.2f}"
        cached["attention_auto_seconds"] = f"{time.perf_counter() - t0:.2f}"  # this start's: reading the file
    except Exception as exc:  # noqa: BLE001 - a bad or stale file: time again (and overwrite it)
        log.warning("attention_auto_cache_ignored", path=str(path), reason=f"{type(exc).__name__}: {exc}")
        return None
    return KernelSelection(kernels, "auto (cached)", cached=cached,
                           notes=[f"auto's choice of {data['written']} reused from {path} (timing skipped)"])


def _store(path: Path, facts: dict[str, Any], sel: KernelSelection) -> None:
    """Write ``sel`` for later starts (atomically: replicas may share the folder); a failure only logs."""
    assert sel.report is not None, "only a timed selection is stored"
    data = {"facts": facts, "choice": {k: b.name.value for k, b in sel.kernels.items()},
            "report": sel.report.metadata(), "seconds": sel.report.seconds,
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("attention_auto_cache_not_written", path=str(path), reason=str(exc))
