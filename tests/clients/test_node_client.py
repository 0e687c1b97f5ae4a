"""The Node.js client (clients/node) against a live stack: events, result bytes, and error statuses."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

NODE_DIR = Path(__file__).resolve().parents[2] / "clients" / "node"


def test_node_client_against_live_stack(flux_stack) -> None:
    node = shutil.which("node")
    assert node, "Node.js is required (scripts/setup.sh installs the client's packages with npm)"
    assert (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir(), "run: npm ci --prefix clients/node"
    proc = subprocess.run([node, "test/e2e.js", flux_stack.address, "tiny-flux"], cwd=NODE_DIR, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '"ok":true' in proc.stdout
