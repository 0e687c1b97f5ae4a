"""GPU-only paths of the attention registry, auto-selection and regional compilation (run on the GPU machine:
``python -m pytest -m gpu tests/gpu``). Tolerances: bf16 kernels vs the float32 math kernel land at ~3e-3 relative
error on random inputs, so exact kernels must stay under 1e-2 (the runtime's exact bound); 8-bit SageAttention under
1.5e-1 on these random shapes (see ``_bound``; the runtime's lossy bound, 5e-2, is applied by ``auto`` on the model's
real shapes)."""

from __future__ import annotations

import pytest
import torch

from services.attention.autotune import CallShape, auto_select, rel_error
from services.attention.backends import AttentionSpec, BackendName, get_backend, usable_backends

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEV = torch.device("cuda")
SHAPES = [((2, 1000, 8, 128), (2, 1000, 8, 128)), ((1, 4608, 24, 128), (1, 4608, 24, 128)),
          ((1, 3000, 12, 128), (1, 512, 12, 128)), ((1, 777, 4, 64), (1, 333, 4, 64))]


def _qkv(qs, ks, seed, dtype=torch.bfloat16):
    g = torch.Generator(DEV).manual_seed(seed)
    return (torch.randn(qs, generator=g, device=DEV, dtype=dtype), torch.randn(ks, generator=g, device=DEV, dtype=dtype),
            torch.randn(ks, generator=g, device=DEV, dtype=dtype))


def _bound(backend) -> float:
    # 8-bit Q/K: the error depends on the shape and the score spread (measured on an H200: 1.3e-2 at Wan's
    # 32760x12x128, 8.5e-2 at 777x333x4x64); auto measures it on the model's real shapes before it may use it
    return 1.5e-1 if backend.constraints.lossy else 1e-2


@pytest.mark.parametrize("qs,ks", SHAPES)
def test_every_usable_backend_matches_math(qs, ks) -> None:
    spec = AttentionSpec.for_device(DEV, torch.bfloat16, qs[-1])
    backends = usable_backends(spec)
    assert {BackendName.SDPA_CUDNN, BackendName.SDPA_FLASH, BackendName.SDPA_EFFICIENT} <= {b.name for b in backends}
    for i, backend in enumerate(backends):
        q, k, v = _qkv(qs, ks, seed=i)
        out = torch.full(qs, float("nan"), device=DEV, dtype=torch.bfloat16)  # poisoned: every element must be written
        out.copy_(backend.fn(q, k, v, None))
        err = rel_error(out, q, k, v, None)
        print(f"{backend.name.value} {qs}x{ks}: rel err {err:.2e}")
        assert err < _bound(backend), (backend.name, err)


def test_lse_backends_merge_exactly() -> None:
    """Ring attention's contract: attention over two key halves, merged by log-sum-exp, equals attention over all."""
    qs = ks = (1, 2048, 8, 128)
    spec = AttentionSpec.for_device(DEV, torch.bfloat16, 128, needs_lse=True)
    math = get_backend(BackendName.SDPA_MATH, spec)
    backends = [b for b in usable_backends(spec) if b.name != BackendName.SDPA_MATH]  # math is the reference
    assert {BackendName.SDPA_CUDNN, BackendName.SDPA_FLASH, BackendName.SDPA_EFFICIENT} <= {b.name for b in backends}
    for backend in backends:
        q, k, v = _qkv(qs, ks, seed=7)
        out, lse = backend.fn_lse(q, k, v, None)
        _, lse_ref = math.fn_lse(q, k, v, None)
        assert lse.shape == (1, 8, 2048) and lse.dtype == torch.float32
        assert (lse - lse_ref).abs().max() < 2e-2, backend.name
        o1, l1 = backend.fn_lse(q, k[:, :1024], v[:, :1024], None)
        o2, l2 = backend.fn_lse(q, k[:, 1024:], v[:, 1024:], None)
        lse_all = torch.logaddexp(l1, l2)
        w1 = torch.exp(l1 - lse_all).transpose(1, 2)[..., None]
        w2 = torch.exp(l2 - lse_all).transpose(1, 2)[..., None]
        merged = (o1.float() * w1 + o2.float() * w2).to(q.dtype)
        assert rel_error(merged, q, k, v, None) < 1e-2, backend.name
        assert rel_error(out, q, k, v, None) < 1e-2, backend.name


