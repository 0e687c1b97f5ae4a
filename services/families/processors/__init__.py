"""Our attention processors, one module per family: the projections, norms and rotary embeddings of the
family's diffusers processor, with the attention itself routed through ``AttentionOps`` (backend choice and
sequence parallelism). Each is tested equal to the diffusers processor it replaces. Where a block has work that can
overlap attention's exchanges (Flux's single-stream MLP), the family's module also replaces that block's forward."""

from __future__ import annotations

import torch


def remove_block_forwards(model: torch.nn.Module) -> int:
    """Give every module whose ``forward`` we replaced (a function marked ``chitu_block_forward``) its class's forward
    back; returns how many. For code that runs diffusers' own forward on the same model (the benchmarks' baselines;
    ``install`` puts ours back; GEMM routes are dropped with the Linear forwards, ``services.gemm.select_gemms``
    chooses them again). Compiled blocks: ``services.runtime.undo_regional_compile`` first (it removes the
    compiled wrapper, and ours under it)."""
    n = 0
    for module in model.modules():
        if getattr(getattr(vars(module).get("forward"), "__func__", None), "chitu_block_forward", False):
            del module.forward
            vars(module).pop("chitu_gemm", None)  # a layer routed to QuACK (services.gemm): back on cuBLAS too
            n += 1
    return n
