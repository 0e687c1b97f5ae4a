"""The worker's attention kernels: a configured backend name, or ``auto`` (see ``autotune``), per call kind."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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
    """``auto``, ``config`` or ``auto without recorded shapes``."""
    report: AutoReport | None = None
    notes: list[str] = field(default_factory=list)

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
        report = auto_select(shapes, device, allow_lossy=runtime.allow_lossy,
                             exact_max_rel_error=runtime.exact_max_rel_error,
                             lossy_max_rel_error=runtime.lossy_max_rel_error, min_gain=runtime.auto_min_gain,
                             needs_lse=needs_lse)
        by_name = {b.name: b for b in all_backends()}
        sel = KernelSelection({k: by_name[n] for k, n in report.choice.items()}, "auto", report=report)
    log.info("attention_kernels", **sel.metadata())
    return sel