def test_masked_backends() -> None:
    spec = AttentionSpec.for_device(DEV, torch.bfloat16, 128, has_mask=True)
    names = {b.name for b in usable_backends(spec)}
    assert {BackendName.SDPA, BackendName.SDPA_EFFICIENT, BackendName.SDPA_MATH} <= names
    assert BackendName.SDPA_FLASH not in names
    q, k, v = _qkv((2, 700, 8, 128), (2, 300, 8, 128), seed=3)
    mask = torch.rand(2, 300, device=DEV) < 0.6
    mask[:, 0] = True
    # the reference is written out here (einsum, masked_fill), not the registry's math kernel: that one converts the
    # key mask with the same helper as the kernels, so a polarity or broadcast bug there would be shared
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / q.shape[-1] ** 0.5
    weights = scores.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)
    ref = torch.einsum("bhqk,bkhd->bqhd", weights, v.float())
    for backend in usable_backends(spec):
        out = backend.fn(q, k, v, mask).float()
        err = float((out - ref).norm() / ref.norm())
        assert err < 1e-2, (backend.name, err)


def test_backends_under_torch_compile() -> None:
    spec = AttentionSpec.for_device(DEV, torch.bfloat16, 128)
    q, k, v = _qkv((1, 1024, 8, 128), (1, 1024, 8, 128), seed=5)
    for backend in usable_backends(spec):
        def f(q, k, v, fn=backend.fn):
            return fn(q * 1.0, k, v, None) * 2.0

        compiled = torch.compile(f, fullgraph=backend.name != BackendName.SDPA_MATH)
        torch.testing.assert_close(compiled(q, k, v), f(q, k, v), atol=2e-2, rtol=2e-2)


def test_auto_chooses_an_exact_kernel_on_real_shapes() -> None:
    shapes = {CallShape("joint", (1, 8192, 12, 128), (1, 8192, 12, 128), torch.bfloat16, False): 2,
              CallShape("cross", (1, 8192, 12, 128), (1, 512, 12, 128), torch.bfloat16, False): 2}
    report = auto_select(shapes, DEV, allow_lossy=False, exact_max_rel_error=1e-2, lossy_max_rel_error=5e-2)
    meta = report.metadata()
    print(meta)
    for kind in ("joint", "cross"):
        chosen = get_backend(report.choice[kind], AttentionSpec.for_device(DEV, torch.bfloat16, 128))
        assert not chosen.constraints.lossy
        exact = [m for m in report.rows(kind, False) if m.ok]
        assert min(m.ms_per_forward for m in exact) * 1.03 >= next(
            m.ms_per_forward for m in exact if m.backend == report.choice[kind])
        assert f"attention_{kind}_timings" in meta


def run_worker(checkpoint, runtime, steps: int = 4, conditionings=None) -> tuple[torch.Tensor, dict]:
    """A CUDA bf16 worker on ``checkpoint`` with ``runtime``: start-up (auto kernels, compile, warm-up), then one
    request of ``steps`` steps (with ``conditionings`` = (cond, uncond) instead of the warm-up's, if given); returns
    its latents (float32) and the worker's runtime facts."""
    from denoiser_svc.config import DenoiserServiceConfig
    from denoiser_svc.worker import Worker
    from services.config import ModelConfig

    cfg = DenoiserServiceConfig(model=ModelConfig(checkpoint=str(checkpoint), device="cuda", dtype="bfloat16"),
                                runtime=runtime)
    worker = Worker(cfg)
    worker.init_device()
    worker.load_model()
    job = worker.warmup_job()
    worker.compile_or_warm_up_model(job)
    job.request_id, job.end_step = "r", steps
    if conditionings is not None:
        job.conditionings, job.negative_conditionings = conditionings
    job.params = type(job.params)(**{**job.params.__dict__, "steps": steps})
    worker.add_request(job)
    for step in range(steps):
        worker.execute_step("r", step)
    done = worker.finish_request("r")
    return getattr(done, "latents", done).float(), worker.runtime_facts


