"""Work that is constant across a request's steps, or known for every step in advance, done once in ``prepare``
instead of in every forward.

``StepConstant`` wraps one submodule of a transformer (e.g. Flux's rotary embedding from position ids, or its text
context embedder): ``compute`` runs the module's own forward once, and inside ``use(value)`` the module returns that
value instead of recomputing it. The module tree, its parameter names and the transformer's forward are untouched
(hooks on the transformer and its blocks keep working), and the result is bit-identical: the same module computed
the value from the same inputs.

``StepTable`` does the same for modules whose output depends on the step but not on the tokens: the
timestep/guidance/pooled-text embedding ``temb`` and the AdaLN modulation projections ``linear(silu(temb))`` of
every block. Per step each projection is a matrix-vector product that reads its whole weight (Flux.1-dev: 3.2 B of
its 12 B parameters, 6.5 GB a step in bf16, on every rank of a sequence-parallel group, which shards tokens, not
this); computed for all of a request's steps at once it is one matrix product that reads the weights once per
request. Rows then come from a different GEMM shape than the per-step GEMV, so they agree to rounding (float32
~1e-7 relative), not bit for bit. Inside compiled blocks the served row is a graph input: one graph serves every
step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


class StepConstant:
    def __init__(self, module: torch.nn.Module):
        self.module = module
        self._forward = module.forward
        self._value: Any = None
        module.forward = self._serve

    def _serve(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward(*args, **kwargs) if self._value is None else self._value

    def compute(self, *args: Any, **kwargs: Any) -> Any:
        """The module's output for these inputs (its own forward)."""
        return self._forward(*args, **kwargs)

    @contextlib.contextmanager
    def use(self, value: Any) -> Iterator[None]:
        """Serve ``value`` for calls made inside the block."""
        previous, self._value = self._value, value
        try:
            yield
        finally:
            self._value = previous


def served(state: Any, branch: str) -> list[tuple[StepConstant, Any]]:
    """The (constant, value) pairs ``prepare`` put in ``state.extras["step_constants"]`` for ``branch`` (none when the
    model has no step constants)."""
    return state.extras.get("step_constants", {}).get(branch, [])


@contextlib.contextmanager
def using(pairs: list[tuple[StepConstant, Any]]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for constant, value in pairs:
            stack.enter_context(constant.use(value))
        yield


class StepTable:
    """Step-dependent, token-independent modules of a transformer, computed for every step of a request at once.

    ``embed`` maps the per-step inputs (dim 0: steps) to ``temb`` ``[N, C]``; every module of ``projections`` takes
    ``silu(temb)`` (AdaLN-Zero and AdaLN-continuous modulation). ``compute`` returns the tables as ``StepRows``, which
    serves one step's row of each for ``using``.
    """

    def __init__(self, embed: torch.nn.Module, projections: list[torch.nn.Module]):
        self.embed = StepConstant(embed)
        self.projections = [StepConstant(module) for module in projections]
        self._buffers: dict[tuple, list[torch.Tensor]] = {}

    def compute(self, *embed_args: Any) -> StepRows:
        """``(module, [N, ...] output for every step)`` for the embedding and every projection, served through this
        table's row buffers (see the module doc)."""
        temb = self.embed.compute(*embed_args)
        act = torch.nn.functional.silu(temb)
        tables = [(self.embed, temb), *((p, p.compute(act)) for p in self.projections)]
        key = tuple((tuple(t.shape[1:]), t.dtype, t.device) for _, t in tables)
        if key not in self._buffers:  # a new row width, dtype or device (a new model layout): new buffers, once
            self._buffers[key] = [t.new_empty((1, *t.shape[1:])) for _, t in tables]
        return StepRows(tables, self._buffers[key])


class StepRows:
    """What a request's step loop serves from its step tables: one fixed buffer per table, refilled each step (the
    ``StepTable``'s buffers, shared by its requests: each step refills them on the device's stream before its forward,
    so requests whose steps interleave each read their own rows).

    A row sliced out of a table is a view whose storage offset moves with the step, so compiled blocks would get an
    input of a new layout every step. Under CUDA graphs that cost a new recording per step (measured on an H200,
    Flux.1-dev 1024^2, compiled with CUDA graphs: a step took 490 ms against a 128 ms forward; with these buffers
    130 ms). ``rows`` copies the step's row of every table into the same contiguous buffers with one multi-tensor
    copy (one kernel launch), so every step hands the blocks identical tensors holding the same values.
    """

    def __init__(self, tables: list[tuple[StepConstant, torch.Tensor]], buffers: list[torch.Tensor]):
        self.tables = tables
        self.buffers = buffers

    def rows(self, index: int, batch: int) -> list[tuple[StepConstant, torch.Tensor]]:
        """Row ``index`` (the step's position in the request's range) of every table, for a batch of ``batch``."""
        torch._foreach_copy_(self.buffers, [table[index:index + 1] for _, table in self.tables])
        return [(module, buf.expand(batch, *buf.shape[1:])) for (module, _), buf in zip(self.tables, self.buffers,
                                                                                        strict=True)]
