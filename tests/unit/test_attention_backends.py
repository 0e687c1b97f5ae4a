"""The attention kernel registry, its constraint checks and ``auto`` selection, on the CPU.

CPU decision (tested here): the eligible kernels on the CPU are ``sdpa`` (PyTorch's CPU kernel, the one diffusers
uses) and ``sdpa_math`` (float32 reference); everything else declares ``cuda`` only. Tolerances: float32 kernels
against a float64 reference agree to ~1e-7 relative, so 1e-5 leaves room for summation order only.
"""

from __future__ import annotations

import sys

import pytest
import torch

from services.attention import AttentionOps
from services.attention.autotune import CallShape, Measurement, ShapeRecorder, auto_select, choose, rel_error
from services.attention.backends import (
    AUTO,
    AttentionSpec,
    BackendError,
    BackendName,
    all_backends,
    get_backend,
    lse_backends,
    parse_name,
    usable_backends,
)
from services.attention.selection import select_kernels
from services.runtime import RuntimeConfig

CPU = torch.device("cpu")


def _ref(q, k, v, mask=None):
    """float64 attention, [B, S, H, D]."""
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, -1)
    return (torch.softmax(scores, -1) @ v).transpose(1, 2), lse


def _qkv(sq=37, sk=29, h=3, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, sq, h, d, generator=g), torch.randn(2, sk, h, d, generator=g),
            torch.randn(2, sk, h, d, generator=g))


def test_every_name_is_registered_with_constraints() -> None:
    assert [b.name for b in all_backends()] == list(BackendName)
    for b in all_backends():
        assert b.description
    assert set(lse_backends()) >= {BackendName.SDPA_CUDNN, BackendName.SDPA_FLASH, BackendName.SDPA_EFFICIENT,
                                   BackendName.SDPA_MATH}
    assert BackendName.SAGE not in lse_backends()


def test_cpu_usable_backends_are_sdpa_and_math() -> None:
    spec = AttentionSpec.for_device(CPU, torch.float32, 64)
    assert [b.name for b in usable_backends(spec)] == [BackendName.SDPA, BackendName.SDPA_MATH]
    spec_lse = AttentionSpec.for_device(CPU, torch.float32, 64, needs_lse=True)
    assert [b.name for b in usable_backends(spec_lse)] == [BackendName.SDPA_MATH]


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(BackendError) as exc:
        parse_name("flashy")
    msg = str(exc.value)
    assert "'flashy'" in msg and AUTO in msg and all(n.value in msg for n in BackendName)


def test_unusable_backend_lists_usable_ones_and_why() -> None:
    spec = AttentionSpec.for_device(CPU, torch.float32, 64)
    with pytest.raises(BackendError) as exc:
        get_backend("sdpa_cudnn", spec)
    msg = str(exc.value)
    assert "runs on cuda only" in msg and "['sdpa', 'sdpa_math']" in msg


@pytest.mark.parametrize(("spec", "name", "reason"), [
    (AttentionSpec("cuda", torch.bfloat16, 80, capability=(9, 0)), BackendName.SAGE, "head_dim 80 not in"),
    (AttentionSpec("cuda", torch.bfloat16, 128, has_mask=True, capability=(9, 0)), BackendName.SDPA_FLASH,
     "no key mask support"),
    (AttentionSpec("cuda", torch.float32, 128, capability=(9, 0)), BackendName.SDPA_CUDNN, "dtype float32"),
    (AttentionSpec("cuda", torch.bfloat16, 256, capability=(9, 0)), BackendName.SDPA_CUDNN, "<= 128"),
    (AttentionSpec("cuda", torch.bfloat16, 128, capability=(7, 5)), BackendName.SDPA_FLASH, "capability >= 8.0"),
    (AttentionSpec("cuda", torch.bfloat16, 128, needs_lse=True, capability=(9, 0)), BackendName.SAGE,
     "log-sum-exp"),
    (AttentionSpec("cuda", torch.bfloat16, 128, capability=(9, 0)), BackendName.FLASH_ATTN, "not installed"),
    (AttentionSpec("cuda", torch.bfloat16, 128, capability=(9, 0)), BackendName.FLASH_ATTN4, "not installed"),
    (AttentionSpec("cuda", torch.bfloat16, 128, capability=(8, 0)), BackendName.FLASH_ATTN4, "capability >= 9.0"),
])
def test_constraint_violations_name_the_reason(spec, name, reason) -> None:
    backend = next(b for b in all_backends() if b.name == name)
    assert any(reason in why for why in backend.constraints.violations(spec)), backend.constraints.violations(spec)


def test_gpu_specs_accept_the_exact_kernels() -> None:
    spec = AttentionSpec("cuda", torch.bfloat16, 128, capability=(9, 0))
    names = {b.name for b in all_backends() if not b.constraints.violations(spec)}
    assert {BackendName.SDPA_CUDNN, BackendName.SDPA_FLASH, BackendName.SDPA_EFFICIENT, BackendName.SDPA,
            BackendName.SDPA_MATH} <= names


