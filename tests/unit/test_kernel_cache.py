"""``runtime.kernel_cache_dir``: a second start of a denoiser worker loads its compiled blocks from the cache folder
the first start filled, instead of compiling them again. Real parts: two fresh processes (no in-memory cache to
share), each a tiny-Flux worker compiling its blocks with inductor on the CPU (C++ kernels) during its warm-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.config import ConfigError
from services.runtime import KERNEL_CACHES, use_kernel_cache

REPO = Path(__file__).resolve().parents[2]

START = """
import json, sys, time
from torch._dynamo.utils import counters
from denoiser_svc.config import DenoiserServiceConfig
from denoiser_svc.worker import Worker
from services.config import ModelConfig
from services.runtime import RuntimeConfig

checkpoint, cache = sys.argv[1:3]
cfg = DenoiserServiceConfig(model=ModelConfig(checkpoint=checkpoint, device="cpu", dtype="float32"),
                            runtime=RuntimeConfig(compile="on", compile_backend="inductor", kernel_cache_dir=cache))
worker = Worker(cfg)
worker.init_device()
worker.load_model()
t0 = time.perf_counter()
worker.compile_or_warm_up_model(worker.warmup_job())
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t0, "inductor": dict(counters["inductor"]),
                              "facts": worker.runtime_facts}))
"""


def _start(checkpoint: Path, cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in KERNEL_CACHES}  # only the config may point the caches
    proc = subprocess.run([sys.executable, "-c", START, str(checkpoint), str(cache)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


def test_second_start_loads_the_compiled_blocks_from_the_cache(tiny_flux: Path, tmp_path: Path) -> None:
    cache = tmp_path / "kernels"
    first = _start(tiny_flux, cache)
    assert first["facts"]["compiled_blocks"], first["facts"]
    assert first["facts"]["kernel_cache_dir"] == str(cache)
    assert first["inductor"].get("fxgraph_cache_miss", 0) > 0 and not first["inductor"].get("fxgraph_cache_hit")
    assert any((cache / "inductor").rglob("*")), "inductor wrote nothing into the configured folder"

    second = _start(tiny_flux, cache)
    assert second["inductor"].get("fxgraph_cache_hit", 0) == first["inductor"]["fxgraph_cache_miss"], second
    assert not second["inductor"].get("fxgraph_cache_miss"), second
    print(f"warm-up with compilation: {first['seconds']:.1f} s cold, {second['seconds']:.1f} s from the cache")


def test_kernel_cache_sets_every_compiler_folder_and_rejects_an_unwritable_one(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (*KERNEL_CACHES, "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"):
        monkeypatch.delenv(var, raising=False)  # monkeypatch restores this process's environment afterwards
    assert use_kernel_cache("") == {} and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    env = use_kernel_cache(str(tmp_path / "k"))
    for var, sub in KERNEL_CACHES.items():
        assert os.environ[var] == env[var] == str(tmp_path / "k" / sub) and (tmp_path / "k" / sub).is_dir()
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] == "1"
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="kernel_cache_dir"):
        use_kernel_cache(str(blocker / "k"))
