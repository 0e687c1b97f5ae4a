"""Worker: one per device. Owns the device, the loaded transformer and the resident state of every active
request (latents stay here between steps). The contract (vLLM-style): init_device, load_model,
compile_or_warm_up_model, add_request, execute_step, finish_request, abort_request, check_health, shutdown.

In a group of several ranks every rank has a Worker: ``init_device`` joins the group and builds its process groups
(``denoiser_svc.parallel``), ``load_model`` installs the family's sequence-parallel plan, and ``attention_ops``
wraps the kernels in the sequence-parallel attention (Ulysses / Ring / USP)."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import torch

from denoiser_svc.cache import (
    LOCAL_REDUCER,
    CachePolicy,
    FlexCache,
    GroupReducer,
    MetricReducer,
    policy_from_dict,
    validate_for_model,
)
from denoiser_svc.config import DenoiserServiceConfig
from denoiser_svc.parallel.attention import LseFn, SequenceParallelAttention, default_lse_attention, probing_lse
from denoiser_svc.parallel.groups import ParallelGroups
from denoiser_svc.parallel.launch import Rendezvous, init_group, local_device
from denoiser_svc.parallel.sharding import SequenceSharder, check_layout
from denoiser_svc.runner import ModelRunner
from denoiser_svc.types import DenoiseJob, FinishedRequest
from services.attention import LOCAL_SDPA, AttentionOps
from services.attention.backends import Backend
from services.attention.repeated_keys import merge_repeated_keys
from services.attention.selection import KernelSelection, select_kernels
from services.config import ConfigError
from services.errors import FailedPrecondition, InvalidArgument
from services.families.base import DenoiseState, SamplingParams, resolve_device, resolve_dtype
from services.gemm import select_gemms, start_recording
from services.log import get_logger
from services.registry import load_adapter
from services.runtime import (
    CACHE_WARMUP_STEPS,
    CompileWatch,
    denoiser_module,
    fuse_gelu_epilogues,
    fuse_norm_rope,
    fuse_norms,
    fuse_projections,
    graph_breaks,
    parse_size,
    regional_compile,
    use_kernel_cache,
)

log = get_logger(__name__)


@dataclass
class StepHandle:
    """Completion of one launched step. On CUDA the step runs asynchronously between two recorded events and
    ``wait`` blocks on the end event only (no tensor is read); on the CPU the step is done when launched."""

    start: torch.cuda.Event | None = None
    end: torch.cuda.Event | None = None
    cpu_seconds: float = 0.0

    @property
    def done(self) -> bool:
        return self.end is None or self.end.query()

    def wait(self) -> float:
        """Block until the step is done; return its duration (device time between the events on CUDA)."""
        if self.end is None:
            return self.cpu_seconds
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1000.0


class Worker:
    def __init__(self, config: DenoiserServiceConfig, rendezvous: Rendezvous | None = None,
                 groups: ParallelGroups | None = None):
        self.config = config
        use_kernel_cache(config.runtime.kernel_cache_dir)  # before anything imports a kernel library or compiles
        self.rendezvous = rendezvous
        """Where this rank's group meets (None: a group of one process)."""
        self.rank = groups.rank if groups is not None else (rendezvous.rank if rendezvous else 0)
        self.world_size = config.parallel.world_size
        self._joined = groups is not None
        self.groups = groups or ParallelGroups.single()
        """This rank's process groups: given (a test or benchmark that already joined a group), or of size 1 until
        ``init_device`` joins the group of ``config.parallel``."""
        self.sharder: SequenceSharder | None = None
        """The family's sequence-parallel plan on the loaded model (None when the sequence is not sharded)."""
        self.adapter = load_adapter(config.model.checkpoint)
        self.warmup_sizes = self._warmup_sizes()
        """``runtime.warmup_sizes`` as (width, height, frames), checked against the model's limits."""
        self.warmup_strategies = self._warmup_strategies()
        """``runtime.warmup_cache_strategies`` as policies with default settings, checked against the model."""
        self.device = resolve_device(config.model.device)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        self.runner: ModelRunner | None = None
        self.attention_modules = 0
        self.kernels: KernelSelection | None = None
        """Attention kernels per call kind, chosen in ``compile_or_warm_up_model`` (None: torch SDPA)."""
        self.runtime_facts: dict[str, str] = {}
        if config.runtime.kernel_cache_dir:
            self.runtime_facts["kernel_cache_dir"] = os.path.abspath(config.runtime.kernel_cache_dir)
        self.compile_watch: CompileWatch | None = None
        """Set after a compiled warm-up: counts the steps that compiled or recorded graphs on a request's path."""
        self.states: dict[str, DenoiseState] = {}
        self.export_state: set[str] = set()
        """Requests whose scheduler history is handed back at the end (another group continues them)."""

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def init_device(self) -> None:
        if self.world_size > 1 and self.rendezvous is not None:
            self.device = local_device(self.device, self.rendezvous)
        if self.device.type == "cuda":
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        if self.world_size > 1 and self.device.type == "cpu" and not self._joined:
            # the ranks of a CPU group share this machine's cores (oversubscribed threads spin against each other)
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world_size))
        if self.world_size > 1 and not self._joined:
            assert self.rendezvous is not None, "a group of several ranks needs a rendezvous"
            self.groups = init_group(self.config.parallel, self.rendezvous, self.device)
            self._joined = True

    def load_model(self, model: object | None = None) -> None:
        """Load the transformer (or take ``model``, an adapter handle built elsewhere, e.g. real-size random weights
        in a benchmark), fuse its projections, route its attention through ``attention_ops()``."""
        plan = check_layout(self.config.parallel, self.adapter, self.config.component)
        if model is None:
            model = self.adapter.load_denoiser(self.dtype, self.device, self.config.component)
        if plan is not None and self.config.parallel.sp_degree > 1:
            self.sharder = SequenceSharder(plan, self.groups.get_sp_group())
            self.sharder.install(model)
        if self.config.runtime.fuse_qkv:
            self.runtime_facts["fused_attention_modules"] = str(fuse_projections(self.transformer_of(model)))
        if self.config.runtime.fuse_mlp:
            self.runtime_facts["fused_mlp_modules"] = str(fuse_gelu_epilogues(self.transformer_of(model)))
        if self.config.runtime.fuse_norm_rope:
            self.runtime_facts["fused_norm_rope_modules"] = str(fuse_norm_rope(self.transformer_of(model)))
        if self.config.runtime.fuse_norms:
            self.runtime_facts["fused_norm_blocks"] = str(fuse_norms(self.transformer_of(model)))
        if self.config.runtime.merge_repeated_keys:
            self.runtime_facts["merge_repeated_keys"] = "on"
        self.attention_modules = self.adapter.install_attention(model, self.attention_ops())
        cache = FlexCache(self.adapter, model, self.config.component, self.cache_reducer())
        self.runner = ModelRunner(self.adapter, model, self.groups, self.sharder, cache)
        log.info("denoiser_loaded", family=self.adapter.family, component=self.config.component,
                 device=str(self.device), dtype=str(self.dtype), rank=self.rank)

    def cache_reducer(self) -> MetricReducer:
        """How FlexCache sums its metrics over the ranks that share a request: the sequence-parallel and CFG
        groups (identity in a group of one process)."""
        if self.world_size == 1:
            return LOCAL_REDUCER
        sp = self.groups.get_sp_group()
        return GroupReducer([sp, self.groups.get_cfg_group()], shard=(sp.rank, sp.size))

    def transformer_of(self, model: object) -> torch.nn.Module:
        return denoiser_module(model, self.config.component)

    def kernel(self, kind: str) -> Backend | None:
        """The attention kernel chosen for ``kind`` (``joint``/``cross``); ``fn``/``fn_lse`` are what wrappers call."""
        return None if self.kernels is None else self.kernels.get(kind)

    def needs_lse_kernels(self) -> bool:
        """True when joint attention must return the log-sum-exp (ring attention merges partial results). On the
        CPU the registry's only LSE kernel is the float32 math one, so ring attention there uses PyTorch's CPU flash
        kernel (``default_lse_attention``) and the joint kernel choice stays free."""
        return self.config.parallel.ring_degree > 1 and self.device.type == "cuda"

    def parallel_ops(self, base: AttentionOps, lse: LseFn | None = None) -> AttentionOps:
        """``base`` (kernels) wrapped for sequence parallelism: ``joint`` becomes Ulysses / Ring / USP around
        ``base.joint`` (ring blocks use ``lse``, by default the chosen joint kernel's LSE variant when it has one);
        ``cross`` stays local. The identity when the sequence is not sharded."""
        if self.sharder is None:
            return base
        if lse is None:
            joint = self.kernel("joint")
            lse = joint.fn_lse if joint is not None and joint.constraints.supports_lse else default_lse_attention
        parallel = self.config.parallel
        return SequenceParallelAttention(self.groups, base.joint, lse, self.sharder, parallel.trace_collectives,
                                         parallel.ulysses_chunks).ops(base)

    def attention_ops(self) -> AttentionOps:
        """The attention calls this rank's processors make (kernel backend; sequence-parallel wrappers)."""
        base = LOCAL_SDPA if self.kernels is None else AttentionOps(joint=self.kernels.get("joint").fn,
                                                                     cross=self.kernels.get("cross").fn)
        if self.config.runtime.merge_repeated_keys:
            base = dataclasses.replace(base, cross=merge_repeated_keys(base.cross))
        return self.parallel_ops(base)

    def warmup_job(self) -> DenoiseJob | None:
        """A two-step request at the model's default size with synthetic conditioning (None if the family
        cannot synthesise conditioning)."""
        assert self.runner is not None, "load_model first"
        conds = self.adapter.warmup_conditionings(self.runner.model)
        if conds is None:
            return None
        lim = self.adapter.limits()
        params = SamplingParams(width=lim.default_width, height=lim.default_height, steps=2,
                                guidance_scale=lim.default_guidance_scale, seed=0, frames=lim.default_frames)
        return DenoiseJob(request_id="warmup", params=params, conditionings=conds[0], negative_conditionings=conds[1],
                          start_step=0, end_step=2)

    def _warmup_sizes(self) -> list[tuple[int, int, int]]:
        lim = self.adapter.limits()
        sizes = []
        for entry in self.config.runtime.warmup_sizes:
            width, height, frames = parse_size(entry, "runtime.warmup_sizes")
            params = SamplingParams(width=width, height=height, steps=2, guidance_scale=lim.default_guidance_scale,
                                    seed=0, frames=frames)
            try:
                self.adapter.validate_params(params)
            except InvalidArgument as exc:
                raise ConfigError(f"runtime.warmup_sizes: {entry!r} does not fit {self.config.model.checkpoint}: "
                                  f"{exc}") from None
            sizes.append((width, height, frames))
        return sizes

    def _warmup_strategies(self) -> list[CachePolicy]:
        spec = self.adapter.cache_spec(self.config.component)
        policies = []
        for name in dict.fromkeys(self.config.runtime.warmup_cache_strategies):
            try:
                policy = policy_from_dict({"strategy": name})
                validate_for_model(policy, spec, self.adapter.family)
            except InvalidArgument as exc:
                raise ConfigError(f"runtime.warmup_cache_strategies: {exc}") from None
            policies.append(policy)
        return policies

    def size_warmup_jobs(self, job: DenoiseJob) -> list[DenoiseJob]:
        """``job`` (the default warm-up) at each of ``runtime.warmup_sizes`` that differs from its own size."""
        own = (job.params.width, job.params.height, job.params.frames)
        return [dataclasses.replace(job, request_id=f"warmup-{w}x{h}x{f}",
                                    params=dataclasses.replace(job.params, width=w, height=h, frames=f))
                for w, h, f in dict.fromkeys(self.warmup_sizes) if (w, h, f) != own]

    def compile_or_warm_up_model(self, job: DenoiseJob | None) -> None:
        """Choose the attention kernels (``auto``: timed on this device on the shapes of one recorded warm-up step),
        compile the repeated blocks, then run the warm-up request so that the first real request pays nothing."""
        assert self.runner is not None, "load_model first"
        runtime = self.config.runtime
        shapes = {}
        gemm_recorder = None
        if job is not None:
            recorder = self.recording_ops()
            # under sequence parallelism the recorder sits inside the wrapper: it sees the shapes kernels run at
            ops = recorder.ops()
            self.attention_modules = self.adapter.install_attention(
                self.runner.model, self.parallel_ops(ops, lse=probing_lse(ops.joint, default_lse_attention)))
            gemm_recorder = start_recording(self.transformer_of(self.runner.model))
            self.run_job(job, steps=1)
            shapes = dict(recorder.calls)
        self.kernels = select_kernels(runtime, shapes, self.device, needs_lse=self.needs_lse_kernels())
        self.runtime_facts.update(self.kernels.metadata())
        if gemm_recorder is not None:
            gemms = select_gemms(runtime.gemm_backend, gemm_recorder, self.device, runtime.gemm_min_gain)
            self.runtime_facts.update(gemms.metadata())
        self.attention_modules = self.adapter.install_attention(self.runner.model, self.attention_ops())
        if runtime.compile_enabled(self.device):
            counts = regional_compile(self.transformer_of(self.runner.model), runtime, self.device)
            self.runtime_facts["compiled_blocks"] = ",".join(f"{k}x{v}" for k, v in counts.items())
            self.runtime_facts["compile_mode"] = str(runtime.inductor_mode(self.device) or "default")
        if job is not None:
            t0 = time.perf_counter()
            breaks = graph_breaks()
            self.run_job(job)
            self.runtime_facts["warmup_seconds"] = f"{time.perf_counter() - t0:.2f}"
            if runtime.compile_enabled(self.device):  # of the default request's path (each block one graph: 0)
                self.runtime_facts["compile_graph_breaks"] = str(graph_breaks() - breaks)
            self._warm_up_more(job)
        if runtime.compile_enabled(self.device):
            self.compile_watch = CompileWatch()
        log.info("runtime_ready", rank=self.rank, **self.runtime_facts)

    def _warm_up_more(self, job: DenoiseJob) -> None:
        """The default warm-up ``job`` again at each of ``runtime.warmup_sizes`` and with each of
        ``runtime.warmup_cache_strategies`` (then plain once more, the strategies' hooks having come and gone), so
        that their compilations and CUDA-graph recordings happen now rather than on a request's path."""
        sized = []
        for other in self.size_warmup_jobs(job):
            t0 = time.perf_counter()
            self.run_job(other)
            p = other.params
            sized.append(f"{p.width}x{p.height}" + (f"x{p.frames}" if p.frames > 1 else "")
                         + f"={time.perf_counter() - t0:.2f}")
        if sized:
            self.runtime_facts["warmup_sizes_seconds"] = ", ".join(sized)
        cached = []
        for policy in self.warmup_strategies:
            t0 = time.perf_counter()
            name = policy.strategy.value
            self.run_job(dataclasses.replace(job, request_id=f"warmup-cache-{name}", cache=policy,
                                             end_step=CACHE_WARMUP_STEPS,
                                             params=dataclasses.replace(job.params, steps=CACHE_WARMUP_STEPS)))
            cached.append(f"{name}={time.perf_counter() - t0:.2f}")
        if cached:
            self.run_job(dataclasses.replace(job, request_id="warmup-plain-again"))
            self.runtime_facts["warmup_cache_strategies_seconds"] = ", ".join(cached)

    def serving_facts(self) -> dict[str, str]:
        """What changes while serving, for the info RPC: the steps that compiled or recorded graphs after warm-up."""
        return self.compile_watch.facts() if self.compile_watch is not None else {}

    def recording_ops(self):
        from services.attention.autotune import ShapeRecorder

        return ShapeRecorder()

    def run_job(self, job: DenoiseJob, steps: int | None = None) -> None:
        """Run ``job`` (or its first ``steps`` steps) to completion and drop it."""
        self.add_request(job)
        try:
            end = job.end_step if steps is None else min(job.end_step, job.start_step + steps)
            for step in range(job.start_step, end):
                self.execute_step(job.request_id, step).wait()
        finally:
            self.abort_request(job.request_id)

    def check_health(self) -> None:
        if self.runner is None:
            raise FailedPrecondition("denoiser model is not loaded")

    def shutdown(self) -> None:
        for request_id in list(self.states):
            self.abort_request(request_id)

    # -- requests ------------------------------------------------------------------------------------------------
    def add_request(self, job: DenoiseJob) -> None:
        assert self.runner is not None, "load_model first"
        self.states[job.request_id] = self.runner.prepare(job)
        if job.return_scheduler_state:
            self.export_state.add(job.request_id)

    def execute_step(self, request_id: str, step: int) -> StepHandle:
        assert self.runner is not None, "load_model first"
        state = self.states[request_id]
        if self.config.runtime.cuda_graphs and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # outputs of the previous step's graphs may be reused
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.runner.step(state, step)
            end.record()
            self._watch_compiles(request_id, step, state)
            return StepHandle(start, end)
        t0 = time.perf_counter()
        self.runner.step(state, step)
        seconds = time.perf_counter() - t0
        self._watch_compiles(request_id, step, state)
        return StepHandle(cpu_seconds=seconds)

    def _watch_compiles(self, request_id: str, step: int, state: DenoiseState) -> None:
        if self.compile_watch is None:
            return
        compiled, recorded = self.compile_watch.check()
        if compiled or recorded:
            log.warning("compiled_on_request_path", request_id=request_id, step=step, rank=self.rank,
                        latents=list(state.latents.shape), graphs_traced=compiled, cuda_graph_inputs_recorded=recorded,
                        hint="a request size missing from runtime.warmup_sizes, or a path the warm-up did not run "
                             "(e.g. a FlexCache strategy's first use)")

    def finish_request(self, request_id: str) -> FinishedRequest:
        metadata: dict[str, str] = {}
        try:
            state = self.states.pop(request_id)
            scheduler_state = {}
            if request_id in self.export_state:
                self.export_state.discard(request_id)
                scheduler_state = self.adapter.export_scheduler_state(state)
        finally:
            metadata = self.release_cache(request_id)
        return FinishedRequest(latents=state.latents.detach().to("cpu"), scheduler_state=scheduler_state,
                               metadata=metadata)

    def abort_request(self, request_id: str) -> None:
        try:
            self.states.pop(request_id, None)
            self.export_state.discard(request_id)
        finally:
            self.release_cache(request_id)

    def release_cache(self, request_id: str) -> dict[str, str]:
        """Drop the request's FlexCache state (finished, failed or cancelled); returns its accounting."""
        return self.runner.release(request_id) if self.runner is not None else {}
