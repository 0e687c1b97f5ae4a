"""``benchmarks/parallel.py --device cpu --tiny`` runs end to end (1 and 2 gloo ranks, tiny Flux and Wan, our group
and diffusers' enable_parallelism), so that the GPU benchmark's code is exercised before GPU time is spent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.cases import REPO

pytestmark = pytest.mark.distributed


def test_parallel_benchmark_cpu_smoke(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, "benchmarks/parallel.py", "--device", "cpu", "--tiny", "--trace-collectives",
                           "both", "--ulysses-chunks", "1,2", "--results", str(results)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    text = results.read_text()
    assert not results.with_suffix(".partial.md").exists()  # written after each world size, removed at the end
    assert "## Multi-GPU (issue 4)" in text
    rows = {tuple(cell.strip() for cell in line.split("|")[1:5]) for line in text.splitlines()
            if line.startswith("| flux") or line.startswith("| wan")}
    expected = {("flux", "ours", "single", "1"), ("flux", "diffusers", "single", "1"),
                ("flux", "ours", "ulysses2", "2"), ("flux", "ours", "ulysses2-untraced", "2"),
                ("flux", "ours", "ulysses2-c2", "2"), ("flux", "ours", "ulysses2-c2-untraced", "2"), ("flux", "ours", "ring2", "2"),
                ("flux", "diffusers", "ulysses2", "2"), ("flux", "diffusers", "ring2", "2"),
                ("wan", "ours", "single", "1"), ("wan", "diffusers", "single", "1"),
                ("wan", "ours", "ulysses2", "2"), ("wan", "ours", "ring2", "2"), ("wan", "ours", "cfg2", "2"),
                ("wan", "diffusers", "ulysses2", "2"), ("wan", "diffusers", "ring2", "2")}
    assert expected <= rows, sorted(expected - rows)
    assert "failed" not in text
    # every measured row has a time and a phase breakdown; only diffusers' ring on the CPU is n/a (no LSE backend)
    for line in text.splitlines():
        if line.startswith("| flux") or line.startswith("| wan"):
            if "n/a: diffusers' ring" in line:
                continue
            cells = [c.strip() for c in line.split("|")[1:-1]]
            assert float(cells[4]) > 0 and float(cells[6]) > 0, line
            assert "nan" not in cells[8], line


def test_parallel_benchmark_runs_only_the_chosen_layout_kinds(tmp_path: Path) -> None:
    """``--layouts`` keeps the kinds named (here Ulysses only: no 1-rank, Ring or CFG rows): the way to fit a GPU run
    in one call."""
    results = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, "benchmarks/parallel.py", "--device", "cpu", "--tiny", "--models", "flux",
                           "--gpus", "1,2", "--layouts", "ulysses", "--results", str(results)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = {tuple(cell.strip() for cell in line.split("|")[2:4]) for line in results.read_text().splitlines()
            if line.startswith("| flux")}
    assert rows == {("ours", "ulysses2"), ("diffusers", "ulysses2")}, rows
    bad = subprocess.run([sys.executable, "benchmarks/parallel.py", "--device", "cpu", "--layouts", "ulyses"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown ['ulyses']" in bad.stderr
