"""Work that is constant across a request's steps, done once in ``prepare`` instead of in every forward.

``StepConstant`` wraps one submodule of a transformer (e.g. Flux's rotary embedding from position ids, or its text
context embedder): ``compute`` runs the module's own forward once, and inside ``use(value)`` the module returns that
value instead of recomputing it. The module tree, its parameter names and the transformer's forward are untouched
(hooks on the transformer and its blocks keep working), and the result is bit-identical: the same module computed
the value from the same inputs.
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


@contextlib.contextmanager
def using(pairs: list[tuple[StepConstant, Any]]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for constant, value in pairs:
            stack.enter_context(constant.use(value))
        yield