@pytest.mark.parametrize("variant", ["default", "cuda-graphs", "quack-graphs"])
def test_worker_compiles_tiny_flux_and_matches_eager(tiny_flux, variant: str) -> None:
    """Regional compile (inductor) + auto kernels + fused QKV, MLP, q/k norm+rotary and residual+norms in the worker
    vs the plain eager worker, bf16; also in CUDA graphs, and with every block layer on QuACK's GEMMs (a reported
    skip where QuACK cannot run: not installed, not Hopper)."""
    from services.gemm import quack_unavailable_reason
    from services.runtime import RuntimeConfig

    def run(runtime: RuntimeConfig) -> tuple[torch.Tensor, dict]:
        return run_worker(tiny_flux, runtime)

    if variant == "quack-graphs" and (reason := quack_unavailable_reason(DEV)) is not None:
        pytest.skip(reason)
    eager, _ = run(RuntimeConfig(attention_backend="sdpa", fuse_qkv=False, fuse_mlp=False, fuse_norm_rope=False,
                                 fuse_norms=False, compile="off", gemm_backend="cublas"))
    runtimes = {"default": [RuntimeConfig()], "cuda-graphs": [RuntimeConfig(cuda_graphs=True)],
                "quack-graphs": [RuntimeConfig(cuda_graphs=True, gemm_backend="quack")]}[variant]
    for rt in runtimes:
        ours, facts = run(rt)
        assert facts["compiled_blocks"] and facts["attention_source"] == "auto"
        if rt.gemm_backend == "quack":
            assert int(facts["gemm_quack_layers"]) > 0, facts["gemm_choices"]
            # every recorded shape on QuACK: none fell back to cuBLAS on an error or on its output check
            assert " -> cublas" not in facts["gemm_choices"], facts["gemm_choices"]
        assert int(facts["fused_mlp_modules"]) > 0 and int(facts["fused_norm_rope_modules"]) > 0
        assert int(facts["fused_norm_blocks"]) > 0
        err = float((ours - eager).norm() / eager.norm())
        assert err < 2e-2, (rt, err)


@pytest.mark.parametrize("checkpoint", ["tiny_flux", "tiny_wan"])
def test_cuda_graph_worker_records_no_block_again_for_later_requests(checkpoint: str,
                                                                     request: pytest.FixtureRequest) -> None:
    """A compiled CUDA-graph worker records each block graph during its warm-up; later requests (other prompts and
    seeds, of several lengths, two of them prepared before either runs) replay them: no recording during them
    (inductor's count of the non-static inputs of new recordings stays put), and their outputs equal the same
    requests served alone. (Each request's new step-table buffers used to be static inputs at new addresses: every
    block was recorded again on each request's first step; see tests/unit/test_static_graph_inputs.py.)"""
    from torch._dynamo.utils import counters

    from services.runtime import RuntimeConfig
    from tests.flexcache_cases import make_job
    from tests.workers import start_worker

    path = request.getfixturevalue(checkpoint)
    worker = start_worker(path, RuntimeConfig(cuda_graphs=True), device="cuda", dtype="bfloat16")

    def recorded() -> int:
        return counters["inductor"]["cudagraph_recorded_non_static_inputs"]

    def serve(jobs) -> list[torch.Tensor]:
        for job in jobs:
            worker.add_request(job)
        for job in jobs:
            for step in range(job.start_step, job.end_step):
                worker.execute_step(job.request_id, step)
        return [worker.finish_request(job.request_id).latents.float() for job in jobs]

    alone = serve([make_job(path, None, request_id="a", steps=3, seed=21)])[0]
    before = recorded()
    together = serve([make_job(path, None, request_id="b", steps=5, seed=22),
                      make_job(path, None, request_id="c", steps=3, seed=21)])
    assert recorded() == before, f"{recorded() - before} non-static inputs recorded anew for later requests"
    assert torch.equal(together[1], alone)  # the same graphs, the shared row buffers refilled per step


