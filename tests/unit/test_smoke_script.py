"""benchmarks/smoke_real_size.py runs end to end on tiny checkpoints (the GPU run uses the same code at real sizes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_smoke_script_on_tiny_checkpoints(tmp_path: Path) -> None:
    out, results = tmp_path / "rows.json", tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, "benchmarks/smoke_real_size.py", "--tiny", "--device", "cpu", "--steps", "2",
                           "--families", "flux,wan2.2-a14b", "--workdir", str(tmp_path / "work"), "--out", str(out),
                           "--results", str(results)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["family"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"flux", "wan2.2-a14b"}
    for r in rows.values():
        assert not r["note"] and r["step_s_median"] > 0 and set(r["stages_s"]) == {"encode", "denoise", "decode"}
        assert r["stages_s"]["denoise"] >= r["step_s_sum"] - 1e-3  # every step's time, from every expert group's segment
    assert set(rows["wan2.2-a14b"]["peak_gb"]) == {"encode", "denoise", "denoise_2", "decode"}  # two expert groups
    assert "## Real-size smoke (issue 5)" in results.read_text()
    assert not any((tmp_path / "work").glob("flux/*")), "the checkpoint folder is deleted after its family"
