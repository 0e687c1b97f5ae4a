"""Module hooks that the model does not know about.

A hook sees every call of one module: ``pre_forward`` may rewrite the arguments or answer the call itself
(``Skip(output)``: the module's computation does not run), ``post_forward`` may rewrite the output, ``reset_state``
drops what the hook holds. Hooks are registered by name on a module's ``HookRegistry``; the names are module
constants of the strategy that owns them, so two strategies never collide and ``remove`` is exact.

Where a call is intercepted: the registry replaces the instance's ``forward`` (the module's computation) and puts
back exactly what was there when the last hook goes. That is *inside* ``nn.Module.__call__``, after torch's own
forward pre-hooks and before its forward hooks, so the hooks see what the computation sees: a sequence-parallel
split registered as a pre-hook on a block (Wan shards its tokens at the first block) has already run, and a gather
registered as a forward hook still runs on a cached output. The computation the registry calls is the instance's
``forward`` as it was, so a block compiled by regional compilation (``block.forward = torch.compile(...)``) still
runs compiled when it is not skipped.

Never traced: the replacement ``forward`` is ``torch.compiler.disable``d. Called from inside a compiled region (an
attention module in a regionally compiled block), the hooks and that module run eagerly behind a graph break;
called from eager code (a block), the module's own compiled forward still runs compiled (a compiled function
re-enables compilation for itself).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

REGISTRY_ATTR = "_flexcache_hooks"
"""Instance attribute holding a module's ``HookRegistry``."""


@dataclass
class Skip:
    """Returned by ``pre_forward`` to answer the call without running the module's computation."""

    output: Any


class ModelHook:
    """Base class of FlexCache hooks (defaults: pass everything through)."""

    def pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | Skip:
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        return output

    def reset_state(self) -> None:
        """Drop anything the hook holds (called when it is removed)."""


_ABSENT = object()


class HookRegistry:
    """The named hooks of one module, run in registration order around its original ``forward``."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.hooks: dict[str, ModelHook] = {}
        self.saved_forward: Any = module.__dict__.get("forward", _ABSENT)
        """The instance's own ``forward`` before the hooks (a compiled one), or ``_ABSENT`` (the class's)."""

    @classmethod
    def of(cls, module: torch.nn.Module) -> HookRegistry | None:
        return module.__dict__.get(REGISTRY_ATTR)

    def original_forward(self) -> Callable[..., Any]:
        if self.saved_forward is _ABSENT:
            return type(self.module).forward.__get__(self.module)
        return self.saved_forward

    def call(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        entered: list[ModelHook] = []
        output: Any = None
        skipped = False
        for hook in list(self.hooks.values()):
            entered.append(hook)
            result = hook.pre_forward(self.module, args, kwargs)
            if isinstance(result, Skip):
                output, skipped = result.output, True
                break
            args, kwargs = result
        if not skipped:
            output = self.original_forward()(*args, **kwargs)
        for hook in reversed(entered):
            output = hook.post_forward(self.module, args, kwargs, output)
        return output

    def install(self) -> None:
        def forward(*args: Any, **kwargs: Any) -> Any:
            return self.call(args, kwargs)

        self.module.__dict__[REGISTRY_ATTR] = self
        self.module.__dict__["forward"] = torch.compiler.disable(forward)

    def uninstall(self) -> None:
        del self.module.__dict__[REGISTRY_ATTR]
        if self.saved_forward is _ABSENT:
            del self.module.__dict__["forward"]
        else:
            self.module.__dict__["forward"] = self.saved_forward


def register_hook(module: torch.nn.Module, name: str, hook: ModelHook) -> None:
    """Add ``hook`` to ``module`` under ``name`` (a module constant of the owning strategy)."""
    registry = HookRegistry.of(module)
    if registry is None:
        registry = HookRegistry(module)
        registry.install()
    if name in registry.hooks:
        raise ValueError(f"{type(module).__name__} already has a hook named {name!r}")
    registry.hooks[name] = hook


def remove_hook(module: torch.nn.Module, name: str) -> ModelHook | None:
    """Remove the hook ``name`` (its state reset); the module's own ``forward`` is back once no hook is left."""
    registry = HookRegistry.of(module)
    if registry is None:
        return None
    hook = registry.hooks.pop(name, None)
    if hook is not None:
        hook.reset_state()
    if not registry.hooks:
        registry.uninstall()
    return hook


def remove_hooks(modules: Iterable[torch.nn.Module], names: Iterable[str]) -> None:
    """Remove every hook of ``names`` from every module of ``modules`` (absent ones are ignored)."""
    names = tuple(names)
    for module in modules:
        for name in names:
            remove_hook(module, name)


def hook_names(module: torch.nn.Module) -> tuple[str, ...]:
    """Names of the hooks on ``module`` (empty when it carries none)."""
    registry = HookRegistry.of(module)
    return tuple(registry.hooks) if registry is not None else ()
