"""Metrics: process/device memory figures for info RPCs, and a per-process Prometheus registry.

Every service exposes (when ``server.metrics_port`` >= 0) on ``/metrics``:

- ``chitu_rpc_requests_total{method,code}``, ``chitu_rpc_seconds{method}`` (histogram), ``chitu_rpc_in_flight{method}``
  — recorded by the server's interceptor for every RPC;
- ``chitu_queue_depth`` — requests waiting or running in the stage (the autoscaling signal of GPU stages);
- ``chitu_serving`` — 1 while the health service says SERVING;
- ``chitu_process_peak_rss_bytes``, and on CUDA ``chitu_cuda_allocated_bytes`` / ``chitu_cuda_peak_allocated_bytes``
  and, when NVML is available, ``chitu_gpu_utilization_percent``;
- stage-specific series registered by the stage: the denoiser's ``chitu_denoiser_step_seconds`` (histogram) and
  ``chitu_denoiser_steps_compiling_after_warmup`` / ``chitu_denoiser_steps_recording_after_warmup`` (steps that
  compiled or recorded graphs on a request's path: sizes missing from ``runtime.warmup_sizes``).

The registry belongs to the process's ``ServiceHost`` (no module-level default registry).
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable

import torch


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def memory_snapshot() -> dict[str, str]:
    """Peak resident memory of this process and, on CUDA, the peak and current allocated device memory."""
    out = {"peak_rss_bytes": str(peak_rss_bytes())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_allocated_bytes"] = str(torch.cuda.max_memory_allocated())
        out["cuda_allocated_bytes"] = str(torch.cuda.memory_allocated())
        out["cuda_peak_reserved_bytes"] = str(torch.cuda.max_memory_reserved())
    return out


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class ServiceMetrics:
    """The Prometheus series of one service process."""

    def __init__(self, service: str):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"registry": self.registry}
        self.requests = Counter("chitu_rpc_requests", "RPCs finished, by method and status code",
                                ["service", "method", "code"], **labels)
        self.seconds = Histogram("chitu_rpc_seconds", "RPC wall time (until the last streamed message)",
                                 ["service", "method"], buckets=LATENCY_BUCKETS, **labels)
        self.in_flight = Gauge("chitu_rpc_in_flight", "RPCs being served", ["service", "method"], **labels)
        self.queue_depth = Gauge("chitu_queue_depth", "Requests waiting or running in this stage", ["service"],
                                 **labels)
        self.serving = Gauge("chitu_serving", "1 while the health service says SERVING", ["service"], **labels)
        rss = Gauge("chitu_process_peak_rss_bytes", "Peak resident memory of the process", ["service"], **labels)
        rss.labels(service).set_function(peak_rss_bytes)
        self._queue_source: Callable[[], float] | None = None
        self.work_in_flight = 0
        """Work RPCs (not health, reflection or info calls) being served: the default queue depth, since every
        waiting or running request of a stage holds one open RPC."""
        self.queue_depth.labels(service).set_function(self._queue)
        self._device_gauges(labels)
        self._server = None

    def _queue(self) -> float:
        return float(self._queue_source()) if self._queue_source is not None else float(self.work_in_flight)

    @staticmethod
    def is_work(method: str) -> bool:
        """Generation work, as opposed to health checks, reflection and self-description."""
        if method.startswith(("/grpc.health", "/grpc.reflection")):
            return False
        name = method.rsplit("/", 1)[-1]
        return not (name.startswith("Get") or name.startswith("List"))

    def set_queue_depth_source(self, source: Callable[[], float]) -> None:
        """The stage tells how many requests wait or run in it (read at scrape time)."""
        self._queue_source = source

    def _device_gauges(self, labels: dict) -> None:
        from prometheus_client import Gauge

        def cuda(fn: Callable[[], int]) -> Callable[[], float]:
            return lambda: float(fn()) if torch.cuda.is_available() and torch.cuda.is_initialized() else 0.0

        Gauge("chitu_cuda_allocated_bytes", "Device memory allocated by torch", ["service"], **labels).labels(
            self.service).set_function(cuda(torch.cuda.memory_allocated))
        Gauge("chitu_cuda_peak_allocated_bytes", "Peak device memory allocated by torch", ["service"],
              **labels).labels(self.service).set_function(cuda(torch.cuda.max_memory_allocated))
        try:
            import pynvml  # nvidia-ml-py, present on GPU machines only

            pynvml.nvmlInit()
        except Exception:  # noqa: BLE001 - no NVML: no utilisation series
            return

        def utilization() -> float:
            if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
                return 0.0
            handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)

        Gauge("chitu_gpu_utilization_percent", "GPU utilisation reported by NVML", ["service"], **labels).labels(
            self.service).set_function(utilization)

    def histogram(self, name: str, doc: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        """A stage-specific histogram labelled with this service."""
        from prometheus_client import Histogram

        return Histogram(name, doc, ["service"], buckets=buckets, registry=self.registry).labels(self.service)

    def gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """A stage-specific gauge labelled with this service, read from ``read`` at scrape time."""
        from prometheus_client import Gauge

        Gauge(name, doc, ["service"], registry=self.registry).labels(self.service).set_function(read)

    def counter(self, name: str, doc: str):
        """A stage-specific counter labelled with this service."""
        from prometheus_client import Counter

        return Counter(name, doc, ["service"], registry=self.registry).labels(self.service)

    def start_http(self, host: str, port: int) -> int:
        """Serve /metrics; returns the bound port."""
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return server.server_port

    def stop_http(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
