"""FlexCache on FLUX.2-klein and Z-Image in one process, on the real worker stack with tiny random-weight checkpoints
(``deep`` variants with enough blocks for a front, a middle and a back):

- FLUX.2-klein (step-distilled, one branch): its double-stream blocks return (text, image); its single-stream blocks
  take and return the joint ``[text; image]`` sequence, so block ranges that cross from one list into the other
  (TaylorSeer's and First-Block's middle, MagCache's whole stack, BlockDance's skipped blocks) go through the
  canonical form of ``services.families.cache_spec``;
- the undistilled FLUX.2-klein base (CFG: the probe-then-decide pass, its front stash handed across the lists);
- Z-Image (CFG, two branches on one rank): one unified image+caption sequence in its main blocks, a list prediction.

TeaCache is refused for both families (no fitted rescaling polynomial); every other strategy is offered.

Tolerances: a strategy that never reuses must equal full compute bit for bit (its hooks only read tensors, and a
joint sequence split and joined again holds the same values); cached runs must be bitwise deterministic. Cached
output vs full compute: below 0.1 relative (FLUX.2), 0.25 (Z-Image, whose tiny random model moves far from step to
step: see ``tests.flexcache_cases.REAL_BY_FAMILY``); above 0, or nothing was reused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from denoiser_svc.cache import strategy_names, validate_for_model
from denoiser_svc.cache.hooks import ModelHook, register_hook, remove_hooks
from denoiser_svc.cache.policy import policy_from_dict, usable_strategies
from services.errors import InvalidArgument
from services.families.cache_spec import BlockCall, CacheSpec
from services.registry import load_adapter
from tests.flexcache_cases import (
    NEVER_HIT,
    STEPS,
    assert_clean,
    deep_checkpoint,
    make_job,
    make_worker,
    real,
    run_job,
)
from tests.reference import rel_err

FAMILIES = ("flux2_klein", "z_image", "flux2_klein_base")
OFFERED = [s for s in strategy_names() if s != "teacache"]
CASES = [(f, s) for f in ("flux2_klein", "z_image") for s in OFFERED]
CASES += [("flux2_klein_base", "first_block"), ("flux2_klein_base", "dbcache")]  # CFG probe across the two lists
APPROX = {"z_image": 0.25}
"""Bound on the relative error of a cached run vs full compute (default 0.1)."""


@pytest.fixture(scope="module")
def deep(checkpoints_dir: Path) -> dict[str, Path]:
    return {f: deep_checkpoint(f, checkpoints_dir) for f in FAMILIES}


@pytest.fixture(scope="module")
def workers(deep: dict[str, Path]):
    return {f: make_worker(ckpt) for f, ckpt in deep.items()}


@pytest.fixture(scope="module")
def full(deep: dict[str, Path], workers) -> dict[str, torch.Tensor]:
    return {f: run_job(workers[f], make_job(deep[f], None)).latents for f in FAMILIES}


# -- what each family offers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["flux2_klein", "z_image"])
def test_every_strategy_but_teacache_is_offered(family: str, deep) -> None:
    adapter = load_adapter(deep[family])
    spec = adapter.cache_spec()
    assert usable_strategies(spec) == OFFERED
    for settings in ({}, {"coefficients": [1.0, 0.0]}):  # the identity polynomial is refused too
        with pytest.raises(InvalidArgument) as info:
            validate_for_model(policy_from_dict({"strategy": "teacache", **settings}), spec, adapter.family)
        message = info.value.message
        assert f"the {adapter.family} family cannot use teacache" in message
        assert "no TeaCache rescaling polynomial has been fitted" in message and str(OFFERED) in message
    blocks = spec.total_blocks
    with pytest.raises(InvalidArgument, match=f"this model has {blocks} blocks"):
        validate_for_model(policy_from_dict({"strategy": "dbcache", "front_blocks": blocks - 1, "back_blocks": 1}),
                           spec, adapter.family)


def test_a_joint_list_needs_a_separate_text_list_before_it() -> None:
    """A joint list is split at the text length of an earlier block call; a spec without one is refused."""
    joint = BlockCall(context_arg=None, output=("hidden",), joint=True)
    with pytest.raises(ValueError, match="takes a joint text\\+image sequence"):
        CacheSpec(block_lists=("single",), num_blocks=(2,), list_calls=(joint,))
    with pytest.raises(ValueError, match="'single' takes a joint"):
        CacheSpec(block_lists=("double", "single"), num_blocks=(0, 2), list_calls=(None, joint))
    spec = CacheSpec(block_lists=("double", "single"), num_blocks=(1, 2), list_calls=(None, joint))
    assert [spec.call(i).joint for i in range(2)] == [False, True] and spec.call(0).context_arg is not None


class _Recorder(ModelHook):
    """Records block ``i``'s canonical input and output (the text length tracked as the cache hooks track it)."""

    def __init__(self, resolved: Any, i: int, seen: dict[str, Any]):
        self.resolved, self.i, self.seen = resolved, i, seen

    def pre_forward(self, module, args, kwargs):
        text_len = self.resolved.text_length(self.i, args, kwargs)
        if text_len is not None:
            self.seen["text_len"] = text_len
        self.seen[("in", self.i)] = self.resolved.block_inputs(self.i, args, kwargs, self.seen.get("text_len"))
        return args, kwargs

    def post_forward(self, module, args, kwargs, output):
        rs, i = self.resolved, self.i
        hidden, context = rs.read_output(i, output, self.seen.get("text_len"))
        remade = rs.make_output(i, hidden, context)
        same = (torch.equal(remade, output) if isinstance(output, torch.Tensor)
                else all(torch.equal(a, b) for a, b in zip(remade, output, strict=True)))
        self.seen[("out", i)] = (hidden.clone(), None if context is None else context.clone(), same)
        return output


