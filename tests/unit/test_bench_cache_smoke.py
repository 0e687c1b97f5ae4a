"""``benchmarks/cache.py --device cpu --tiny`` runs end to end on the tiny checkpoint (every strategy and setting,
full compute, decode, PSNR/SSIM, table, JSON and plot), so the GPU benchmark's code runs before GPU time is spent.
The numbers are meaningless on a CPU; the rows must be there and be well-formed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_cache_benchmark_cpu_smoke(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "benchmarks/cache.py", "--device", "cpu", "--tiny", "--steps", "6",
                           "--samples", "1", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "cache-tiny.json").read_text())
    strategies = [r["strategy"] for r in rows]
    assert strategies[0] == "full"
    for name in ("teacache", "first_block", "magcache", "meancache", "taylorseer", "blockdance", "dbcache", "pab"):
        assert 2 <= strategies.count(name) <= 3, name
    for r in rows[1:]:
        assert not r["notes"], r
        assert r["seconds"] > 0 and r["speedup"] > 0 and 0 <= r["skipped"] <= 1
        assert r["psnr_db"] == "inf" or float(r["psnr_db"]) > 0
        assert -1 <= r["ssim"] <= 1.0 + 1e-9
    assert any(r["skipped"] > 0 and float(r["psnr_db"]) < float("inf") for r in rows[1:])
    table = (tmp_path / "cache-tiny.md").read_text()
    assert "| strategy | setting | speed-up | PSNR (dB) | SSIM |" in table and "RANDOM WEIGHTS" in table
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no plot" in proc.stdout
    else:
        assert (tmp_path / "cache-tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