def test_cuda_graph_worker_compiles_and_records_listed_sizes_at_start_up(tiny_flux) -> None:
    """``runtime.warmup_sizes`` on the GPU: inductor recompiles the blocks with dynamic shapes during the warm-up
    (our Triton, FA4 and QuACK ops under symbolic shapes) and records their CUDA graphs; a request at the listed size
    then neither recompiles nor records, and matches the eager worker (bf16)."""
    from torch._dynamo.utils import counters

    from services.runtime import RuntimeConfig
    from tests.flexcache_cases import make_job, run_job
    from tests.workers import start_worker

    torch._dynamo.reset()
    worker = start_worker(tiny_flux, RuntimeConfig(cuda_graphs=True, warmup_sizes=["96x64"]), device="cuda",
                          dtype="bfloat16")
    assert worker.runtime_facts["warmup_sizes_seconds"].startswith("96x64=")
    tokens = worker.adapter.max_sequence_length
    before = counters["inductor"]["cudagraph_recorded_non_static_inputs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        ours = run_job(worker, make_job(tiny_flux, None, request_id="r", steps=3, size=(96, 64),
                                        text_tokens=tokens)).latents.float()
    assert counters["inductor"]["cudagraph_recorded_non_static_inputs"] == before
    plain = RuntimeConfig(attention_backend="sdpa", fuse_qkv=False, fuse_mlp=False, fuse_norm_rope=False,
                          fuse_norms=False, compile="off", gemm_backend="cublas")
    eager_worker = start_worker(tiny_flux, plain, device="cuda", dtype="bfloat16")
    eager = run_job(eager_worker, make_job(tiny_flux, None, request_id="r", steps=3, size=(96, 64),
                                           text_tokens=tokens)).latents.float()
    err = float((ours - eager).norm() / eager.norm())
    assert err < 2e-2, err


@pytest.mark.parametrize("tokens,dim,hidden", [(4608, 3072, 12288), (8190, 1536, 8960), (512, 3072, 12288)])
def test_fused_mlp_kernels_match_float32(tokens, dim, hidden) -> None:
    """The GELU-epilogue GEMM (cuBLASLt) and the split output projection at Flux / Wan MLP shapes, bf16, eager and
    compiled (inductor must call the fused kernel, not decompose it), vs the float32 unfused ops: bf16 bound 1e-2."""
    from services.gemm import linear_gelu_tanh, linear_of_concat

    g = torch.Generator(DEV).manual_seed(0)
    up = torch.nn.Linear(dim, hidden, device=DEV, dtype=torch.bfloat16)
    down = torch.nn.Linear(dim + hidden, dim, device=DEV, dtype=torch.bfloat16)
    x = torch.randn(1, tokens, dim, generator=g, device=DEV, dtype=torch.bfloat16)
    attn = torch.randn(1, tokens, dim, generator=g, device=DEV, dtype=torch.bfloat16)

    def fused(x, attn):
        return linear_of_concat(down, (attn, linear_gelu_tanh(x, up)))

    with torch.no_grad():
        h32 = torch.nn.functional.gelu(torch.nn.functional.linear(x.float(), up.weight.float(), up.bias.float()),
                                       approximate="tanh")
        ref = torch.nn.functional.linear(torch.cat([attn.float(), h32], -1), down.weight.float(), down.bias.float())
        h = linear_gelu_tanh(x, up)
        assert h.dtype == torch.bfloat16 and float((h.float() - h32).norm() / h32.norm()) < 1e-2
        for name, fn in (("eager", fused), ("compiled", torch.compile(fused))):
            out = fn(x, attn)
            err = float((out.float() - ref).norm() / ref.norm())
            print(f"fused MLP {name} {tokens}x{dim}->{hidden}: rel err {err:.2e}")
            assert err < 1e-2, (name, err)


