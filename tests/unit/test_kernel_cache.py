"""``runtime.kernel_cache_dir``: a second start of a denoiser worker loads its compiled blocks from the cache folder
the first start filled, instead of compiling them again. Real parts: ``benchmarks/startup.py`` starts a tiny-Flux
worker twice, each in a fresh process (no in-memory cache to share), compiling its blocks with inductor on the CPU
(C++ kernels) during the warm-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.config import ConfigError
from services.runtime import FLASH_ATTENTION_CACHE_SWITCH, KERNEL_CACHES, use_kernel_cache

REPO = Path(__file__).resolve().parents[2]


def test_second_start_loads_the_compiled_blocks_from_the_cache(tiny_flux: Path, tmp_path: Path) -> None:
    cache, out = tmp_path / "kernels", tmp_path / "startup.json"
    proc = subprocess.run([sys.executable, "benchmarks/startup.py", "--checkpoint", str(tiny_flux), "--device", "cpu",
                           "--dtype", "float32", "--cache", str(cache), "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(proc.stdout)
    runs = json.loads(out.read_text())
    first, second = runs["cold"], runs["warm"]
    assert first["facts"]["compiled_blocks"], first["facts"]
    assert first["facts"]["kernel_cache_dir"] == str(cache)
    assert first["inductor"].get("fxgraph_cache_miss", 0) > 0 and not first["inductor"].get("fxgraph_cache_hit")
    assert any((cache / "inductor").rglob("*")), "inductor wrote nothing into the configured folder"
    assert second["inductor"].get("fxgraph_cache_hit", 0) == first["inductor"]["fxgraph_cache_miss"], second
    assert not second["inductor"].get("fxgraph_cache_miss"), second
    # auto's attention choice: timed by the first start, read from the folder by the second
    assert first["facts"]["attention_source"] == "auto", first["facts"]
    assert second["facts"]["attention_source"] == "auto (cached)", second["facts"]
    assert second["facts"]["attention_joint_backend"] == first["facts"]["attention_joint_backend"]
    assert second["facts"]["attention_auto_timed_seconds"] == first["facts"]["attention_auto_seconds"]
    assert list((cache / "attention_auto").glob("*.json")), "no auto choice stored"


def test_kernel_cache_sets_every_compiler_folder_and_rejects_an_unwritable_one(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (*KERNEL_CACHES, FLASH_ATTENTION_CACHE_SWITCH):
        monkeypatch.delenv(var, raising=False)  # monkeypatch restores this process's environment afterwards
    assert use_kernel_cache("") == {} and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    env = use_kernel_cache(str(tmp_path / "k"))
    for var, sub in KERNEL_CACHES.items():
        assert os.environ[var] == env[var] == str(tmp_path / "k" / sub) and (tmp_path / "k" / sub).is_dir()
    assert os.environ[FLASH_ATTENTION_CACHE_SWITCH] == "1"
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="kernel_cache_dir"):
        use_kernel_cache(str(blocker / "k"))
