"""``runtime.warmup_sizes``: the warm-up also runs the listed request sizes, so that a request at one of them compiles
nothing. Without it, the first request at a size other than the default makes ``torch.compile`` recompile every block
class with dynamic shapes on the request's path (and, under CUDA graphs, record new graphs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.config import ConfigError
from services.runtime import RuntimeConfig, parse_size
from tests.flexcache_cases import make_job, run_job
from tests.workers import start_worker

COMPILED = {"compile": "on", "compile_backend": "aot_eager"}


def test_warmup_sizes_need_the_warm_up(tiny_flux: Path) -> None:
    from denoiser_svc.config import DenoiserServiceConfig
    from services.config import load_config

    with pytest.raises(ConfigError, match="warmup=false turns off"):
        load_config(DenoiserServiceConfig, overrides=[f"model.checkpoint={tiny_flux}", "warmup=false",
                                                       "runtime.warmup_sizes=[64x64]"])


def test_sizes_parse_and_bad_ones_name_the_field() -> None:
    assert parse_size("1024x768", "f") == (1024, 768, 1)
    assert parse_size("832X480x81", "f") == (832, 480, 81)
    for bad in ("1024", "1024x", "0x64", "ax64", "64x64x64x1", "-64x64"):
        with pytest.raises(ConfigError, match="runtime.warmup_sizes"):
            RuntimeConfig(warmup_sizes=[bad]).validate()


@pytest.mark.parametrize(("entry", "message"), [("100x128", "multiple of 16"), ("2048x128", r"\[16, 1024\]"),
                                                ("128x128x5", "generates images")])
def test_a_size_outside_the_model_limits_is_a_start_up_error(tiny_flux: Path, entry: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"runtime.warmup_sizes: '{entry}' does not fit .*{message}"):
        start_worker(tiny_flux, RuntimeConfig(warmup_sizes=[entry]))


def _job(worker, checkpoint: Path, size: tuple[int, int], frames: int | None = None):
    """A request as the encoder stage sends it: Flux and Wan pad every prompt to the model's text length."""
    return make_job(checkpoint, None, request_id="r", steps=2, size=size, frames=frames,
                    text_tokens=worker.adapter.max_sequence_length)


def _served_without_recompiling(worker, checkpoint: Path, size: tuple[int, int], frames: int | None = None):
    with torch._dynamo.config.patch(error_on_recompile=True):
        return run_job(worker, _job(worker, checkpoint, size, frames)).latents


@pytest.mark.parametrize(("family", "other", "frames"), [("tiny_flux", (96, 64), None), ("tiny_wan", (48, 32), 9)])
def test_listed_sizes_are_compiled_at_start_up(family: str, other: tuple[int, int], frames: int | None,
                                               request: pytest.FixtureRequest) -> None:
    checkpoint: Path = request.getfixturevalue(family)
    entry = f"{other[0]}x{other[1]}" + (f"x{frames}" if frames else "")
    torch._dynamo.reset()  # compiled code is cached per block class: start from none
    worker = start_worker(checkpoint, RuntimeConfig(**COMPILED, warmup_sizes=[entry]))
    assert worker.runtime_facts["warmup_sizes_seconds"].startswith(f"{entry}=")
    lim = worker.adapter.limits()
    served_other = _served_without_recompiling(worker, checkpoint, other, frames)
    _served_without_recompiling(worker, checkpoint, (lim.default_width, lim.default_height))
    # the same request on an eager worker: the compiled graphs compute the same (aot_eager: same ops, float32)
    eager_worker = start_worker(checkpoint, RuntimeConfig())
    eager = run_job(eager_worker, _job(eager_worker, checkpoint, other, frames)).latents
    assert float((served_other - eager).norm() / eager.norm()) < 1e-5

    # without the entry, the same request recompiles on its way (what the warm-up moved to start-up)
    torch._dynamo.reset()
    plain = start_worker(checkpoint, RuntimeConfig(**COMPILED))
    assert "warmup_sizes_seconds" not in plain.runtime_facts
    with pytest.raises(Exception, match="[Rr]ecompil"):
        _served_without_recompiling(plain, checkpoint, other, frames)
    torch._dynamo.reset()