def test_split_output_projection_accumulates_in_place() -> None:
    """``linear_of_concat`` at Flux's single-block shape, compiled: the second GEMM accumulates into the first one's
    output (cuBLAS beta = 1) with no device-to-device copy of it first (the out-of-place ``addmm(out, ...)`` form had
    cost a 28 MB copy per block)."""
    from torch.profiler import ProfilerActivity, profile

    from services.gemm import linear_of_concat

    g = torch.Generator(DEV).manual_seed(1)
    down = torch.nn.Linear(3072 + 12288, 3072, device=DEV, dtype=torch.bfloat16)
    attn = torch.randn(1, 4608, 3072, generator=g, device=DEV, dtype=torch.bfloat16)
    mlp = torch.randn(1, 4608, 12288, generator=g, device=DEV, dtype=torch.bfloat16)
    fn = torch.compile(lambda a, m: linear_of_concat(down, (a, m)) * 0.5)
    with torch.no_grad():
        ref = torch.nn.functional.linear(torch.cat([attn, mlp], -1).float(), down.weight.float(), down.bias.float())
        fn(attn, mlp)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            out = fn(attn, mlp)
            torch.cuda.synchronize()
    assert any("gemm" in e.name.lower() or "nvjet" in e.name.lower() for e in prof.events()), \
        "the profiler recorded no GEMM kernel: the copy check below would pass on an empty trace"
    copies = [e for e in prof.events() if "Memcpy DtoD" in e.name]
    assert not copies, [e.name for e in copies]
    assert float((out.float() - ref * 0.5).norm() / (ref * 0.5).norm()) < 1e-2


def _padded_kv(b, s_k, h, d, real, dtype=torch.bfloat16, fused=False):
    """k, v ``[b, s_k, h, d]`` whose rows from ``real[i]`` on repeat one pair, as Wan's zero-padded text gives them;
    ``fused``: both are views of one ``[b, s_k, 2 * h * d]`` projection output (the fused K/V GEMM's layout)."""
    g = torch.Generator(DEV).manual_seed(7)
    kv = torch.randn(b, s_k, 2 * h * d, generator=g, device=DEV, dtype=dtype)
    for i, n in enumerate(real):
        if n < s_k:
            kv[i, n:] = kv[i, n]
    k, v = kv.chunk(2, dim=-1)
    k, v = k.unflatten(2, (h, d)), v.unflatten(2, (h, d))
    return (k, v) if fused else (k.contiguous(), v.contiguous())


