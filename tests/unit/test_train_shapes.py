"""The GPU training script's every code path at the ``tiny`` preset on the CPU: VAE stage, latent pool, transformer
stage, resumption across invocations, evaluation, plots, the run folder's limits, and the export that
FluxPipeline loads."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from services.shapes import model as M
from services.shapes.scenes import heldout_captions

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_shapes.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_shapes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train():
    return _script()


@pytest.fixture(scope="module")
def resumed_run(train, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run spread over three invocations: stopped inside the VAE stage, then inside the transformer stage,
    then finished."""
    run = tmp_path_factory.mktemp("run") / "run"
    base = ["--run-dir", str(run), "--preset", "tiny", "--device", "cpu"]
    assert train.main([*base, "--stop-after-steps", "2", "--skip-eval"]) == 0
    p = json.loads((run / M.PROGRESS).read_text())
    assert (p["vae"]["steps_done"], p["vae"]["done"], p["transformer"]["steps_done"]) == (2, False, 0)
    assert train.main([*base, "--stop-after-steps", "3", "--skip-eval"]) == 0
    p = json.loads((run / M.PROGRESS).read_text())
    assert p["vae"]["done"] and p["vae"]["latent_stats"]["scaling_factor"] > 0
    assert p["transformer"]["steps_done"] == 3 and not p["finished"]
    assert train.main(base) == 0
    return run


def test_resumed_run_finishes_within_the_return_limits(resumed_run: Path) -> None:
    p = json.loads((resumed_run / M.PROGRESS).read_text())
    assert p["finished"] and p["transformer"]["steps_done"] == p["train"]["steps"] == 6
    assert [r[0] for r in p["transformer"]["log"]] == [2, 4, 6]
    assert all(r[1] > 0 for r in p["transformer"]["log"])
    assert [(i["vae_from"], i["vae_to"], i["transformer_from"], i["transformer_to"]) for i in p["invocations"]] == [
        (0, 2, 0, 0), (2, 4, 0, 3), (4, 4, 3, 6)]
    ev = p["eval"]
    assert set(ev["by_guidance"]) == {"1.0", "4.0"} and ev["chosen_guidance"] in (1.0, 4.0)
    assert set(ev["by_guidance"]["4.0"]["heldout"]) == {"colour", "shape", "size", "position", "background", "all"}
    files = sorted(f.name for f in resumed_run.iterdir())
    assert files == ["loss.png", "progress.json", "samples.png", "trainable-00.safetensors", "vae.safetensors"]
    assert len(files) <= 8 and all(f.stat().st_size < 15 * 2**20 for f in resumed_run.iterdir())


def test_rerun_of_a_finished_run_changes_nothing(train, resumed_run: Path) -> None:
    before = json.loads((resumed_run / M.PROGRESS).read_text())
    assert train.main(["--run-dir", str(resumed_run), "--device", "cpu", "--skip-eval"]) == 0
    after = json.loads((resumed_run / M.PROGRESS).read_text())
    assert after["transformer"]["log"] == before["transformer"]["log"] and after["finished"]


def test_other_settings_refuse_to_resume(train, resumed_run: Path) -> None:
    with pytest.raises(SystemExit, match="other settings"):
        train.main(["--run-dir", str(resumed_run), "--preset", "tiny", "--set", "lr=0.5"])


def test_same_seed_same_run(train, tmp_path: Path) -> None:
    """Uninterrupted runs with one seed are identical on the CPU (data and noise of step k are seeded by k)."""
    logs = []
    for name in ("a", "b"):
        run = tmp_path / name
        assert train.main(["--run-dir", str(run), "--preset", "tiny", "--device", "cpu", "--skip-eval"]) == 0
        p = json.loads((run / M.PROGRESS).read_text())
        logs.append((p["vae"]["log"], p["vae"]["latent_stats"], p["transformer"]["log"]))
    assert logs[0] == logs[1]


def test_export_loads_with_flux_pipeline(resumed_run: Path, tmp_path: Path) -> None:
    from diffusers import FluxPipeline

    out = M.export_run(resumed_run, tmp_path / "ckpt", {**M.SERVING_DEFAULTS, "guidance_scale": 3.0})
    assert json.loads((out / "chitu.json").read_text())["guidance_scale"] == 3.0
    assert M.check_folder_size(out) < M.MAX_FOLDER_BYTES
    from safetensors import safe_open

    with safe_open(str(next((out / "transformer").glob("*.safetensors"))), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16
    progress, comps = M.load_run(resumed_run)
    pipe = FluxPipeline.from_pretrained(out, dtype=torch.float32)
    assert pipe.transformer.config.guidance_embeds is False
    assert pipe.vae.config.scaling_factor == pytest.approx(progress["vae"]["latent_stats"]["scaling_factor"])
    # the exported weights are the run's, rounded to bf16
    for name in ("transformer", "text_encoder_2", "vae"):
        ours = dict(comps[name].named_parameters())
        for key, p in getattr(pipe, name).named_parameters():
            torch.testing.assert_close(p, ours[key].to(torch.bfloat16).float(), rtol=0, atol=0)
    # tokenization is the run's
    cap = heldout_captions()[0]
    assert pipe.tokenizer_2(cap).input_ids == comps["tokenizer_2"](cap).input_ids
    image = pipe(cap, negative_prompt="", true_cfg_scale=3.0, height=128, width=128, num_inference_steps=2,
                 max_sequence_length=progress["model"]["max_tokens"], generator=torch.Generator().manual_seed(0),
                 output_type="np").images[0]
    assert image.shape == (128, 128, 3)


def test_training_text_path_is_the_pipelines() -> None:
    """encode_text on tokenize's ids == FluxPipeline.encode_prompt (what the trained model sees at inference)."""
    cfg = M.PRESETS["tiny"]
    tok, tok2 = M.make_tokenizers(M.TokenizerVocab.build(), cfg.max_tokens)
    comps = M.build_components(cfg, tok, tok2, seed=1)
    pipe = M.make_pipeline(comps)
    caps = heldout_captions()[:3] + [""]
    clip_ids, t5_ids = M.tokenize(tok, tok2, caps, cfg.max_tokens)
    with torch.no_grad():
        embeds, pooled = M.encode_text(comps["text_encoder"], comps["text_encoder_2"], clip_ids, t5_ids)
        ref_embeds, ref_pooled, _ = pipe.encode_prompt(caps, None, max_sequence_length=cfg.max_tokens)
    torch.testing.assert_close(embeds, ref_embeds, rtol=0, atol=0)
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=0)


def test_non_finite_loss_stops_the_run_without_saving(train, resumed_run: Path, tmp_path: Path) -> None:
    """A diverging transformer stage (absurd learning rate) stops within its first steps with exit code 2, and the
    run folder keeps its last saved state."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(resumed_run, run)
    p = json.loads((run / M.PROGRESS).read_text())
    p["train"]["steps"], p["train"]["lr"], p["train"]["warmup"], p["train"]["grad_clip"] = 12, 1e30, 1, 1e30
    p["finished"] = p["transformer"]["done"] = False
    (run / M.PROGRESS).write_text(json.dumps(p))
    before = {f.name: f.read_bytes() for f in run.glob("trainable-*.safetensors")}
    assert train.main(["--run-dir", str(run), "--device", "cpu", "--skip-eval"]) == 2
    after = json.loads((run / M.PROGRESS).read_text())
    assert after["transformer"]["steps_done"] == 6
    assert {f.name: f.read_bytes() for f in run.glob("trainable-*.safetensors")} == before