@pytest.mark.parametrize("family", ["tiny_z_image", "tiny_qwen_image"])
def test_other_prompt_lengths_compile_nothing_after_the_warm_up(family: str, request: pytest.FixtureRequest) -> None:
    """Qwen-Image and Z-Image prompts keep their own lengths; their warm-ups run two (the CFG branches), which makes the
    blocks' graphs dynamic in the text length, and a request of any other length compiles nothing. For Z-Image this
    needs the rotary tables handed over with standard strides (``processors.z_image._contiguous_rotary``): without,
    a new length recompiles (the control at the end)."""
    checkpoint: Path = request.getfixturevalue(family)
    torch._dynamo.reset()
    worker = start_worker(checkpoint, RuntimeConfig(**COMPILED))
    for tokens in (7, 20, 40, 100):
        with torch._dynamo.config.patch(error_on_recompile=True):
            run_job(worker, make_job(checkpoint, None, request_id="r", steps=2, text_tokens=tokens))
    if family == "tiny_z_image":
        from services.runtime import denoiser_module, repeated_blocks

        for block in repeated_blocks(denoiser_module(worker.runner.model)):
            block._forward_pre_hooks.clear()
        with pytest.raises(Exception, match="[Rr]ecompil"), torch._dynamo.config.patch(error_on_recompile=True):
            run_job(worker, make_job(checkpoint, None, request_id="r", steps=2, text_tokens=72))
    torch._dynamo.reset()


def test_steps_that_compile_after_the_warm_up_are_counted(tiny_flux: Path) -> None:
    """The worker counts (and logs) steps that compiled graphs on a request's path: a size the warm-up did not cover
    counts, a covered one does not; the counts reach the info RPC's facts (``serving_facts``)."""
    torch._dynamo.reset()
    worker = start_worker(tiny_flux, RuntimeConfig(**COMPILED, warmup_sizes=["96x64"]))
    assert worker.serving_facts() == {"steps_compiling_after_warmup": "0", "steps_recording_after_warmup": "0"}
    run_job(worker, _job(worker, tiny_flux, (96, 64)))
    assert worker.serving_facts()["steps_compiling_after_warmup"] == "0"
    torch._dynamo.reset()  # forget every graph: the next request compiles again, on its first step only
    run_job(worker, _job(worker, tiny_flux, (96, 64)))
    assert worker.serving_facts()["steps_compiling_after_warmup"] == "1"
    assert start_worker(tiny_flux, RuntimeConfig()).serving_facts() == {}  # nothing compiled, nothing to count
    torch._dynamo.reset()


def test_listed_cache_strategies_compile_at_start_up(tmp_path: Path) -> None:
    """PAB's attention hooks change what the compiled blocks see: its first request compiles, and so does the next
    plain request. With ``runtime.warmup_cache_strategies: [pab]`` both happen during the warm-up (the control, without
    it, counts compiling steps); an unusable name is a start-up error listing the usable ones."""
    from tests.flexcache_cases import REAL, deep_checkpoint

    checkpoint = deep_checkpoint("flux", tmp_path)

    def serve_pab_then_plain(worker) -> str:
        lim = worker.adapter.limits()
        for strategy in ("pab", None):
            run_job(worker, make_job(checkpoint, strategy, REAL["pab"] if strategy else None, request_id="r",
                                     steps=6, size=(lim.default_width, lim.default_height),
                                     text_tokens=worker.adapter.max_sequence_length))
        return worker.serving_facts()["steps_compiling_after_warmup"]

    torch._dynamo.reset()
    warmed = start_worker(checkpoint, RuntimeConfig(**COMPILED, warmup_cache_strategies=["pab"]))
    assert warmed.runtime_facts["warmup_cache_strategies_seconds"].startswith("pab=")
    assert serve_pab_then_plain(warmed) == "0"
    torch._dynamo.reset()
    assert int(serve_pab_then_plain(start_worker(checkpoint, RuntimeConfig(**COMPILED)))) > 0
    torch._dynamo.reset()
    with pytest.raises(ConfigError, match=r"runtime.warmup_cache_strategies: .*nocache"):
        start_worker(checkpoint, RuntimeConfig(warmup_cache_strategies=["nocache"]))
