"""The merge of repeated trailing keys (``services.attention.repeated_keys``): detection, the exact identity it relies
on, and that Wan's real padded prompts reach it. The Triton kernel itself is tested on the GPU
(``tests/gpu/test_attention_gpu.py``)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from services.attention import AttentionOps, sdpa_attention
from services.attention.repeated_keys import (
    key_bias,
    merge_repeated_keys,
    merged_attention,
    merged_attention_reference,
    trailing_repeats,
)
from services.families.base import SamplingParams
from services.registry import load_adapter

CPU = torch.device("cpu")


def _full_attention_f64(q, k, v):
    """Attention over every key, in float64 (the identity's right-hand side, free of the merge's summation order)."""
    qd, kd, vd = (t.transpose(1, 2).double() for t in (q, k, v))
    w = torch.softmax(qd @ kd.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (w @ vd).transpose(1, 2)


def _padded(b: int, s_k: int, h: int, d: int, real: list[int], seed: int = 0):
    """k, v ``[b, s_k, h, d]`` whose rows from ``real[i]`` on repeat one pair (as zero-padded text does)."""
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(b, s_k, h, d, generator=g), torch.randn(b, s_k, h, d, generator=g)
    for i, n in enumerate(real):
        if n < s_k:
            k[i, n:], v[i, n:] = k[i, n], v[i, n]
    return k, v


def test_trailing_repeats_counts_rows_equal_in_key_and_value() -> None:
    k, v = _padded(4, 12, 2, 8, [5, 12, 0, 11])
    v[3, 7] = v[3, 11]  # an inner row equal to the last in v only: not part of the trailing run
    keep, log_count = trailing_repeats(k, v)
    assert keep.dtype == torch.int32 and log_count.dtype == torch.float32
    # 5 distinct + a run of 7; no run (the last row alone); every row the same; a run of the last row alone
    assert keep.tolist() == [6, 12, 1, 12]
    assert torch.allclose(log_count, torch.tensor([math.log(7), 0.0, math.log(12), 0.0]))
    # equal keys with different values are different pairs: nothing merges
    k2, v2 = _padded(1, 6, 1, 4, [2])
    v2[0, 4] += 1.0
    assert trailing_repeats(k2, v2)[0].tolist() == [6]


def test_key_bias_marks_the_representative_and_drops_the_rest() -> None:
    bias = key_bias(torch.tensor([3, 5], dtype=torch.int32), torch.tensor([math.log(2.0), 0.0]), 5)
    inf = float("-inf")
    assert bias.dtype == torch.float32
    ln2 = torch.tensor(math.log(2.0), dtype=torch.float32).item()
    assert bias.tolist() == [[0.0, 0.0, ln2, inf, inf], [0.0, 0.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("real", [[3, 40], [0, 1], [39, 17]])
def test_merged_attention_equals_attention_over_every_key(real: list[int]) -> None:
    """The identity: attention over the merged keys == attention over all of them (float64 reference), to float32
    rounding; with no repeats it is plain attention."""
    q = torch.randn(2, 33, 3, 16, generator=torch.Generator().manual_seed(1))
    k, v = _padded(2, 40, 3, 16, real)
    keep, log_count = trailing_repeats(k, v)
    assert keep.tolist() == [min(n + 1, 40) for n in real]
    out = merged_attention(q, k, v, keep, log_count)
    torch.testing.assert_close(out.double(), _full_attention_f64(q, k, v), rtol=0, atol=2e-6)


def test_the_merge_is_not_the_same_as_dropping_the_repeats() -> None:
    """The ln(n) bias matters: attending over the distinct keys and one copy, unweighted, is a different function
    (so the identity test above could not pass with the bias left out)."""
    q = torch.randn(1, 9, 2, 16, generator=torch.Generator().manual_seed(2))
    k, v = _padded(1, 30, 2, 16, [4])
    keep, log_count = trailing_repeats(k, v)
    unweighted = merged_attention_reference(q, k, v, keep, torch.zeros_like(log_count))
    assert (unweighted.double() - _full_attention_f64(q, k, v)).abs().max() > 1e-2


def test_bfloat16_inputs_merge_in_float32() -> None:
    """bf16 inputs: the bias stays float32, so the merged result is as close to the float64 truth as attention over
    every key computed the same way (both round only the bf16 output)."""
    q = torch.randn(1, 17, 2, 32, generator=torch.Generator().manual_seed(3)).bfloat16()
    k, v = (t.bfloat16() for t in _padded(1, 512, 2, 32, [100]))
    keep, log_count = trailing_repeats(k, v)
    assert keep.tolist() == [101]
    truth = _full_attention_f64(q, k, v)
    merged = (merged_attention(q, k, v, keep, log_count).double() - truth).abs().max()
    full = (sdpa_attention(q.float(), k.float(), v.float()).bfloat16().double() - truth).abs().max()
    assert merged <= full * 1.01 + 1e-6


def test_wrapper_merges_without_a_mask_and_defers_masked_calls() -> None:
    calls = []

    def cross(q, k, v, mask=None):
        calls.append(mask is None)
        return sdpa_attention(q, k, v, mask)

    merged = merge_repeated_keys(cross)
    q = torch.randn(1, 5, 1, 8)
    k, v = _padded(1, 7, 1, 8, [2])
    torch.testing.assert_close(merged(q, k, v, None).double(), _full_attention_f64(q, k, v), rtol=0, atol=2e-6)
    assert calls == []
    mask = torch.tensor([[True, True, True, False, False, False, False]])
    torch.testing.assert_close(merged(q, k, v, mask), sdpa_attention(q, k, v, mask))
    assert calls == [False]


def test_wan_padded_prompts_merge_and_give_the_same_video(tiny_wan: Path) -> None:
    """A real encoded prompt (the pipeline's zero padding to the token budget): every cross-attention call of the
    tiny Wan sees keep = prompt tokens + 1 < budget, and three denoising steps with CFG (the negative prompt "" is one
    token) equal those with attention over all keys to float32 rounding."""
    adapter = load_adapter(tiny_wan)
    enc = adapter.encode(adapter.load_encoder(torch.float32, CPU), "a red circle on the left", "")
    params = SamplingParams(width=32, height=48, steps=3, guidance_scale=5.0, seed=3, frames=5)
    model = adapter.load_denoiser(torch.float32, CPU)
    budget = adapter.max_sequence_length

    def run(ops: AttentionOps) -> torch.Tensor:
        adapter.install_attention(model, ops)
        state = adapter.prepare(model, params, enc.conditionings, enc.negative_conditionings, None, 0, 3)
        with torch.inference_mode():
            for i in range(3):
                preds = {b: adapter.forward(model, state, state.latents, i, b) for b in state.branches}
                state.latents = adapter.scheduler_step(state, adapter.combine(state, preds["cond"], preds["uncond"]), i)
        return state.latents

    keeps: list[int] = []
    merged = merge_repeated_keys(sdpa_attention)

    def spy(q, k, v, mask=None):
        keeps.append(int(trailing_repeats(k, v)[0][0]))
        return merged(q, k, v, mask)

    ours = run(AttentionOps(cross=spy))
    ref = run(AttentionOps())
    assert enc.prompt_tokens + 1 < budget
    # per step: cond then uncond, two blocks each
    assert keeps == [enc.prompt_tokens + 1] * 2 + [2] * 2 + [enc.prompt_tokens + 1] * 2 + [2] * 2 + \
        [enc.prompt_tokens + 1] * 2 + [2] * 2
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_worker_config_turns_the_merge_on(tiny_wan: Path) -> None:
    """``runtime.merge_repeated_keys: true`` reaches the worker's cross-attention (compiled blocks included) and gives
    the default worker's latents on a real padded prompt to float32 rounding; the default leaves it off."""
    from denoiser_svc.types import DenoiseJob
    from services.runtime import RuntimeConfig
    from tests.workers import start_worker

    adapter = load_adapter(tiny_wan)
    enc = adapter.encode(adapter.load_encoder(torch.float32, CPU), "a blue square", "")
    params = SamplingParams(width=32, height=32, steps=2, guidance_scale=5.0, seed=1, frames=5)

    def run(runtime: RuntimeConfig):
        worker = start_worker(tiny_wan, runtime)
        worker.add_request(DenoiseJob("r", params=params, conditionings=enc.conditionings,
                                      negative_conditionings=enc.negative_conditionings, start_step=0, end_step=2))
        for step in range(2):
            worker.execute_step("r", step).wait()
        done = worker.finish_request("r")
        return getattr(done, "latents", done), worker

    torch._dynamo.reset()
    merged, worker = run(RuntimeConfig(merge_repeated_keys=True, compile="on", compile_backend="aot_eager"))
    assert worker.runtime_facts["merge_repeated_keys"] == "on"
    assert getattr(worker.attention_ops().cross, "merges_repeated_keys", False)
    torch._dynamo.reset()
    plain, default_worker = run(RuntimeConfig())
    assert "merge_repeated_keys" not in default_worker.runtime_facts
    assert not getattr(default_worker.attention_ops().cross, "merges_repeated_keys", False)
    torch.testing.assert_close(merged, plain, rtol=1e-5, atol=1e-5)
