"""Typed config: YAML + overrides, unknown keys, Literal choices, cross-field validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from denoiser_svc.config import DenoiserServiceConfig
from orchestrator.config import OrchestratorConfig
from services.config import ConfigError, load_config


def test_yaml_and_overrides(tmp_path: Path, tiny_flux: Path) -> None:
    f = tmp_path / "d.yaml"
    f.write_text(f"model:\n  checkpoint: {tiny_flux}\nengine:\n  max_active_requests: 2\n")
    cfg = load_config(DenoiserServiceConfig, f, ["engine.policy=round_robin", "server.port=5555"])
    assert cfg.engine.max_active_requests == 2 and cfg.engine.policy == "round_robin" and cfg.server.port == 5555
    assert cfg.model.served_name == "tiny-flux"


def test_errors_name_the_field(tmp_path: Path, tiny_flux: Path) -> None:
    base = [f"model.checkpoint={tiny_flux}"]
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['engine.nope'\]"):
        load_config(DenoiserServiceConfig, None, [*base, "engine.nope=1"])
    with pytest.raises(ConfigError, match="engine.policy must be one of"):
        load_config(DenoiserServiceConfig, None, [*base, "engine.policy=lifo"])
    with pytest.raises(ConfigError, match="max_active_requests must be an integer"):
        load_config(DenoiserServiceConfig, None, [*base, "engine.max_active_requests=many"])
    with pytest.raises(ConfigError, match="max_active_requests must be >= 1"):
        load_config(DenoiserServiceConfig, None, [*base, "engine.max_active_requests=0"])
    with pytest.raises(ConfigError, match="model.checkpoint is required"):
        load_config(DenoiserServiceConfig, None, [])
    with pytest.raises(ConfigError, match="no model_index.json"):
        load_config(DenoiserServiceConfig, None, [f"model.checkpoint={tmp_path}"])


def test_orchestrator_routes() -> None:
    cfg = load_config(OrchestratorConfig, None, ["routes=[{model: m, encoder: ['a:1'], denoiser: ['b:2'], vae: ['c:3']}]"])
    assert cfg.routes[0].denoiser == ["b:2"]
    with pytest.raises(ConfigError, match="vae needs at least one endpoint"):
        load_config(OrchestratorConfig, None, ["routes=[{model: m, encoder: ['a:1'], denoiser: ['b:2']}]"])
    with pytest.raises(ConfigError, match="listed twice"):
        load_config(OrchestratorConfig, None, [
            "routes=[{model: m, encoder: ['a:1'], denoiser: ['b:2'], vae: ['c:3']},"
            " {model: m, encoder: ['a:1'], denoiser: ['b:2'], vae: ['c:3']}]"])
