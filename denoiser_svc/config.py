"""Configuration of a denoiser group."""

from __future__ import annotations

import dataclasses
from typing import Literal

from services.config import ConfigError, ModelConfig, ServerConfig
from services.runtime import RuntimeConfig

DistBackend = Literal["auto", "nccl", "gloo"]


@dataclasses.dataclass
class ParallelConfig:
    """How the denoiser group splits work across ranks (world size = cfg_degree * ring_degree * ulysses_degree).

    The rank layout and its process groups are built in ``denoiser_svc.parallel.groups``. Checks that need the
    model (heads divisible by ``ulysses_degree``, true CFG for ``cfg_degree=2``, a sequence-parallel plan for the
    family) run when the group loads the checkpoint, before any worker process starts.
    """

    cfg_degree: int = 1
    """1, or 2 to run the conditional and unconditional CFG branches on different ranks (true-CFG families)."""
    ulysses_degree: int = 1
    """Ranks that re-shard attention heads <-> sequence with all-to-all (must divide the model's head count)."""
    ring_degree: int = 1
    """Ranks that pass K/V around a ring and merge partial attention by log-sum-exp (any head count)."""
    ulysses_chunks: int = 1
    """Split the heads into this many groups whose Ulysses all-to-alls overlap the attention of the previous group
    (1: one exchange each way, nothing overlapped). ``ulysses_degree * ulysses_chunks`` must divide the heads; the
    result does not depend on it."""
    trace_collectives: bool = True
    """Run the Ulysses all-to-alls as functional collectives that ``torch.compile`` traces into the compiled blocks
    (one graph per block, no graph break at attention; see ``denoiser_svc.parallel.attention``). Off keeps every
    collective outside the compiled graphs. Ring and USP layouts always keep theirs outside."""
    backend: DistBackend = "auto"
    """Collective backend of the compute groups: ``nccl`` on CUDA, ``gloo`` on CPU; ``auto`` picks by device."""
    master_addr: str = "127.0.0.1"
    """Rendezvous address when ``chitu serve denoiser`` launches the ranks itself (under torchrun, torchrun's
    MASTER_ADDR/MASTER_PORT are used instead)."""
    master_port: int = 0
    """Rendezvous port when the group launches itself; 0 picks a free port."""
    start_timeout_seconds: float = 600.0
    """How long ranks may take to join the group (process start, model load and warm-up are separate)."""
    heartbeat_seconds: float = 1.0
    """Interval of the rank liveness heartbeat (through the rendezvous store)."""
    heartbeat_timeout_seconds: float = 30.0
    """A rank whose heartbeat has not advanced for this long is declared dead: the group fails its requests with
    UNAVAILABLE, reports NOT_SERVING and exits non-zero. Ranks this process launched are watched directly too."""
    failure_linger_seconds: float = 2.0
    """After a rank failed: how long rank 0 keeps reporting NOT_SERVING (so readiness probes and the orchestrator
    see it) before it exits non-zero."""
    destroy_timeout_seconds: float = 5.0
    """At shutdown, how long a rank waits for ``destroy_process_group``; past it the rank leaves without it (measured
    on 2x H200: after CUDA-graph replays with NCCL inside, the destroy never returned, and the pod would have waited
    out its grace period). Rank 0 waits for its workers' exit, then for its own destroy: at most twice this after the
    drain, inside the 15 s the Helm chart adds to the drain grace."""

    @property
    def world_size(self) -> int:
        return self.cfg_degree * self.ring_degree * self.ulysses_degree

    @property
    def sp_degree(self) -> int:
        """Sequence-parallel degree (ring x Ulysses)."""
        return self.ring_degree * self.ulysses_degree

    def describe(self) -> str:
        return f"cfg{self.cfg_degree}-ring{self.ring_degree}-ulysses{self.ulysses_degree}"

    def validate(self) -> None:
        if self.cfg_degree not in (1, 2):
            raise ConfigError(f"parallel.cfg_degree must be 1 or 2 (the two CFG branches), got {self.cfg_degree}")
        for name in ("ulysses_degree", "ring_degree", "ulysses_chunks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.master_port < 65536:
            raise ConfigError(f"parallel.master_port must be in [0, 65535], got {self.master_port}")
        for name in ("start_timeout_seconds", "heartbeat_seconds", "heartbeat_timeout_seconds",
                     "destroy_timeout_seconds"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"parallel.{name} must be > 0, got {getattr(self, name)}")
        if self.heartbeat_timeout_seconds < 3 * self.heartbeat_seconds:
            raise ConfigError(f"parallel.heartbeat_timeout_seconds={self.heartbeat_timeout_seconds} must be at least "
                              f"3 x heartbeat_seconds={self.heartbeat_seconds}")
        if self.failure_linger_seconds < 0:
            raise ConfigError(f"parallel.failure_linger_seconds must be >= 0, got {self.failure_linger_seconds}")


@dataclasses.dataclass
class EngineConfig:
    """Queueing and step-level scheduling."""

    max_active_requests: int = 1
    """Requests resident on the group at once (each holds latents and state on every rank)."""
    max_queued_requests: int = 64
    """Requests waiting beyond the active ones; more are refused with RESOURCE_EXHAUSTED."""
    policy: Literal["fifo", "round_robin"] = "fifo"
    """Which active request runs the next step: the oldest (lowest latency) or each in turn (fairness)."""
    latent_chunk_bytes: int = 4 * 1024 * 1024
    """Size of each latents chunk streamed back."""

    def validate(self) -> None:
        if self.max_active_requests < 1:
            raise ConfigError(f"engine.max_active_requests must be >= 1, got {self.max_active_requests}")
        if self.max_queued_requests < 0:
            raise ConfigError(f"engine.max_queued_requests must be >= 0, got {self.max_queued_requests}")
        if self.latent_chunk_bytes < 1024:
            raise ConfigError(f"engine.latent_chunk_bytes must be >= 1024, got {self.latent_chunk_bytes}")


@dataclasses.dataclass
class DenoiserServiceConfig:
    """``chitu serve denoiser --config FILE``."""

    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)
    """Listening address (rank 0), message caps, drain time, logging."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """Checkpoint whose transformer and scheduler config are loaded."""
    component: str = "transformer"
    """Which transformer of the checkpoint this group runs (``transformer_2`` for Wan2.2's low-noise expert)."""
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    """Queueing and scheduling."""
    warmup: bool = True
    """Run one small request at start-up (before SERVING) so the first real request pays no lazy initialisation."""
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
    """Attention kernel (or ``auto``), fused projections, regional compilation, CUDA graphs."""
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    """Multi-rank layout (CFG parallel, Ulysses, Ring); the default is a group of one process."""

    def validate(self) -> None:
        for name in ("warmup_sizes", "warmup_cache_strategies"):
            if getattr(self.runtime, name) and not self.warmup:
                raise ConfigError(f"runtime.{name}={getattr(self.runtime, name)} are compiled by the warm-up, which "
                                  f"warmup=false turns off; set warmup: true or leave {name} empty")
        par = self.parallel
        if par.world_size > 1:
            device = self.model.device
            if device.startswith("cuda:"):
                raise ConfigError(f"model.device={device!r} pins one GPU, but parallel asks for {par.world_size} "
                                  f"ranks ({par.describe()}); use 'cuda' or 'auto' (rank r uses its local GPU r)")
            if par.backend == "nccl" and device == "cpu":
                raise ConfigError("parallel.backend='nccl' needs CUDA, but model.device='cpu'; use 'gloo' or 'auto'")
