"""The group layout, its validation, and the attention pieces that need no second process: rank tables, accessor
errors, config and model checks (clear errors before any rank starts), the log-sum-exp merge and the CPU LSE kernel
against plain softmax attention."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from denoiser_svc.config import DenoiserServiceConfig, ParallelConfig
from denoiser_svc.parallel.attention import default_lse_attention, merge_partial
from denoiser_svc.parallel.groups import AXES, ParallelGroups, RankGroup, axis_groups, rank_layout
from denoiser_svc.parallel.sharding import check_layout
from services.config import ConfigError, load_config
from services.registry import load_adapter
from tests.distributed.cases import REPO, build_checkpoint


def test_eight_rank_layout_matches_the_docstring() -> None:
    layout = rank_layout(ParallelConfig(cfg_degree=2, ring_degree=2, ulysses_degree=2))
    groups = {axis.name: axis_groups(layout, axis) for axis in AXES}
    assert groups == {"cfg": [[0, 4], [1, 5], [2, 6], [3, 7]], "ring": [[0, 2], [1, 3], [4, 6], [5, 7]],
                      "ulysses": [[0, 1], [2, 3], [4, 5], [6, 7]], "sp": [[0, 1, 2, 3], [4, 5, 6, 7]]}
    # every rank is in exactly one group per axis
    for name, rows in groups.items():
        assert sorted(r for row in rows for r in row) == list(range(8)), name


def test_accessors_are_generated_and_name_their_group() -> None:
    single = ParallelGroups.single()
    for axis in AXES:
        group = getattr(single, f"get_{axis.name}_group")()
        assert isinstance(group, RankGroup) and group.size == 1 and group.axis is axis
    partial = ParallelGroups(ParallelConfig(), 0, {"cfg": RankGroup(AXES[0], [0], 0, None)})
    with pytest.raises(RuntimeError, match=r"the Ulysses group \('ulysses'\) is not initialised"):
        partial.get_ulysses_group()


@pytest.mark.parametrize(("overrides", "message"), [
    (["parallel.cfg_degree=3"], "parallel.cfg_degree must be 1 or 2"),
    (["parallel.ulysses_degree=0"], "parallel.ulysses_degree must be >= 1"),
    (["parallel.ulysses_chunks=0"], "parallel.ulysses_chunks must be >= 1"),
    (["parallel.ring_degree=2", "model.device=cuda:1"], "pins one GPU"),
    (["parallel.ring_degree=2", "model.device=cpu", "parallel.backend=nccl"], "needs CUDA"),
    (["parallel.backend=mpi"], "parallel.backend must be one of"),
    (["parallel.heartbeat_seconds=5", "parallel.heartbeat_timeout_seconds=6"], "at least 3 x heartbeat_seconds"),
])
def test_config_errors_name_the_field(tiny_flux: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(DenoiserServiceConfig, overrides=[f"model.checkpoint={tiny_flux}", *overrides])


def test_model_checks(tiny_flux: Path, checkpoints_dir: Path) -> None:
    flux = load_adapter(tiny_flux)
    with pytest.raises(ConfigError, match="flux family uses 'distilled' guidance"):
        check_layout(ParallelConfig(cfg_degree=2), flux, "transformer")
    with pytest.raises(ConfigError, match="ulysses_degree=4 must divide the model's 2 attention heads"):
        check_layout(ParallelConfig(ulysses_degree=4), flux, "transformer")
    assert check_layout(ParallelConfig(ulysses_degree=2, ring_degree=2), flux, "transformer") is not None
    with pytest.raises(ConfigError, match="ulysses_degree=2 x parallel.ulysses_chunks=2 must divide the model's 2"):
        check_layout(ParallelConfig(ulysses_degree=2, ulysses_chunks=2), flux, "transformer")
    # chunks only split Ulysses exchanges: without Ulysses they are ignored
    assert check_layout(ParallelConfig(ring_degree=2, ulysses_chunks=2), flux, "transformer") is not None
    z_image = load_adapter(build_checkpoint("z_image", checkpoints_dir))
    assert check_layout(ParallelConfig(cfg_degree=2, ring_degree=2), z_image, "transformer") is not None
    with pytest.raises(ConfigError, match="ulysses_degree=3 must divide the model's 2 attention heads"):
        check_layout(ParallelConfig(ulysses_degree=3), z_image, "transformer")


def test_bad_layout_fails_before_any_rank_starts(tiny_flux: Path, tmp_path: Path) -> None:
    """``chitu serve denoiser`` with a layout the model cannot run exits non-zero with the reason, at once."""
    cfg = tmp_path / "denoiser.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"checkpoint": str(tiny_flux), "device": "cpu"},
                                   "parallel": {"ulysses_degree": 4}}))
    proc = subprocess.run([sys.executable, "-m", "clients.cli", "serve", "denoiser", "--config", str(cfg)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "must divide the model's 2 attention heads" in proc.stdout + proc.stderr
    assert "workers_started" not in proc.stdout + proc.stderr


def _softmax_attention(q, k, v, mask=None):
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double()), torch.logsumexp(scores, -1)


def test_cpu_lse_kernel_and_block_merge_equal_full_attention() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 7, 2, 8, generator=gen) for _ in range(3))
    mask = torch.tensor([[True, True, False, True, True, True, False]])
    ref, ref_lse = _softmax_attention(q, k, v, mask)
    out, lse = default_lse_attention(q, k, v, mask)
    assert torch.allclose(out.double(), ref, atol=1e-6) and torch.allclose(lse.double(), ref_lse, atol=1e-5)
    # ring-style: key blocks merged by log-sum-exp, including a block whose keys are all masked (weighs nothing)
    merged = merged_lse = None
    for lo, hi in ((0, 3), (3, 5), (5, 7)):
        block_mask = mask[:, lo:hi].clone()
        if lo == 5:
            block_mask[:] = False
        o, l_ = default_lse_attention(q, k[:, lo:hi], v[:, lo:hi], block_mask)
        l_ = l_.transpose(1, 2)
        if not block_mask.any():
            l_ = torch.full_like(l_, float("-inf"))
        merged, merged_lse = merge_partial(merged, merged_lse, o, l_)
    ref5, _ = _softmax_attention(q, k[:, :5], v[:, :5], mask[:, :5])
    assert torch.allclose(merged.double(), ref5, atol=1e-6)