@pytest.mark.parametrize("family", ["flux2_klein", "z_image"])
def test_blocks_are_seen_in_one_canonical_form(family: str, deep, workers) -> None:
    """In a real forward, each block's canonical output is the next block's canonical input, bitwise: across
    FLUX.2's switch from (text, image) pairs to the joint sequence too (so the split point is the text length), and
    every output rebuilt from its canonical form equals the block's own."""
    worker = workers[family]
    resolved = worker.runner.cache.resolved
    seen: dict[str, Any] = {}
    for i, block in enumerate(resolved.blocks):
        register_hook(block, "test.recorder", _Recorder(resolved, i, seen))
    try:
        run_job(worker, make_job(deep[family], None, steps=1, request_id="recorded"))
    finally:
        remove_hooks(resolved.blocks, ("test.recorder",))
    n = len(resolved.blocks)
    assert any(c.joint for c in resolved.calls) == (family == "flux2_klein")
    for i in range(n):
        hidden, context, same = seen[("out", i)]
        assert same, f"block {i}: output rebuilt from its canonical form differs"
        if i + 1 < n:
            nxt = seen[("in", i + 1)]
            assert torch.equal(nxt.hidden, hidden), f"block {i} -> {i + 1}: image tokens differ"
            assert (context is None) == (nxt.context is None)
            assert context is None or torch.equal(nxt.context, context), f"block {i} -> {i + 1}: text differs"
    assert_clean(worker)


# -- exactness and determinism on the real stack ------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "strategy"), CASES)
def test_never_hit_equals_full_compute(family: str, strategy: str, deep, workers, full) -> None:
    out = run_job(workers[family], make_job(deep[family], strategy, NEVER_HIT[strategy]))
    assert out.metadata["cache.pattern"] == "C" * STEPS and out.metadata["cache.skipped_fraction"] == "0.0000"
    assert torch.equal(out.latents, full[family]), f"rel err {rel_err(out.latents, full[family]):.2e}"
    assert_clean(workers[family])


@pytest.mark.parametrize(("family", "strategy"), CASES)
def test_real_settings_skip_work_deterministically(family: str, strategy: str, deep, workers, full) -> None:
    job = make_job(deep[family], strategy, real(family, strategy))
    first = run_job(workers[family], job)
    second = run_job(workers[family], dataclasses.replace(job, request_id="again"))
    assert torch.equal(first.latents, second.latents) and first.metadata == second.metadata
    md = first.metadata
    per_step = json.loads(md["cache.skipped_per_step"])
    assert len(md["cache.pattern"]) == len(per_step) == STEPS
    assert int(md["cache.hit_steps"]) == md["cache.pattern"].count("H") >= 2
    assert float(md["cache.skipped_fraction"]) > 0.05
    assert all((p > 0) == (c == "H") for p, c in zip(per_step, md["cache.pattern"], strict=True))
    assert int(md["cache.memory_bytes"]) > 0 and md["cache.strategy"] == strategy
    err = rel_err(first.latents, full[family])
    assert 0 < err < APPROX.get(family, 0.1), f"cached output should approximate full compute, rel err {err:.2e}"
    assert_clean(workers[family])