@pytest.mark.parametrize("q_len,heads,dim,real,dtype,fused", [
    (3000, 12, 128, [100], torch.bfloat16, True),    # Wan's cross-attention (fused K/V views), a 100-token prompt
    (3000, 12, 128, [512], torch.bfloat16, False),   # no padding: plain attention over all 512 keys
    (777, 4, 128, [0, 63], torch.bfloat16, False),   # every key the same (keep 1); keep 64 = one full key tile
    (1000, 8, 64, [64, 511], torch.float16, True),   # keep 65 (one key past a tile); keep 512 (run of one)
    (129, 2, 256, [1, 300], torch.bfloat16, False),  # head dim 256; a query tile and one row
])
def test_merged_attention_kernel_equals_attention_over_every_key(q_len, heads, dim, real, dtype, fused) -> None:
    """The Triton kernel (``chitu::merged_attention``) vs float32 attention over *all* keys: as close as the exact
    bf16 kernels (1e-2, the module's bound) and never further than 1.5x cuDNN/PyTorch SDPA's own error on the same
    inputs; the merged keep is what the padding implies."""
    from services.attention.repeated_keys import kernel_fits, merged_attention, trailing_repeats

    k, v = _padded_kv(len(real), 512, heads, dim, real, dtype, fused)
    q = torch.randn(len(real), q_len, heads, dim, device=DEV, dtype=dtype,
                    generator=torch.Generator(DEV).manual_seed(8))
    keep, log_count = trailing_repeats(k, v)
    assert keep.tolist() == [min(n + 1, 512) for n in real]
    assert kernel_fits(q, k, v)
    out = merged_attention(q, k, v, keep, log_count)
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v)))
    ref = ref.transpose(1, 2)
    sdpa = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    err = float((out.float() - ref).norm() / ref.norm())
    sdpa_err = float((sdpa.float() - ref).norm() / ref.norm())
    print(f"merged attention {q_len}x{heads}x{dim} real={real}: rel err {err:.2e} (SDPA {sdpa_err:.2e})")
    assert err < 1e-2 and err <= 1.5 * sdpa_err + 1e-4, (err, sdpa_err)


def test_merged_attention_compiles_once_for_every_prompt_length() -> None:
    """Compiled (inductor, CUDA graphs) around the wrapper: the detection runs inside the graph, the kernel is an
    opaque op, and prompts of other lengths (other keep values, same shapes) replay without a recompile and give the
    eager result."""
    from services.attention import sdpa_attention
    from services.attention.repeated_keys import merge_repeated_keys

    cross = merge_repeated_keys(sdpa_attention)

    def f(q, k, v):
        return cross(q * 1.0, k, v, None) * 2.0

    compiled = torch.compile(f, mode="reduce-overhead")
    q = torch.randn(1, 2000, 12, 128, device=DEV, dtype=torch.bfloat16)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in (30, 30, 200, 512, 1):
            k, v = _padded_kv(1, 512, 12, 128, [n])
            torch.compiler.cudagraph_mark_step_begin()
            got = compiled(q, k, v).clone()
            torch.testing.assert_close(got, f(q, k, v), atol=2e-2, rtol=2e-2)


def test_worker_merges_padded_wan_prompts(tiny_wan) -> None:
    """The compiled bf16 worker on the tiny Wan with a zero-padded prompt (as WanPipeline encodes one): merged
    (``merge_repeated_keys: true``) vs attention over every key (the default), both compiled with CUDA graphs, agree
    within the worker tests' bf16 bound. (The tiny Wan's head dim, 16, is one the Triton kernel takes, so on CUDA
    bf16 the merged worker runs it, not the float32 fallback.)"""
    from services.registry import load_adapter
    from services.runtime import RuntimeConfig

    adapter = load_adapter(tiny_wan)
    assert adapter.transformer_config()["attention_head_dim"] in (16, 32, 64, 128, 256)
    budget, dim = adapter.max_sequence_length, adapter.transformer_config()["text_dim"]
    g = torch.Generator().manual_seed(4)
    cond = torch.zeros(1, budget, dim)
    cond[:, :5] = torch.randn(1, 5, dim, generator=g)
    uncond = torch.zeros(1, budget, dim)
    uncond[:, :1] = torch.randn(1, 1, dim, generator=g)
    conds = ({"prompt_embeds": cond}, {"prompt_embeds": uncond})
    merged, facts = run_worker(tiny_wan, RuntimeConfig(cuda_graphs=True, merge_repeated_keys=True),
                               conditionings=conds)
    full, full_facts = run_worker(tiny_wan, RuntimeConfig(cuda_graphs=True, merge_repeated_keys=False),
                                  conditionings=conds)
    assert facts["merge_repeated_keys"] == "on" and "merge_repeated_keys" not in full_facts
    err = float((merged - full).norm() / full.norm())
    assert err < 2e-2, err