@pytest.mark.parametrize("masked", [False, True])
def test_cpu_kernels_match_float64(masked: bool) -> None:
    q, k, v = _qkv()
    mask = None
    if masked:
        mask = torch.rand(2, 29, generator=torch.Generator().manual_seed(1)) < 0.6
        mask[:, 0] = True
    ref, ref_lse = _ref(q, k, v, mask)
    spec = AttentionSpec.for_device(CPU, torch.float32, 16, has_mask=masked)
    backends = usable_backends(spec)
    assert {BackendName.SDPA, BackendName.SDPA_MATH} <= {b.name for b in backends}, backends
    for backend in backends:
        out = backend.fn(q, k, v, mask)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert float((out.double() - ref).norm() / ref.norm()) < 1e-5, backend.name
        assert rel_error(out, q, k, v, mask) < 1e-5


def test_math_lse_and_the_ring_merge() -> None:
    """The contract ring attention relies on: partial results over key blocks merge exactly by log-sum-exp."""
    q, k, v = _qkv(sq=40, sk=48)
    math = get_backend("sdpa_math", AttentionSpec.for_device(CPU, torch.float32, 16, needs_lse=True))
    out, lse = math.fn_lse(q, k, v, None)
    ref, ref_lse = _ref(q, k, v)
    assert lse.shape == (2, 3, 40) and lse.dtype == torch.float32
    assert torch.allclose(lse.double(), ref_lse, atol=1e-5)
    o1, l1 = math.fn_lse(q, k[:, :20], v[:, :20], None)
    o2, l2 = math.fn_lse(q, k[:, 20:], v[:, 20:], None)
    total = torch.logaddexp(l1, l2)
    merged = o1 * torch.exp(l1 - total).transpose(1, 2)[..., None] + o2 * torch.exp(l2 - total).transpose(1, 2)[..., None]
    assert float((merged.double() - ref).norm() / ref.norm()) < 1e-5
    with pytest.raises(BackendError, match="ring attention needs"):
        get_backend("sdpa", AttentionSpec.for_device(CPU, torch.float32, 16)).fn_lse  # noqa: B018


def test_math_kernel_chunks_queries(monkeypatch) -> None:
    import services.attention.backends as backends

    monkeypatch.setattr(backends, "MATH_QUERY_CHUNK", 7)
    q, k, v = _qkv(sq=30)
    ref, _ = _ref(q, k, v)
    out = get_backend("sdpa_math", AttentionSpec.for_device(CPU, torch.float32, 16)).fn(q, k, v, None)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-5


# -- selection logic ---------------------------------------------------------------------------------------------


def _m(name: str, ms: float, err: float = 3e-3, lossy: bool = False, status: str = "ok") -> Measurement:
    return Measurement("joint", BackendName(name), lossy, ms, err, status)


H200_WAN = [  # issue 3's measurements at 32760 tokens x 12 heads x 128 on an H200
    _m("sdpa_cudnn", 10.6), _m("sdpa_flash", 18.2), _m("sdpa_efficient", 37.0), _m("sage", 15.7, 1.4e-2, lossy=True),
    _m("sdpa", 10.7), _m("sdpa_math", float("nan"), status="slow: 300ms"),
]


def test_choose_finds_cudnn_on_the_issue_numbers() -> None:
    kw = {"exact_max_rel_error": 1e-2, "lossy_max_rel_error": 5e-2}
    assert choose(H200_WAN, "joint", allow_lossy=False, **kw) == BackendName.SDPA_CUDNN
    assert choose(H200_WAN, "joint", allow_lossy=True, **kw) == BackendName.SDPA_CUDNN  # sage is slower anyway


def test_lossy_kernels_need_allow_lossy_and_their_bound() -> None:
    rows = [_m("sdpa_cudnn", 10.0), _m("sage", 6.0, 1.4e-2, lossy=True)]
    kw = {"exact_max_rel_error": 1e-2, "lossy_max_rel_error": 5e-2}
    assert choose(rows, "joint", allow_lossy=False, **kw) == BackendName.SDPA_CUDNN
    assert choose(rows, "joint", allow_lossy=True, **kw) == BackendName.SAGE
    assert choose(rows, "joint", allow_lossy=True, exact_max_rel_error=1e-2,
                  lossy_max_rel_error=1e-2) == BackendName.SDPA_CUDNN


