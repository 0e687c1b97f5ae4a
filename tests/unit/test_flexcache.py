"""FlexCache in one process, on the real worker stack (Worker -> ModelRunner -> hooks on the real diffusers
transformer) with tiny random-weight checkpoints of Flux (one branch) and Wan (two CFG branches on one rank, so the
probe-then-decide path runs).

Tolerances: a strategy that never reuses must equal full compute bit for bit (its hooks only read tensors and
compute the same ops in the same order); cached runs must be bitwise deterministic (same inputs, same kernels).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from denoiser_svc.cache import get_strategy, policy_from_proto, policy_to_proto, strategy_names, validate_for_model
from denoiser_svc.cache.hooks import HookRegistry, ModelHook, Skip, register_hook, remove_hook
from denoiser_svc.cache.meancache import fresh_steps
from denoiser_svc.cache.registry import StrategyName, register
from denoiser_svc.cache.taylorseer import _Series
from denoiser_svc.cache.teacache import TeaCacheConfig
from services.errors import InvalidArgument
from services.proto.chitu.v1 import cache_pb2
from services.registry import load_adapter
from tests.flexcache_cases import NEVER_HIT, REAL, assert_clean, deep_checkpoint, make_job, make_worker, run_job
from tests.reference import rel_err

FAMILIES = ("flux", "wan", "flux_cfg")
CASES = [(f, s) for f in ("flux", "wan") for s in strategy_names() if not (f == "wan" and s == "teacache")]
CASES.append(("flux_cfg", "teacache"))  # TeaCache deciding once for two CFG branches on one rank (probe pass)


@pytest.fixture(scope="module")
def deep(checkpoints_dir: Path) -> dict[str, Path]:
    return {f: deep_checkpoint(f, checkpoints_dir) for f in FAMILIES}


@pytest.fixture(scope="module")
def workers(deep: dict[str, Path]):
    return {f: make_worker(ckpt) for f, ckpt in deep.items()}


@pytest.fixture(scope="module")
def full(deep: dict[str, Path], workers) -> dict[str, torch.Tensor]:
    return {f: run_job(workers[f], make_job(deep[f], None)).latents for f in FAMILIES}


# -- registry and policies ----------------------------------------------------------------------------------------


def test_registry_lists_every_strategy_and_rejects_unknown_names() -> None:
    assert strategy_names() == [n.value for n in StrategyName]
    for name in strategy_names():
        cls = get_strategy(name)
        assert cls.name.value == name
        doc = __import__(cls.__module__, fromlist=["x"]).__doc__ or ""
        assert "decision rule" in doc.lower() and "(" in doc.split("\n\n")[0], f"{name}: docstring names paper and rule"
    with pytest.raises(InvalidArgument) as info:
        get_strategy("fastcache")
    assert "'fastcache'" in info.value.message and all(n in info.value.message for n in strategy_names())


def test_registering_a_name_twice_fails() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register(StrategyName.PAB, TeaCacheConfig)(type("Dup", (), {}))


def test_proto_defaults_values_and_round_trip() -> None:
    msg = cache_pb2.CachePolicy(teacache=cache_pb2.TeaCacheConfig())
    policy = policy_from_proto(msg)
    assert policy.strategy == StrategyName.TEACACHE and policy.config == TeaCacheConfig()
    msg = cache_pb2.CachePolicy(teacache=cache_pb2.TeaCacheConfig(threshold=0.25, coefficients=[1.0, 0.5]))
    policy = policy_from_proto(msg)
    assert policy.config == TeaCacheConfig(threshold=0.25, warmup_steps=1, coefficients=(1.0, 0.5))
    assert policy_from_proto(policy_to_proto(policy)) == policy
    for name in strategy_names():  # every config message mirrors its dataclass field by field
        fields = {f.name for f in dataclasses.fields(get_strategy(name).config_cls)}
        proto_fields = set(getattr(cache_pb2.CachePolicy(), name).DESCRIPTOR.fields_by_name)
        assert fields == proto_fields, name


BAD_POLICIES = [
    (cache_pb2.CachePolicy(), ["cache.strategy", "teacache", "first_block", "pab"]),
    (cache_pb2.CachePolicy(teacache=cache_pb2.TeaCacheConfig(threshold=-1)), ["cache.teacache.threshold=-1", "[0, 5]"]),
    (cache_pb2.CachePolicy(teacache=cache_pb2.TeaCacheConfig(threshold=math.nan)), ["cache.teacache.threshold=nan"]),
    (cache_pb2.CachePolicy(first_block=cache_pb2.FirstBlockCacheConfig(threshold=1.5)),
     ["cache.first_block.threshold=1.5", "[0, 1]"]),
    (cache_pb2.CachePolicy(meancache=cache_pb2.MeanCacheConfig(fresh_fraction=0)),
     ["cache.meancache.fresh_fraction=0", "(0, 1]"]),
    (cache_pb2.CachePolicy(taylorseer=cache_pb2.TaylorSeerConfig(order=4)), ["cache.taylorseer.order=4", "[0, 3]"]),
    (cache_pb2.CachePolicy(magcache=cache_pb2.MagCacheConfig(max_consecutive_hits=0)),
     ["cache.magcache.max_consecutive_hits=0", "[1, 1000]"]),
    (cache_pb2.CachePolicy(pab=cache_pb2.PABConfig(interval=0)), ["cache.pab.interval=0", "[1, 100]"]),
]


@pytest.mark.parametrize(("msg", "needles"), BAD_POLICIES, ids=[str(i) for i in range(len(BAD_POLICIES))])
def test_bad_policies_name_the_field_and_the_allowed_values(msg: cache_pb2.CachePolicy, needles: list[str]) -> None:
    with pytest.raises(InvalidArgument) as info:
        policy_from_proto(msg)
    assert all(n in info.value.message for n in needles), info.value.message


def test_model_dependent_checks(deep: dict[str, Path]) -> None:
    flux, wan = (load_adapter(deep[f]) for f in ("flux", "wan"))
    too_many = policy_from_proto(cache_pb2.CachePolicy(dbcache=cache_pb2.DBCacheConfig(front_blocks=4, back_blocks=2)))
    with pytest.raises(InvalidArgument) as info:
        validate_for_model(too_many, flux.cache_spec(), "flux")
    assert "front_blocks=4" in info.value.message and "6 blocks" in info.value.message
    window = policy_from_proto(cache_pb2.CachePolicy(blockdance=cache_pb2.BlockDanceConfig(start_fraction=0.8,
                                                                                            end_fraction=0.5)))
    with pytest.raises(InvalidArgument, match="end_fraction=0.5 must be above start_fraction=0.8"):
        validate_for_model(window, flux.cache_spec(), "flux")
    tea = policy_from_proto(cache_pb2.CachePolicy(teacache=cache_pb2.TeaCacheConfig()))
    with pytest.raises(InvalidArgument) as info:
        validate_for_model(tea, wan.cache_spec(), "wan")
    assert "the wan family cannot use teacache" in info.value.message and "first_block" in info.value.message
    validate_for_model(tea, flux.cache_spec(), "flux")


# -- hooks --------------------------------------------------------------------------------------------------------


def test_hooks_wrap_a_module_without_changing_it() -> None:
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    plain = lin(x)

    class Double(ModelHook):
        def post_forward(self, module, args, kwargs, output):
            return output * 2

    class Answer(ModelHook):
        def pre_forward(self, module, args, kwargs):
            return Skip(torch.zeros(1))

    seen = []
    lin.register_forward_pre_hook(lambda module, args: seen.append("torch pre-hook") or (args[0] + 0,))
    register_hook(lin, "double", Double())
    assert type(lin) is torch.nn.Linear and list(lin.state_dict()) == ["weight", "bias"]
    assert torch.equal(lin(x), plain * 2) and seen == ["torch pre-hook"]  # inside torch's own hooks
    with pytest.raises(ValueError, match="already has a hook named 'double'"):
        register_hook(lin, "double", Double())
    register_hook(lin, "answer", Answer())
    assert torch.equal(lin(x), torch.zeros(1) * 2)  # skipped; the outer hook's post_forward still applies
    remove_hook(lin, "answer")
    remove_hook(lin, "double")
    assert "forward" not in lin.__dict__ and HookRegistry.of(lin) is None and torch.equal(lin(x), plain)
    compiled = torch.compile(lin.forward, backend="eager")
    lin.forward = compiled  # as regional compilation does
    register_hook(lin, "double", Double())
    assert torch.equal(lin(x), plain * 2)
    remove_hook(lin, "double")
    assert lin.__dict__["forward"] is compiled


# -- exactness and determinism on the real stack ----------------------------------------------------------------------


@pytest.mark.parametrize(("family", "strategy"), CASES)
def test_never_hit_equals_full_compute(family: str, strategy: str, deep, workers, full) -> None:
    out = run_job(workers[family], make_job(deep[family], strategy, NEVER_HIT[strategy]))
    assert out.metadata["cache.pattern"] == "C" * 10 and out.metadata["cache.skipped_fraction"] == "0.0000"
    assert torch.equal(out.latents, full[family]), f"rel err {rel_err(out.latents, full[family]):.2e}"
    assert_clean(workers[family])


@pytest.mark.parametrize(("family", "strategy"), CASES)
def test_real_settings_skip_work_deterministically(family: str, strategy: str, deep, workers, full) -> None:
    job = make_job(deep[family], strategy, REAL[strategy])
    first = run_job(workers[family], job)
    second = run_job(workers[family], dataclasses.replace(job, request_id="again"))
    assert torch.equal(first.latents, second.latents)
    md = first.metadata
    assert md == second.metadata
    per_step = [float(x) for x in __import__("json").loads(md["cache.skipped_per_step"])]
    assert len(md["cache.pattern"]) == len(per_step) == 10 and int(md["cache.hit_steps"]) == md["cache.pattern"].count("H")
    assert int(md["cache.hit_steps"]) >= 2 and float(md["cache.skipped_fraction"]) > 0.05
    assert abs(float(md["cache.skipped_fraction"]) - sum(per_step) / 10) < 1e-4
    assert all((p > 0) == (c == "H") for p, c in zip(per_step, md["cache.pattern"], strict=True))
    assert int(md["cache.memory_bytes"]) > 0 and md["cache.strategy"] == strategy
    err = rel_err(first.latents, full[family])
    assert 0 < err < 0.1, f"cached output should approximate full compute, rel err {err:.2e}"
    assert_clean(workers[family])


def test_interleaved_requests_keep_their_own_state(deep, workers) -> None:
    """Two cached requests (different strategies) and a plain one, stepped in turn on one worker, give what each
    gives alone: state is keyed by request (and branch), hooks are installed per forward only."""
    worker = workers["wan"]
    jobs = [make_job(deep["wan"], "dbcache", REAL["dbcache"], request_id="a"),
            make_job(deep["wan"], "pab", REAL["pab"], request_id="b", seed=9),
            make_job(deep["wan"], None, request_id="c", seed=11)]
    alone = [run_job(worker, dataclasses.replace(j, request_id=j.request_id + "-alone")).latents for j in jobs]
    for job in jobs:
        worker.add_request(job)
    for step in range(10):
        for job in jobs:
            worker.execute_step(job.request_id, step)
    for job, ref in zip(jobs, alone, strict=True):
        assert torch.equal(worker.finish_request(job.request_id).latents, ref), job.request_id
    assert_clean(worker)


def test_failed_request_leaves_no_state(deep) -> None:
    """A step that raises mid-run (a fault injected into one block) is aborted as the engine aborts it; the next
    request with the same strategy equals the one of a fresh process (a new worker)."""
    worker = make_worker(deep["wan"])
    block = worker.runner.model.transformer.blocks[4]  # a back block: computed on every step
    calls = {"n": 0}

    def fault(module, args, output):
        calls["n"] += 1
        if calls["n"] == 9:
            raise RuntimeError("injected fault")

    handle = block.register_forward_hook(fault)
    with pytest.raises(RuntimeError, match="injected fault"):
        run_job(worker, make_job(deep["wan"], "dbcache", REAL["dbcache"], request_id="bad"))
    handle.remove()
    assert_clean(worker)
    after = run_job(worker, make_job(deep["wan"], "dbcache", REAL["dbcache"]))
    fresh = run_job(make_worker(deep["wan"]), make_job(deep["wan"], "dbcache", REAL["dbcache"]))
    assert torch.equal(after.latents, fresh.latents) and after.metadata == fresh.metadata


def test_hooks_stay_correct_under_regional_compile(deep) -> None:
    """With the repeated blocks compiled (services.runtime.regional_compile, aot_eager on the CPU), cached runs
    equal the eager cached runs: block hooks stay outside the compiled blocks, attention hooks run behind a graph
    break, and the compiled blocks still run."""
    from torch._dynamo.utils import counters

    from services.runtime import RuntimeConfig, regional_compile

    eager = make_worker(deep["flux"])
    compiled = make_worker(deep["flux"])
    torch._dynamo.reset()
    graphs_before = counters["stats"]["unique_graphs"]  # process-wide: reset() does not clear it
    regional_compile(compiled.transformer_of(compiled.runner.model),
                     RuntimeConfig(compile="on", compile_backend="aot_eager"), compiled.device)
    for strategy in ("pab", "dbcache", "meancache", "teacache"):
        job = make_job(deep["flux"], strategy, REAL[strategy])
        assert torch.equal(run_job(compiled, job).latents, run_job(eager, job).latents), strategy
        assert_clean(compiled)
    assert counters["stats"]["unique_graphs"] - graphs_before >= 2


# -- schedules --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.2, 0.35, 0.5, 0.8, 1.0])
def test_meancache_fresh_schedule_fits_any_step_count(fraction: float) -> None:
    for steps in range(1, 81):
        fresh = fresh_steps(steps, fraction, 2, 1)
        assert fresh <= set(range(steps))
        assert set(range(min(2, steps))) <= fresh and steps - 1 in fresh
        want = max(min(3, steps), min(steps, math.floor(fraction * steps + 0.5)))
        assert len(fresh) == want, (steps, sorted(fresh))
        inner = sorted(fresh - set(range(2)) - {steps - 1})
        if len(inner) >= 2:  # spread evenly: the gaps between the inner fresh steps differ by at most one
            gaps = {b - a for a, b in zip(inner, inner[1:], strict=False)}
            assert max(gaps) - min(gaps) <= 1, (steps, inner)


def test_taylor_series_is_exact_on_polynomials() -> None:
    """Newton divided differences over uneven times reproduce a polynomial of the series' order exactly."""
    series = _Series()
    f = lambda t: torch.tensor([3.0 - 2.0 * t + 0.5 * t * t, 1.0 + t])  # noqa: E731
    for t in (980.0, 955.0, 900.0):
        series.add(t, f(t), order=2)
    assert torch.allclose(series.at(870.0, torch.float64), f(870.0).double(), rtol=1e-6)
    linear = _Series()
    for t in (10.0, 7.0):
        linear.add(t, f(t)[1:], order=1)
    assert torch.allclose(linear.at(2.0, torch.float32), f(2.0)[1:], rtol=1e-6)
