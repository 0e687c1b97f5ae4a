"""Our attention processors, one module per family: the projections, norms and rotary embeddings of the
family's diffusers processor, with the attention itself routed through ``AttentionOps`` (backend choice and
sequence parallelism). Each is tested equal to the diffusers processor it replaces. Where a block has work that can
overlap attention's exchanges (Flux's single-stream MLP), the family's module also replaces that block's forward."""

from __future__ import annotations

import torch


def remove_block_forwards(model: torch.nn.Module) -> int:
    """Give every module whose ``forward`` we replaced (a function marked ``chitu_block_forward``, also under
    regional compilation, which wraps it) its class's forward back; returns how many. For code that runs diffusers'
    own forward on the same model (the benchmarks' baselines); ``install`` puts ours back."""
    n = 0
    for module in model.modules():
        forward = vars(module).get("forward")
        if forward is None:
            continue
        inner = getattr(forward, "_torchdynamo_orig_callable", forward)
        if getattr(getattr(inner, "__func__", inner), "chitu_block_forward", False):
            del module.forward
            module._chitu_compiled = False
            n += 1
    return n