def test_error_bound_and_failures_exclude_a_faster_kernel() -> None:
    rows = [_m("sdpa_cudnn", 10.0, err=2e-2), _m("sdpa_flash", 12.0), _m("sdpa_efficient", 5.0, status="failed: x")]
    assert choose(rows, "joint", allow_lossy=False, exact_max_rel_error=1e-2,
                  lossy_max_rel_error=5e-2) == BackendName.SDPA_FLASH
    with pytest.raises(ValueError, match="no attention backend met the error bound"):
        choose(rows[:1], "joint", allow_lossy=False, exact_max_rel_error=1e-2, lossy_max_rel_error=5e-2)


def test_preference_order_wins_within_min_gain() -> None:
    rows = [_m("sdpa_cudnn", 10.2), _m("sdpa", 10.0)]
    kw = {"allow_lossy": False, "exact_max_rel_error": 1e-2, "lossy_max_rel_error": 5e-2}
    assert choose(rows, "joint", min_gain=0.03, **kw) == BackendName.SDPA_CUDNN
    assert choose(rows, "joint", min_gain=0.0, **kw) == BackendName.SDPA


def test_auto_on_cpu_records_real_shapes_and_picks_an_eligible_kernel(tiny_flux) -> None:
    from services.families.base import SamplingParams
    from services.registry import load_adapter

    adapter = load_adapter(tiny_flux)
    model = adapter.load_denoiser(torch.float32, CPU)
    conds, _ = adapter.warmup_conditionings(model)
    recorder = ShapeRecorder()
    assert adapter.install_attention(model, recorder.ops()) == 3
    params = SamplingParams(width=64, height=48, steps=2, guidance_scale=3.5, seed=0)
    state = adapter.prepare(model, params, conds, {}, None, 0, 2)
    with torch.inference_mode():
        adapter.forward(model, state, state.latents, 0, "cond")
    ((shape, count),) = recorder.calls.items()
    assert count == 3 and shape.kind == "joint" and shape.q == shape.k and shape.q[1] == 64 + 12  # text + image
    report = auto_select(dict(recorder.calls), CPU, allow_lossy=True, exact_max_rel_error=1e-2,
                         lossy_max_rel_error=5e-2, reps=3)
    assert report.choice["joint"] in (BackendName.SDPA, BackendName.SDPA_MATH)
    statuses = {m.backend: m.status for m in report.measurements}
    assert statuses[BackendName.SDPA] == "ok"
    assert statuses[BackendName.SDPA_CUDNN].startswith("unusable: runs on cuda only")
    assert statuses[BackendName.SAGE].startswith("unusable")
    meta = report.metadata()
    assert meta["attention_joint_backend"] == report.choice["joint"].value
    assert "sdpa=" in meta["attention_joint_timings"] and "sage=" in meta["attention_joint_lossy_timings"]


def test_select_kernels_config_paths() -> None:
    shapes = {CallShape("joint", (1, 20, 2, 16), (1, 20, 2, 16), torch.float32, False): 2,
              CallShape("cross", (1, 20, 2, 16), (1, 5, 2, 16), torch.float32, True): 2}
    fixed = select_kernels(RuntimeConfig(attention_backend="sdpa_math"), shapes, CPU)
    assert fixed.source == "config" and fixed.get("cross").name == BackendName.SDPA_MATH
    with pytest.raises(BackendError, match=r"Usable here: \['sdpa', 'sdpa_math'\]"):
        select_kernels(RuntimeConfig(attention_backend="sdpa_flash"), shapes, CPU)
    with pytest.raises(BackendError, match="ring attention|log-sum-exp"):
        select_kernels(RuntimeConfig(attention_backend="sdpa"), shapes, CPU, needs_lse=True)
    ring = select_kernels(RuntimeConfig(), shapes, CPU, needs_lse=True)
    assert ring.get("joint").name == BackendName.SDPA_MATH  # the only CPU kernel with a log-sum-exp
    none = select_kernels(RuntimeConfig(), {}, CPU)
    assert none.source == "auto without recorded shapes" and none.get("joint").name == BackendName.SDPA
    ops = AttentionOps(joint=ring.get("joint").fn, cross=ring.get("cross").fn)
    q, k, v = _qkv(sq=20, sk=20, h=2, d=16)
    assert ops.joint(q, k, v, None).shape == q.shape


def test_flash_attn4_alone_is_not_taken_for_flash_attn2(tmp_path, monkeypatch) -> None:
    """The flash-attn-4 wheel installs ``flash_attn/cute`` without FA2: a namespace package ``flash_attn`` then
    exists, and only ``flash_attn4`` may count as installed."""
    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "cute" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, name)  # restored at teardown
    spec = AttentionSpec("cuda", torch.bfloat16, 128, capability=(9, 0))
    by_name = {b.name: b for b in all_backends()}
    try:
        assert by_name[BackendName.FLASH_ATTN4].constraints.violations(spec) == []
        assert any("not installed" in why for why in by_name[BackendName.FLASH_ATTN].constraints.violations(spec))
    finally:  # the namespace package imported from tmp_path must not outlive the test
        for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
            del sys.modules[name]
