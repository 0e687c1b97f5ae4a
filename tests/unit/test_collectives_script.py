"""benchmarks/collectives.py on the CPU: gloo ranks in real processes exchange the Ulysses-sized tensors (1/256 of
them), and every rank checks that it received chunk `rank` of every member's input, in member order."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_collectives_benchmark_runs_and_checks_the_exchange_on_cpu(tmp_path: Path) -> None:
    results = tmp_path / "collectives.md"
    proc = subprocess.run([sys.executable, "benchmarks/collectives.py", "--device", "cpu", "--tiny", "--gpus", "2",
                           "--iters", "2", "--warmup", "1", "--results", str(results)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line for line in results.read_text().splitlines() if line.startswith("| ") and "| gloo |" in line]
    assert len(rows) == 4 and all("| True |" in row for row in rows), rows
