"""Which services `chitu up` starts: one encoder / VAE per set of identical components, a denoiser group per
transformer expert (services.fingerprint, clients.stack.plan_stack)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from clients.stack import plan_stack
from services.fingerprint import FileHashCache, stage_fingerprint
from services.registry import load_adapter


def test_plan_shares_identical_encoders_and_vaes(tiny_wan: Path, tiny_wan22: Path, tiny_flux: Path) -> None:
    services, routes = plan_stack({"wan": str(tiny_wan), "wan22": str(tiny_wan22), "flux": str(tiny_flux)})
    by_kind = {kind: [s for s in services if s.kind == kind] for kind in ("encoder", "denoiser", "vae")}
    # Wan2.1 and Wan2.2 share UMT5 and the VAE; Flux has its own
    assert [(s.name, s.aliases) for s in by_kind["encoder"]] == [("wan", ["wan22"]), ("flux", [])]
    assert [(s.name, s.aliases) for s in by_kind["vae"]] == [("wan", ["wan22"]), ("flux", [])]
    assert [(s.name, s.served_name, s.component) for s in by_kind["denoiser"]] == [
        ("wan", "wan", "transformer"), ("wan22", "wan22", "transformer"),
        ("wan22.transformer_2", "wan22", "transformer_2"), ("flux", "flux", "transformer")]
    assert routes["wan22"] == {"encoder": ["wan"], "vae": ["wan"], "denoiser": ["wan22"],
                               "denoiser_2": ["wan22.transformer_2"]}
    assert routes["flux"] == {"encoder": ["flux"], "vae": ["flux"], "denoiser": ["flux"]}

    unshared, _ = plan_stack({"wan": str(tiny_wan), "wan22": str(tiny_wan22)}, share=False)
    assert [s.kind for s in unshared].count("encoder") == 2


def test_fingerprint_follows_weights_not_save_metadata(tiny_wan: Path, tmp_path: Path) -> None:
    cache = FileHashCache(tmp_path / "hashes.json")
    base = {stage: stage_fingerprint(load_adapter(tiny_wan), stage, cache) for stage in ("encoder", "vae")}
    cache.save()
    assert json.loads((tmp_path / "hashes.json").read_text()), "content hashes were not cached"

    # the same weights saved from another place: only _name_or_path / versions differ -> still shared
    moved = tmp_path / "moved"
    shutil.copytree(tiny_wan, moved)
    cfg_path = moved / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "_name_or_path": "/elsewhere", "transformers_version": "0.0"}))
    assert stage_fingerprint(load_adapter(moved), "encoder", cache) == base["encoder"]

    # one changed VAE weight -> not shared; the encoder still is
    weights = moved / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + torch.ones_like(tensors[name])
    save_file(tensors, weights)
    assert stage_fingerprint(load_adapter(moved), "vae", cache) != base["vae"]
    assert stage_fingerprint(load_adapter(moved), "encoder", cache) == base["encoder"]


def test_stage_gpus_are_checked_against_kinds_values_and_the_plan(tiny_wan22: Path, tmp_path: Path) -> None:
    import pytest

    from clients.stack import LocalStack, StackConfig
    from services.config import ConfigError

    def cfg(gpus: dict[str, str]) -> StackConfig:
        return StackConfig(checkpoints={"wan22": str(tiny_wan22)}, listen="127.0.0.1:0", device="cpu", hash_cache="",
                           stage_gpus=gpus)

    with pytest.raises(ConfigError, match="must be a stage kind"):
        cfg({"transformer": "0"}).validate()
    with pytest.raises(ConfigError, match=r"comma-separated GPU indices"):
        cfg({"denoiser": "cuda:1"}).validate()
    cfg({"denoiser": "0,1", "denoiser:wan22.transformer_2": "2,3", "vae": "0"}).validate()
    stack = LocalStack(cfg({"denoiser:wan22.expert2": "1"}), workdir=tmp_path)
    with pytest.raises(ConfigError, match=r"names no service.*denoiser:wan22.transformer_2"):
        stack.start()  # refused after planning, before any process starts
    assert not stack.services
