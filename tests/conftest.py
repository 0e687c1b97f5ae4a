"""Shared fixtures: tiny checkpoints (built once per session) and a running local stack."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.assets import build_tiny


@pytest.fixture(scope="session")
def checkpoints_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def tiny_flux(checkpoints_dir: Path) -> Path:
    return build_tiny("flux", checkpoints_dir / "tiny-flux", seed=0)


@pytest.fixture(scope="session")
def tiny_wan(checkpoints_dir: Path) -> Path:
    """Tiny Wan2.1-T2V (one transformer)."""
    return build_tiny("wan", checkpoints_dir / "tiny-wan", seed=0)


@pytest.fixture(scope="session")
def tiny_wan22(checkpoints_dir: Path) -> Path:
    """Tiny Wan2.2-T2V-A14B layout (two experts); same seed as tiny_wan, so its UMT5 and VAE are identical."""
    return build_tiny("wan22", checkpoints_dir / "tiny-wan22", seed=0)


@pytest.fixture(scope="session")
def flux_stack(tiny_flux: Path, tmp_path_factory: pytest.TempPathFactory):
    """The four services on loopback ports, serving the tiny Flux checkpoint on the CPU in float32."""
    from clients.stack import LocalStack, StackConfig

    cfg = StackConfig(checkpoints={"tiny-flux": str(tiny_flux)}, listen="127.0.0.1:0", device="cpu", dtype="float32")
    stack = LocalStack(cfg, workdir=tmp_path_factory.mktemp("stack"))
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def tiny_flux2_klein(checkpoints_dir: Path) -> Path:
    """FLUX.2-klein-4B's architecture at toy size (step-distilled: no CFG)."""
    return build_tiny("flux2_klein", checkpoints_dir / "tiny-flux2-klein", seed=0)


@pytest.fixture(scope="session")
def tiny_flux2_klein_base(checkpoints_dir: Path) -> Path:
    """The undistilled FLUX.2-klein base variant at toy size (CFG with an empty negative prompt)."""
    return build_tiny("flux2_klein_base", checkpoints_dir / "tiny-flux2-klein-base", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen_image(checkpoints_dir: Path) -> Path:
    return build_tiny("qwen_image", checkpoints_dir / "tiny-qwen-image", seed=0)


@pytest.fixture(scope="session")
def tiny_z_image(checkpoints_dir: Path) -> Path:
    return build_tiny("z_image", checkpoints_dir / "tiny-z-image", seed=0)
