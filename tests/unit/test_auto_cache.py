"""``auto``'s attention choice kept in ``runtime.kernel_cache_dir`` (``services.attention.selection``): a later start
with the same card, software, shapes and settings reuses it without timing; anything else times again. Real timing
on the CPU (the math and SDPA kernels), real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from services.attention import selection
from services.attention.autotune import CallShape
from services.runtime import RuntimeConfig

CPU = torch.device("cpu")
SHAPES = {CallShape("joint", (1, 64, 2, 16), (1, 64, 2, 16), torch.float32, False): 2,
          CallShape("cross", (1, 64, 2, 16), (1, 8, 2, 16), torch.float32, False): 2}


@pytest.fixture
def timings(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the real timing runs (``auto_select`` calls)."""
    calls: list[int] = []
    real = selection.auto_select

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(selection, "auto_select", counted)
    return calls


def _files(folder: Path) -> list[Path]:
    return sorted((folder / "attention_auto").glob("*.json"))


def test_second_start_reuses_the_choice_without_timing(tmp_path: Path, timings: list[int]) -> None:
    rt = RuntimeConfig(kernel_cache_dir=str(tmp_path))
    first = selection.select_kernels(rt, SHAPES, CPU)
    assert first.source == "auto" and len(timings) == 1
    (stored,) = _files(tmp_path)
    data = json.loads(stored.read_text())
    assert data["choice"] == {k: b.name.value for k, b in first.kernels.items()}
    assert set(data["choice"]) == {"joint", "cross"}

    second = selection.select_kernels(rt, SHAPES, CPU)
    assert len(timings) == 1, "the second start timed the kernels again"
    assert second.source == "auto (cached)"
    assert {k: b.name for k, b in second.kernels.items()} == {k: b.name for k, b in first.kernels.items()}
    meta, before = second.metadata(), first.metadata()
    assert meta["attention_source"] == "auto (cached)"
    assert meta["attention_joint_timings"] == before["attention_joint_timings"]  # what the first start measured
    assert meta["attention_auto_timed_seconds"] == before["attention_auto_seconds"]
    assert str(stored) in meta["attention_notes"]


@pytest.mark.parametrize("change", ["shapes", "bound", "lossy", "lse"])
def test_a_different_start_times_again(tmp_path: Path, timings: list[int], change: str) -> None:
    rt = RuntimeConfig(kernel_cache_dir=str(tmp_path))
    selection.select_kernels(rt, SHAPES, CPU)
    shapes, needs_lse = SHAPES, False
    if change == "shapes":
        shapes = {CallShape("joint", (1, 96, 2, 16), (1, 96, 2, 16), torch.float32, False): 2}
    elif change == "bound":
        rt = RuntimeConfig(kernel_cache_dir=str(tmp_path), exact_max_rel_error=5e-3)
    elif change == "lossy":
        rt = RuntimeConfig(kernel_cache_dir=str(tmp_path), allow_lossy=True)
    else:
        needs_lse = True
    sel = selection.select_kernels(rt, shapes, CPU, needs_lse=needs_lse)
    assert sel.source == "auto" and len(timings) == 2
    assert len(_files(tmp_path)) == 2


def test_unreadable_or_unusable_choices_are_timed_again_and_replaced(tmp_path: Path, timings: list[int]) -> None:
    rt = RuntimeConfig(kernel_cache_dir=str(tmp_path))
    selection.select_kernels(rt, SHAPES, CPU)
    (stored,) = _files(tmp_path)
    stored.write_text("{not json")
    assert selection.select_kernels(rt, SHAPES, CPU).source == "auto" and len(timings) == 2
    data = json.loads(stored.read_text())  # rewritten whole
    data["choice"]["joint"] = "sdpa_cudnn"  # a kernel this device cannot run (as if the card had changed)
    stored.write_text(json.dumps(data))
    sel = selection.select_kernels(rt, SHAPES, CPU)
    assert sel.source == "auto" and len(timings) == 3
    assert sel.kernels["joint"].name.value != "sdpa_cudnn"
    assert json.loads(stored.read_text())["choice"]["joint"] == sel.kernels["joint"].name.value


def test_no_folder_or_auto_cache_off_times_every_start(tmp_path: Path, timings: list[int]) -> None:
    for rt in (RuntimeConfig(), RuntimeConfig(kernel_cache_dir=str(tmp_path), auto_cache=False)):
        assert selection.select_kernels(rt, SHAPES, CPU).source == "auto"
        assert selection.select_kernels(rt, SHAPES, CPU).source == "auto"
    assert len(timings) == 4 and not _files(tmp_path)


def test_the_key_names_what_the_choice_depends_on() -> None:
    key, facts = selection.auto_cache_key(RuntimeConfig(), SHAPES, CPU, needs_lse=False)
    assert {"device", "capability", "torch", "cuda", "cudnn", "packages", "shapes", "allow_lossy",
            "exact_max_rel_error", "lossy_max_rel_error", "auto_min_gain", "needs_lse"} <= set(facts)
    assert set(facts["packages"]) >= {"triton", "flash-attn-4", "sageattention"}
    assert facts["torch"] == torch.__version__ and len(key) == 32
    assert selection.auto_cache_key(RuntimeConfig(), SHAPES, CPU, needs_lse=False)[0] == key  # stable
